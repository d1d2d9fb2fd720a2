"""Model registry: versioned bundles in one directory, and a pointer naming the live one.

Why it exists: retraining (a notebook, the CLI) and serving (``sensor-anomaly serve``) meet in a
directory, not in a deployment. A data scientist publishes a new version; the service, which
watches the pointer, validates it and switches between two batches; rolling back is pointing at
an older version. Layout::

    <registry>/
      LIVE                    one line: the live version (written atomically: temp file + os.replace)
      versions/<version>/     one ModelBundle directory (bundle.json + weights.safetensors), never changed
      versions/.staging-*     a bundle being published (ignored; renamed into place when complete)
      history.jsonl           one JSON line per pointer switch: time, from, to, reason

Rules kept here:

* **Versions are immutable.** :meth:`ModelRegistry.publish` writes a bundle into a staging
  directory, validates it there and renames it to ``versions/<version>`` in one step, so a reader
  never sees half a bundle. Publishing an existing version fails.
* **The pointer switch is atomic.** ``LIVE`` is replaced with :func:`os.replace`, so a reader sees
  the old version or the new one, never a torn file.
* **Validation before use** (:meth:`ModelRegistry.validate`): the bundle loads through
  :meth:`ModelBundle.load` (safetensors and JSON: no code runs), the version in its metadata equals
  its directory name, its feature schema equals the reference (live) model's — the same feature
  names in the same order — and it scores a few probe readings to finite scores in [0, 1].
  The schema rule is strict on purpose: the service decodes messages with the live model's feature
  list and runs the shadow model on the same columns; a model over other features is a new model
  family, rolled out with a restart.

What it must not do: talk to Kafka or HTTP, or decide *when* a service switches (that is
``streams.models.watcher``). Version strings are free-form within :data:`VERSION_PATTERN`; they are
ordered by :func:`version_key` (numeric parts as numbers: ``"10"`` after ``"9"``, ``"1.10"`` after
``"1.9"``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from anomaly.bundle import METADATA_FILE, ModelBundle
from anomaly.errors import AnomalyError, BundleError
from anomaly.events import ReadingStatus
from anomaly.readings import ReadingBatch

__all__ = [
    "LIVE_FILE",
    "VERSIONS_DIR",
    "VERSION_PATTERN",
    "ModelRegistry",
    "ModelValidationError",
    "RegistryError",
    "ValidationReport",
    "check_schema",
    "load_model_dir",
    "sanity_check",
    "version_key",
]

logger = logging.getLogger(__name__)

LIVE_FILE = "LIVE"
VERSIONS_DIR = "versions"
HISTORY_FILE = "history.jsonl"
_STAGING_PREFIX = ".staging-"
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A version is a directory name and a label value: letters, digits, ``.``, ``_``, ``-``; at most 64."""

PROBE_DEVICES = 4
PROBE_SCORED_STEPS = 16
"""The sanity check runs PROBE_DEVICES synthetic devices for ``warmup_steps + PROBE_SCORED_STEPS`` readings:
enough to score a few dozen readings through the whole path (warm-up, LSTM, scorer, smoothing), in
milliseconds for any bundle the service could run."""
PROBE_START_MS = 1_704_067_200_000  # 2024-01-01T00:00Z: any in-range timestamp will do


class RegistryError(AnomalyError):
    """The registry directory is missing, malformed, or asked for something it cannot do
    (an unknown version, publishing an existing one). The message names the path or version."""


class ModelValidationError(RegistryError):
    """A candidate model failed validation and must not serve.

    The operator reads the reason (it names the check: load, version, schema or sanity score), fixes
    or re-publishes the bundle under a new version and points ``LIVE`` at it; the service keeps
    serving the previous model meanwhile.
    """


@dataclass(frozen=True)
class ValidationReport:
    """What :meth:`ModelRegistry.validate` checked for one candidate that passed."""

    version: str
    features: tuple[str, ...]
    scored: int
    """Probe readings scored by the sanity check."""
    max_score: float


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a version: numeric parts compare as numbers, others as text, numbers first.

    >>> sorted(["10", "9", "1.10", "1.9", "2-rc"], key=version_key)
    ['1.9', '1.10', '2-rc', '9', '10']
    """
    parts = re.split(r"[._-]", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def _check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_PATTERN.match(version):
        raise RegistryError(f"version {version!r} is not valid: expected 1-64 characters of letters, digits, "
                            "'.', '_' or '-', starting with a letter or digit")
    return version


def check_schema(candidate: ModelBundle, reference: ModelBundle | None) -> None:
    """Raise :class:`ModelValidationError` unless ``candidate`` has ``reference``'s features and context
    inputs, each in its order (the codec decodes messages, and the state store holds each device's last
    context, by that schema).

    >>> a = ModelBundle.untrained(["x", "y"], hidden_size=4)
    >>> check_schema(a, ModelBundle.untrained(["x", "y"], hidden_size=8))  # other sizes are fine
    >>> check_schema(a, ModelBundle.untrained(["y", "x"], hidden_size=4))
    Traceback (most recent call last):
    ...
    anomaly.registry.ModelValidationError: feature schema of version 0 is incompatible with ...
    >>> check_schema(a, ModelBundle.untrained(["x", "y"], hidden_size=4, context=["mode"]))
    Traceback (most recent call last):
    ...
    anomaly.registry.ModelValidationError: context schema of version 0 is incompatible with ...
    """
    if reference is None:
        return
    for what, want, got in (("feature", reference.features, candidate.features),
                            ("context", reference.context, candidate.context)):
        if want == got:
            continue
        missing = [f for f in want if f not in got]
        extra = [f for f in got if f not in want]
        detail = (f"missing {missing}, extra {extra}" if missing or extra
                  else "same names in another order")
        raise ModelValidationError(
            f"{what} schema of version {candidate.version} is incompatible with version {reference.version}: "
            f"expected {what} {list(want)} in this order, got {list(got)} ({detail}); "
            f"a model over other {what} inputs needs a restart of the service, not a hot reload")


def _probe_batch(bundle: ModelBundle, seed: int = 0) -> ReadingBatch:
    """Synthetic readings near the training distribution: mean ± half a standard deviation of noise."""
    rng = np.random.default_rng(seed)
    steps = bundle.config.warmup_steps + PROBE_SCORED_STEPS
    mean, scale = bundle.scaler.mean, bundle.scaler.scale
    if bundle.context_scaler is not None:  # the context inputs near their training mean too
        mean = np.concatenate([mean, bundle.context_scaler.mean])
        scale = np.concatenate([scale, bundle.context_scaler.scale])
    f = len(mean)
    noise = rng.normal(0.0, 0.5, size=(steps, PROBE_DEVICES, f))
    values = (mean + scale * noise).reshape(steps * PROBE_DEVICES, f)
    ts = PROBE_START_MS + np.repeat(np.arange(steps, dtype=np.int64), PROBE_DEVICES) * bundle.config.nominal_interval_ms
    devices = np.tile(np.array([f"probe-{i}" for i in range(PROBE_DEVICES)], dtype=object), steps)
    return ReadingBatch(devices, ts, values.astype(np.float32))


def sanity_check(bundle: ModelBundle, probe: ReadingBatch | None = None) -> tuple[int, float]:
    """Score probe readings with a fresh detector; returns (readings scored, highest score).

    Raises :class:`ModelValidationError` when the detector fails on them, scores none of them,
    forecasts a non-finite value for a scored one (the scorer would read that as "no error" and never
    alarm), or gives a score that is not a finite number in [0, 1]. ``probe`` defaults to synthetic readings
    around the bundle's own scaler mean (a model must at least find its training centre unremarkable
    enough to score).

    >>> sanity_check(ModelBundle.untrained(["x"], hidden_size=4).with_config(warmup_steps=2))[0]
    64
    """
    from anomaly.detector import StreamingDetector  # the detector imports bundle; keep this module light

    batch = probe if probe is not None else _probe_batch(bundle)
    try:
        result = StreamingDetector(bundle, capacity=max(8, PROBE_DEVICES)).process(batch)
    except Exception as exc:  # any failure here means the model cannot serve
        raise ModelValidationError(f"version {bundle.version} fails on probe readings: "
                                   f"{type(exc).__name__}: {exc}") from exc
    scored = np.flatnonzero(result.status == ReadingStatus.SCORED)
    if len(scored) == 0:
        raise ModelValidationError(f"version {bundle.version} scored none of {len(batch)} probe readings "
                                   f"(warmup_steps={bundle.config.warmup_steps})")
    forecasts = result.expected[scored]
    if not np.isfinite(forecasts).all():
        bad_rows = int((~np.isfinite(forecasts)).any(axis=1).sum())
        raise ModelValidationError(f"version {bundle.version} forecasts non-finite values for {bad_rows} of "
                                   f"{len(scored)} scored probe readings (corrupt or diverged weights)")
    for name, values in (("score", result.scores[scored]), ("raw score", result.raw_scores[scored])):
        bad = ~(np.isfinite(values) & (values >= 0.0) & (values <= 1.0))
        if bad.any():
            raise ModelValidationError(f"version {bundle.version} gives a {name} of {float(values[bad][0])!r} on a "
                                       f"probe reading ({int(bad.sum())} of {len(values)}); expected finite "
                                       "numbers in [0, 1]")
    return len(scored), float(result.scores[scored].max())


class ModelRegistry:
    """A registry directory (see the module docstring for its layout).

    Parameters
    ----------
    root : path
        The registry directory.
    create : bool
        Create ``root`` and ``root/versions`` when missing; otherwise a missing registry raises
        :class:`RegistryError`.

    Examples
    --------
    >>> import tempfile
    >>> reg = ModelRegistry(tempfile.mkdtemp(), create=True)
    >>> bundle = ModelBundle.untrained(["x", "y"], hidden_size=8)
    >>> reg.publish(bundle, live=True), reg.publish(bundle)
    ('1', '2')
    >>> reg.versions(), reg.live_version()
    (['1', '2'], '1')
    >>> reg.set_live("2"), reg.load_live().version
    ('1', '2')
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False):
        self.root = Path(root)
        if create:
            (self.root / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
        elif not (self.root / VERSIONS_DIR).is_dir():
            raise RegistryError(f"{self.root} is not a model registry (no {VERSIONS_DIR}/ directory); "
                                "create one with ModelRegistry(path, create=True)")

    def __repr__(self) -> str:
        return f"ModelRegistry({str(self.root)!r})"

    @staticmethod
    def is_registry(path: str | os.PathLike[str]) -> bool:
        """True when ``path`` looks like a registry (has ``versions/``) rather than a single bundle."""
        return (Path(path) / VERSIONS_DIR).is_dir()

    @property
    def pointer_path(self) -> Path:
        return self.root / LIVE_FILE

    def path_of(self, version: str) -> Path:
        return self.root / VERSIONS_DIR / _check_version(version)

    # ------------------------------------------------------------------ read
    def versions(self) -> list[str]:
        """Published versions, oldest first by :func:`version_key` (staging directories excluded)."""
        names = [p.name for p in (self.root / VERSIONS_DIR).iterdir()
                 if p.is_dir() and not p.name.startswith(".") and VERSION_PATTERN.match(p.name)]
        return sorted(names, key=version_key)

    def live_version(self) -> str | None:
        """The version ``LIVE`` names, or None when nothing is live yet.

        Raises :class:`RegistryError` when the pointer exists but does not name a valid version.
        """
        try:
            text = self.pointer_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"cannot read {self.pointer_path}: {exc}") from exc
        version = text.strip()
        if not VERSION_PATTERN.match(version):
            raise RegistryError(f"{self.pointer_path} does not name a valid version: {text[:80]!r}")
        return version

    def latest_version(self) -> str | None:
        """The highest published version (by :func:`version_key`), live or not."""
        versions = self.versions()
        return versions[-1] if versions else None

    def next_version(self) -> str:
        """A version after every published one: ``"1"`` for an empty registry, else the highest with
        its last number bumped (``"7"`` → ``"8"``, ``"1.9"`` → ``"1.10"``, ``"v2-rc"`` → ``"v2-rc.1"``)."""
        latest = self.latest_version()
        if latest is None:
            return "1"
        match = re.search(r"(\d+)$", latest)
        if match is None:
            return f"{latest}.1"
        return latest[:match.start()] + str(int(match.group()) + 1)

    def load(self, version: str) -> ModelBundle:
        """Load a published version (no code runs: :meth:`ModelBundle.load`).

        Raises :class:`RegistryError` for an unknown version and :class:`ModelValidationError` when
        the bundle does not load or names another version than its directory.
        """
        path = self.path_of(version)
        if not path.is_dir():
            raise RegistryError(f"version {version!r} is not in {self.root / VERSIONS_DIR} "
                                f"(published: {self.versions()})")
        try:
            bundle = ModelBundle.load(path)
        except BundleError as exc:
            raise ModelValidationError(f"version {version} does not load: {exc}") from exc
        if bundle.version != version:
            raise ModelValidationError(f"{path / METADATA_FILE} says version {bundle.version!r} but lies in "
                                       f"versions/{version}: publish bundles with ModelRegistry.publish, "
                                       "do not copy directories")
        return bundle

    def load_live(self) -> ModelBundle:
        """Load the live version; :class:`RegistryError` when nothing is live."""
        version = self.live_version()
        if version is None:
            raise RegistryError(f"model registry {self.root} has no live version ({LIVE_FILE} is missing); "
                                f"publish one with live=True or call set_live (published: {self.versions()})")
        return self.load(version)

    def history(self) -> list[dict[str, Any]]:
        """Pointer switches, oldest first (lines that do not parse are skipped)."""
        path = self.root / HISTORY_FILE
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    # ------------------------------------------------------------------ validate
    def validate(self, candidate: str | ModelBundle, reference: ModelBundle | Literal["live"] | None = "live",
                 probe: ReadingBatch | None = None) -> ValidationReport:
        """Check that a candidate may serve; raises :class:`ModelValidationError` naming the failed check.

        Parameters
        ----------
        candidate : str or ModelBundle
            A published version (loaded here) or an already loaded bundle.
        reference : ModelBundle, None or "live"
            The model whose feature schema the candidate must match: ``"live"`` (default) loads the
            live version (no check when nothing is live or the live version itself does not load),
            ``None`` skips the schema check.
        probe : ReadingBatch, optional
            Readings for the sanity score (default: synthetic ones, see :func:`sanity_check`).
        """
        bundle = self.load(candidate) if isinstance(candidate, str) else candidate
        if isinstance(reference, str):  # "live"
            reference = self._live_reference(bundle.version)
        check_schema(bundle, reference)
        scored, max_score = sanity_check(bundle, probe)
        return ValidationReport(bundle.version, bundle.features, scored, max_score)

    def _live_reference(self, candidate_version: str) -> ModelBundle | None:
        """The live bundle to compare a candidate with; None when nothing (else) is live or it is broken.

        A broken live version must not block the way out of it: pointing ``LIVE`` at a good version
        is how an operator recovers, so its schema is then not compared (and a warning says so).
        """
        try:
            live = self.live_version()
            return None if live is None or live == candidate_version else self.load(live)
        except RegistryError as exc:
            logger.warning("live model cannot be loaded, so version %s is not compared with its schema: %s",
                           candidate_version, exc)
            return None

    # ------------------------------------------------------------------ write
    def publish(self, bundle: ModelBundle, version: str | None = None, *, live: bool = False,
                reason: str = "") -> str:
        """Write ``bundle`` as a new version (default :meth:`next_version`); returns the version.

        The bundle is saved to a staging directory, loaded back and sanity-checked there, and renamed
        into ``versions/<version>`` in one step. With ``live=True`` it is then validated against the
        live model's schema and made live (:meth:`set_live`). The bundle's own ``version`` field is
        replaced by the registry version (the object passed in is not changed).
        """
        version = _check_version(version) if version is not None else self.next_version()
        final = self.path_of(version)
        if final.exists():
            raise RegistryError(f"version {version} is already published in {self.root}; versions are immutable, "
                                f"publish under a new one (next: {self.next_version()})")
        staging = self.root / VERSIONS_DIR / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            bundle.with_version(version).save(staging)
            sanity_check(ModelBundle.load(staging))
            try:
                os.rename(staging, final)
            except OSError as exc:  # a concurrent publisher took the version first
                raise RegistryError(f"cannot publish version {version} in {self.root}: {exc}") from exc
        except BundleError as exc:
            raise ModelValidationError(f"version {version} cannot be published: {exc}") from exc
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        _fsync_dir(final.parent)
        logger.info("published %s version %s to %s", bundle.name, version, final)
        if live:
            self.set_live(version, reason=reason or "published live")
        return version

    def set_live(self, version: str, *, validate: bool = True, reason: str = "") -> str | None:
        """Point ``LIVE`` at ``version`` atomically; returns the previous live version.

        With ``validate`` (default) the version is checked first (:meth:`validate` against the current
        live model), so a bad bundle is refused here rather than by every running service.
        """
        _check_version(version)
        previous = self.live_version()
        if validate:
            self.validate(version)
        elif not self.path_of(version).is_dir():
            raise RegistryError(f"version {version!r} is not published in {self.root}")
        _atomic_write(self.pointer_path, f"{version}\n")
        entry = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "from": previous, "to": version,
                 "reason": reason}
        with (self.root / HISTORY_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
        logger.info("model registry %s: live version %s -> %s%s", self.root, previous, version,
                    f" ({reason})" if reason else "")
        return previous


def load_model_dir(path: str | os.PathLike[str]) -> tuple[ModelBundle, ModelRegistry | None]:
    """The bundle to serve from ``path``: a registry's live version, or a single bundle directory.

    Returns the bundle and the registry (None for a single bundle, which cannot be hot-reloaded).
    """
    if ModelRegistry.is_registry(path):
        registry = ModelRegistry(path)
        return registry.load_live(), registry
    return ModelBundle.load(path), None


def _atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: temp file in the same directory, fsync, os.replace, fsync the directory."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False, encoding="utf-8") as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    try:
        os.replace(tmp.name, path)
    except OSError:
        Path(tmp.name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
