"""Model bundles: everything needed to score, in one versioned directory that loads without running code.

Why it exists: training (a notebook, the CLI) and scoring (the CLI, the service) meet only through
this format. A bundle directory holds ``weights.safetensors`` (tensors only — safetensors cannot
carry code, unlike pickle) and ``bundle.json`` (feature names and order, scaler, the normal-error
model and threshold, detector settings, hyperparameters, name, version, training summary, format
version and the weights' SHA-256; a bundle trained with a seasonal period adds ``seasonal_scorer``,
the normal-error model of its seasonal residuals; one with context inputs adds ``context`` and
``context_scaler``). :meth:`ModelBundle.load` checks every field and the weights' shapes against the
metadata, and names the problem when something does not fit.

Format versions: 1 (no context inputs) and 2 (with context: the keys above). A bundle without context
is still written as version 1, so releases that predate context read it; both load here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as deserialize_tensors
from safetensors.torch import save as serialize_tensors

from anomaly.adaptation import NoveltyConfig
from anomaly.errors import BundleError
from anomaly.model import LSTMForecaster
from anomaly.scoring import NormalErrorModel

__all__ = ["FORMAT_VERSION", "MAX_SEASONAL_PERIOD", "READABLE_VERSIONS", "DetectorConfig", "ModelBundle", "Scaler"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""The newest bundle format; a bundle without context inputs is written as version 1 (see the module docstring)."""
READABLE_VERSIONS = (1, 2)
MAX_SEASONAL_PERIOD = 4096
"""Longest seasonal period (in readings) a bundle may carry: each device keeps a ``[P, F]`` float32
profile, 16 KiB per feature at this length (a week of 5-minute readings is 2,016, a day of 30-second
ones 2,880); a longer cycle belongs to a model of its own, not to every device's state."""
METADATA_FILE = "bundle.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass(frozen=True)
class Scaler:
    """Per-feature standardisation: ``scaled = (value - mean) / scale``.

    >>> s = Scaler(np.array([1.0], dtype=np.float32), np.array([2.0], dtype=np.float32))
    >>> s.transform(np.array([[5.0]], dtype=np.float32)).tolist(), s.inverse(np.array([[2.0]])).tolist()
    ([[2.0]], [[5.0]])
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> Scaler:
        values = np.asarray(values, dtype=np.float64)  # float32 squares overflow beyond ~1e19
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0)
        # a constant feature keeps unit scale: any change from the constant is then visible
        std = np.where(std > 1e-8 * np.maximum(np.abs(mean), 1.0), std, 1.0)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def transform(self, values: np.ndarray) -> np.ndarray:
        return ((values - self.mean) / self.scale).astype(np.float32)

    def inverse(self, scaled: np.ndarray) -> np.ndarray:
        return (scaled * self.scale + self.mean).astype(np.float32)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DetectorConfig:
    """How the streaming detector turns scores into decisions (all recalibratable without retraining).

    Attributes
    ----------
    threshold : smoothed surprise (``-log10`` tail probability) at which an episode starts.
    exit_ratio : an episode ends below ``exit_ratio * threshold`` (hysteresis).
    min_duration, cooldown : readings above the threshold to start, below the exit level to end.
    smoothing_alpha : weight of the newest reading in the moving average of surprise.
    point_margin : a single reading whose surprise exceeds the smoothed one by this much (decades of
        rarity) decides alone, so one extreme reading is not averaged away.
    scale_alpha : weight of the newest reading in each device's running residual scale (0: judge every
        device on the fleet's scale; see :func:`anomaly.scoring.normalize_residuals`).
    stuck_after : per feature, the number of consecutive exactly repeated values after which the sensor
        counts as stuck (its reading gets the maximum surprise); ``None`` turns the check off. Training
        sets it above the longest repeat run seen in normal data.
    warmup_steps : readings of a new (or reset) device that advance its state without being scored.
    gap_policy : ``"reset"`` zeroes a device's state after a gap (it warms up again); ``"carry"`` goes on.
    gap_factor, nominal_interval_ms : a gap is longer than ``gap_factor * nominal_interval_ms``.
    false_alarm_rate : the rate of normal readings above ``threshold`` that calibration aimed for.
    episode_rule : what opens and closes episodes. ``"threshold"``: the smoothed surprise of the
        device's scaled residual against ``threshold`` (with the hysteresis above). ``"novelty"``: the
        device's own novelty records (:mod:`anomaly.adaptation`), fed the surprise of the *unscaled*
        residual; then ``scores`` are novelty alert scores and the threshold is ``1 - 1/(1 + novelty_tolerance)``.
    novelty_alphas, novelty_tolerance, novelty_half_life, novelty_refractory, novelty_learn_readings,
    novelty_value_range : the novelty rule's settings (see :class:`anomaly.adaptation.NoveltyConfig`;
        ``cooldown`` above ends its episodes); ignored by the threshold rule.
    seasonal_period : readings per cycle (``None``: off). Under the novelty rule each device then keeps
        a profile of its last cycle and the surprise of each reading against the same phase one period
        earlier (scored by the bundle's ``seasonal_scorer``) is a second error channel of its novelty
        records (:func:`anomaly.scoring.seasonal_residuals`). Set by training (``TrainingConfig.seasonal``)
        when the training rows have a clear cycle; requires ``seasonal_scorer``.
    seasonal_alpha : weight of the newest reading in that profile (1: exactly the previous cycle's reading).
        0.5: an incident in one cycle returns as half its size in the next one's residuals (at 1 it
        returns whole, mirrored: a likely false alarm one period later), and the reference averages
        the noise of past cycles, so the residual's variance is 1.33 instead of 2 times a reading's.
    seasonal_explains : with a seasonal period, feed the forecaster's error channel the smaller of its own
        surprise and the seasonal one, so a reading the device's cycle explains (a switch-on at the same
        time every day, which a one-step forecaster cannot anticipate) does not beat the forecaster's
        records; ``false``: each channel is fed its own surprise.
    """

    threshold: float = 4.0
    exit_ratio: float = 0.5
    min_duration: int = 1
    cooldown: int = 3
    smoothing_alpha: float = 0.3
    point_margin: float = 2.0
    scale_alpha: float = 0.02
    stuck_after: tuple[int, ...] | None = None
    warmup_steps: int = 10
    gap_policy: Literal["reset", "carry"] = "reset"
    gap_factor: float = 10.0
    nominal_interval_ms: int = 1000
    false_alarm_rate: float = 1e-4
    episode_rule: Literal["threshold", "novelty"] = "threshold"
    novelty_alphas: tuple[float, ...] = (0.3, 0.1)
    novelty_tolerance: float = 0.05
    novelty_half_life: float = 20_000.0
    novelty_refractory: int = 100
    novelty_learn_readings: int = 100
    novelty_value_range: bool = True
    seasonal_period: int | None = None
    seasonal_alpha: float = 0.5
    seasonal_explains: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.novelty_alphas, (list, tuple)):  # JSON gives a list
            object.__setattr__(self, "novelty_alphas", tuple(self.novelty_alphas))
        if self.stuck_after is not None:
            object.__setattr__(self, "stuck_after", tuple(self.stuck_after))
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.stuck_after):
                raise ValueError(f"detector setting stuck_after={self.stuck_after!r} must be integers >= 1 or null")
        checks = [
            ("threshold", math.isfinite(self.threshold) and self.threshold > 0, "a finite number > 0"),
            ("exit_ratio", 0.0 < self.exit_ratio <= 1.0, "in (0, 1]"),
            ("min_duration", isinstance(self.min_duration, int) and self.min_duration >= 1, "an integer >= 1"),
            ("cooldown", isinstance(self.cooldown, int) and self.cooldown >= 1, "an integer >= 1"),
            ("smoothing_alpha", 0.0 < self.smoothing_alpha <= 1.0, "in (0, 1]"),
            ("point_margin", math.isfinite(self.point_margin) and self.point_margin >= 0, "a finite number >= 0"),
            ("scale_alpha", 0.0 <= self.scale_alpha < 1.0, "in [0, 1)"),
            ("warmup_steps", isinstance(self.warmup_steps, int) and self.warmup_steps >= 1, "an integer >= 1"),
            ("gap_policy", self.gap_policy in ("reset", "carry"), "'reset' or 'carry'"),
            ("gap_factor", math.isfinite(self.gap_factor) and self.gap_factor > 1.0, "a finite number > 1"),
            ("nominal_interval_ms", isinstance(self.nominal_interval_ms, int) and self.nominal_interval_ms > 0,
             "an integer > 0"),
            ("false_alarm_rate", 0.0 < self.false_alarm_rate < 1.0, "in (0, 1)"),
            ("episode_rule", self.episode_rule in ("threshold", "novelty"), "'threshold' or 'novelty'"),
            ("novelty_alphas", isinstance(self.novelty_alphas, tuple) and len(self.novelty_alphas) >= 1
             and all(_is_number(a) and 0.0 < a <= 1.0 for a in self.novelty_alphas),
             "a non-empty list of numbers in (0, 1]"),
            ("novelty_tolerance", _is_number(self.novelty_tolerance) and math.isfinite(self.novelty_tolerance)
             and self.novelty_tolerance > 0, "a finite number > 0"),
            ("novelty_half_life", _is_number(self.novelty_half_life) and self.novelty_half_life > 0,
             "a number of readings > 0 (a very large one: records barely decay)"),
            ("novelty_refractory", _is_int(self.novelty_refractory) and self.novelty_refractory >= 0,
             "an integer >= 0"),
            ("novelty_learn_readings", _is_int(self.novelty_learn_readings) and self.novelty_learn_readings >= 0,
             "an integer >= 0"),
            ("novelty_value_range", isinstance(self.novelty_value_range, bool), "true or false"),
            ("seasonal_period", self.seasonal_period is None or (_is_int(self.seasonal_period)
                                                                 and 2 <= self.seasonal_period <= MAX_SEASONAL_PERIOD),
             f"null or an integer in [2, {MAX_SEASONAL_PERIOD}]"),
            ("seasonal_alpha", _is_number(self.seasonal_alpha) and 0.0 < self.seasonal_alpha <= 1.0, "in (0, 1]"),
            ("seasonal_explains", isinstance(self.seasonal_explains, bool), "true or false"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"detector setting {name}={getattr(self, name)!r} must be {rule}")

    @property
    def novelty(self) -> NoveltyConfig:
        """The novelty rule's settings as :class:`~anomaly.adaptation.NoveltyConfig`."""
        return NoveltyConfig(alphas=self.novelty_alphas, tolerance=self.novelty_tolerance,
                             half_life=self.novelty_half_life, refractory=self.novelty_refractory,
                             cooldown=self.cooldown, learn_readings=self.novelty_learn_readings,
                             value_range=self.novelty_value_range)

    @property
    def gap_ms(self) -> int:
        return int(self.gap_factor * self.nominal_interval_ms)


@dataclass
class ModelBundle:
    """A trained forecaster with its scaler, normal-error model and detector settings.

    Examples
    --------
    >>> import tempfile
    >>> rng = np.random.default_rng(0)
    >>> b = ModelBundle.untrained(["x", "y"], hidden_size=8, scorer=NormalErrorModel.fit(rng.normal(size=(200, 2))))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = b.save(d)
    ...     ModelBundle.load(d).features
    ('x', 'y')

    ``seasonal_scorer`` is the normal-error model of seasonal residuals; ``config.seasonal_period``
    requires it. ``context`` names the context inputs (seen by the model after the features, never
    forecast or scored), scaled by ``context_scaler``; :attr:`inputs` is the model's input order.
    """

    name: str
    version: str
    features: tuple[str, ...]
    scaler: Scaler
    model: LSTMForecaster
    scorer: NormalErrorModel
    config: DetectorConfig = field(default_factory=DetectorConfig)
    training: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    seasonal_scorer: NormalErrorModel | None = None
    context: tuple[str, ...] = ()
    context_scaler: Scaler | None = None

    def __post_init__(self) -> None:
        self.features = tuple(self.features)
        self.context = tuple(self.context)
        n = len(self.features)
        if n == 0 or len(set(self.features)) != n or not all(isinstance(f, str) and f for f in self.features):
            raise BundleError(f"features must be distinct non-empty strings, got {list(self.features)}")
        inputs = self.features + self.context
        if len(set(inputs)) != len(inputs) or not all(isinstance(f, str) and f for f in self.context):
            raise BundleError(f"context must be distinct non-empty strings that are not features, got "
                              f"{list(self.context)} (features {list(self.features)})")
        n_context = len(self.context)
        if self.model.n_context != n_context:
            raise BundleError(f"model expects {self.model.n_context} context inputs, bundle lists {n_context}: "
                              f"{list(self.context)}")
        if (self.context_scaler is None) != (n_context == 0) or (
                self.context_scaler is not None and len(self.context_scaler.mean) != n_context):
            size = 0 if self.context_scaler is None else len(self.context_scaler.mean)
            raise BundleError(f"context_scaler expects {size} context inputs, bundle lists {n_context}")
        stuck = self.config.stuck_after
        seasonal = self.seasonal_scorer
        for what, size in (("model", self.model.n_features), ("scaler", len(self.scaler.mean)),
                           ("scorer", self.scorer.n_features), ("stuck_after", n if stuck is None else len(stuck)),
                           ("seasonal_scorer", n if seasonal is None else seasonal.n_features)):
            if size != n:
                raise BundleError(f"{what} expects {size} features, bundle lists {n}: {list(self.features)}")
        if self.config.seasonal_period is not None and seasonal is None:
            raise BundleError(f"detector setting seasonal_period={self.config.seasonal_period} needs a "
                              "seasonal_scorer (train with seasonal=True)")
        self.model.eval()

    @classmethod
    def untrained(cls, features: Sequence[str], hidden_size: int = 64, num_layers: int = 1,
                  scorer: NormalErrorModel | None = None, name: str = "untrained",
                  version: str = "0", context: Sequence[str] = ()) -> ModelBundle:
        """A bundle with a fresh (persistence-like) network: for tests, examples and benchmarks."""
        n, n_context = len(features), len(context)
        if scorer is None:
            scorer = NormalErrorModel.fit(np.random.default_rng(0).normal(size=(1000, n)))
        return cls(name=name, version=version, features=tuple(features),
                   scaler=Scaler(np.zeros(n, np.float32), np.ones(n, np.float32)),
                   model=LSTMForecaster(n, hidden_size=hidden_size, num_layers=num_layers, n_context=n_context),
                   scorer=scorer, context=tuple(context),
                   context_scaler=Scaler(np.zeros(n_context, np.float32), np.ones(n_context, np.float32))
                   if n_context else None)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The model's input columns: the features, then the context inputs."""
        return self.features + self.context

    def with_version(self, version: str, name: str | None = None) -> ModelBundle:
        return replace(self, version=version, name=name or self.name)

    def with_config(self, **settings: Any) -> ModelBundle:
        """A copy with some detector settings changed (validated)."""
        return replace(self, config=replace(self.config, **settings))

    # ------------------------------------------------------------------ save
    def metadata(self) -> dict[str, Any]:
        meta = {
            "format_version": FORMAT_VERSION if self.context else 1,
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at,
            "features": list(self.features),
            "hyperparameters": {"hidden_size": self.model.hidden_size, "num_layers": self.model.num_layers},
            "scaler": {"mean": self.scaler.mean.tolist(), "scale": self.scaler.scale.tolist()},
            "scorer": self.scorer.to_dict(),
            "detector": asdict(self.config),
            "training": self.training,
            "seasonal_scorer": None if self.seasonal_scorer is None else self.seasonal_scorer.to_dict(),
        }
        if self.context_scaler is not None:
            meta["context"] = list(self.context)
            meta["context_scaler"] = {"mean": self.context_scaler.mean.tolist(),
                                      "scale": self.context_scaler.scale.tolist()}
        return meta

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the bundle into ``directory`` (created if needed).

        Everything is serialised before the directory is touched, so a bundle that cannot be written
        (say, a non-finite number in the scorer) raises :class:`BundleError` and leaves an existing
        bundle there intact. Each file is replaced atomically (weights first, metadata last); a crash
        between the two leaves metadata whose ``weights_sha256`` no longer matches, which
        :meth:`load` reports instead of loading a mixed bundle. Non-finite numbers in the free-form
        ``training`` summary are written as ``null`` (JSON has no infinity).
        """
        out = Path(directory)
        tensors = {k: v.detach().contiguous().clone() for k, v in self.model.state_dict().items()}
        weights = serialize_tensors(tensors)
        meta = self.metadata()
        meta["training"] = _finite_or_none(meta["training"], "training")
        meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()
        bad = _first_non_finite(meta)
        if bad is not None:
            raise BundleError(f"cannot save model bundle {self.name!r}: {bad} is not a finite number")
        text = json.dumps(meta, indent=2, allow_nan=False)
        out.mkdir(parents=True, exist_ok=True)
        temporaries: list[Path] = []
        try:
            for data, final in ((weights, out / WEIGHTS_FILE), (text.encode(), out / METADATA_FILE)):
                with tempfile.NamedTemporaryFile(dir=out, prefix=f".{final.name}.", suffix=".tmp",
                                                 delete=False) as tmp:
                    temporaries.append(Path(tmp.name))
                    tmp.write(data)
            for tmp, final in zip(temporaries, (out / WEIGHTS_FILE, out / METADATA_FILE), strict=True):
                os.replace(tmp, final)
        finally:
            for tmp in temporaries:
                tmp.unlink(missing_ok=True)
        logger.info("saved model bundle %s version %s to %s", self.name, self.version, out)
        return out

    # ------------------------------------------------------------------ load
    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ModelBundle:
        """Load and validate a bundle; raises :class:`BundleError` naming the file and field at fault."""
        root = Path(directory)
        meta_path, weights_path = root / METADATA_FILE, root / WEIGHTS_FILE
        if not root.is_dir():
            raise BundleError(f"model bundle directory {root} does not exist")
        for path in (meta_path, weights_path):
            if not path.is_file():
                raise BundleError(f"model bundle {root} has no {path.name}")
        try:
            meta = json.loads(meta_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{meta_path}: not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise BundleError(f"{meta_path}: expected a JSON object")
        version = meta.get("format_version")
        if type(version) is not int or version not in READABLE_VERSIONS:  # JSON true would equal 1
            raise BundleError(f"{meta_path}: unsupported format_version {version!r} "
                              f"(supported: {', '.join(map(str, READABLE_VERSIONS))})")
        if version == 1 and ("context" in meta or "context_scaler" in meta):
            raise BundleError(f"{meta_path}: format_version 1 cannot carry context inputs")
        raw = weights_path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if meta.get("weights_sha256") not in (None, digest):
            raise BundleError(f"{weights_path}: SHA-256 {digest[:12]}… does not match bundle.json "
                              f"(weights_sha256 {str(meta.get('weights_sha256'))[:12]}…): corrupt or replaced")
        try:
            return cls._from_parts(meta, root, raw)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{meta_path}: invalid field: {exc}") from exc

    @classmethod
    def _from_parts(cls, meta: dict[str, Any], root: Path, raw: bytes) -> ModelBundle:
        features = meta["features"]
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise BundleError(f"{root / METADATA_FILE}: 'features' must be a list of strings")
        n = len(features)
        hyper = meta["hyperparameters"]
        hidden, layers = hyper["hidden_size"], hyper["num_layers"]
        if not (isinstance(hidden, int) and isinstance(layers, int) and 0 < hidden <= 4096 and 0 < layers <= 16):
            raise BundleError(f"{root / METADATA_FILE}: hyperparameters out of range: {hyper}")
        scaler = _load_scaler(meta["scaler"], n, root / METADATA_FILE, "scaler", "feature")
        context = meta.get("context", [])
        if not isinstance(context, list) or not all(isinstance(f, str) for f in context):
            raise BundleError(f"{root / METADATA_FILE}: 'context' must be a list of strings")
        context_scaler = (_load_scaler(meta["context_scaler"], len(context), root / METADATA_FILE, "context_scaler",
                                       "context input") if context else None)
        scorer = NormalErrorModel.from_dict(meta["scorer"], n)
        seasonal = meta.get("seasonal_scorer")
        try:
            seasonal_scorer = None if seasonal is None else NormalErrorModel.from_dict(seasonal, n)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{root / METADATA_FILE}: invalid seasonal_scorer: {exc}") from exc
        config = DetectorConfig(**meta["detector"])
        model = LSTMForecaster(n, hidden_size=hidden, num_layers=layers, n_context=len(context))
        try:
            tensors = deserialize_tensors(raw)  # the bytes whose digest was checked, not a second read
        except (SafetensorError, OSError, ValueError) as exc:
            raise BundleError(f"{root / WEIGHTS_FILE}: cannot read safetensors ({exc})") from exc
        expected = model.state_dict()
        if set(tensors) != set(expected):
            raise BundleError(f"{root / WEIGHTS_FILE}: tensors {sorted(tensors)} do not match the model's "
                              f"{sorted(expected)}")
        for key, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise BundleError(f"{root / WEIGHTS_FILE}: tensor {key} has shape {list(tensor.shape)}, "
                                  f"expected {list(expected[key].shape)} for {n} features, {len(context)} "
                                  f"context inputs, hidden {hidden}")
            if not torch.isfinite(tensor).all():
                raise BundleError(f"{root / WEIGHTS_FILE}: tensor {key} has non-finite values")
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
        return cls(name=str(meta["name"]), version=str(meta["version"]), features=tuple(features),
                   scaler=scaler, model=model, scorer=scorer, config=config,
                   training=dict(meta.get("training") or {}), created_at=str(meta.get("created_at", "")),
                   seasonal_scorer=seasonal_scorer, context=tuple(context), context_scaler=context_scaler)


def _load_scaler(node: Any, n: int, path: Path, what: str, per: str) -> Scaler:
    """A :class:`Scaler` of ``n`` columns from its JSON form; :class:`BundleError` naming ``what`` otherwise."""
    mean = np.asarray(node["mean"], dtype=np.float32)
    scale = np.asarray(node["scale"], dtype=np.float32)
    if mean.shape != (n,) or scale.shape != (n,):
        raise BundleError(f"{path}: {what} has {mean.shape} / {scale.shape} values, expected {n} (one per {per})")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise BundleError(f"{path}: {what} values must be finite with scale > 0")
    return Scaler(mean, scale)


def _first_non_finite(node: object, path: str = "") -> str | None:
    """Dotted path of the first non-finite float in a JSON-like tree, or ``None``."""
    if isinstance(node, float) and not math.isfinite(node):
        return f"{path or 'value'} ({node})"
    if isinstance(node, dict):
        items: Sequence[tuple[object, object]] = list(node.items())
    elif isinstance(node, (list, tuple)):
        items = list(enumerate(node))
    else:
        return None
    for key, child in items:
        found = _first_non_finite(child, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _finite_or_none(node: Any, path: str) -> Any:
    """``node`` with non-finite floats replaced by ``None`` (logged): the training summary is informative only."""
    if isinstance(node, float) and not math.isfinite(node):
        logger.warning("training summary field %s is %s; saved as null", path, node)
        return None
    if isinstance(node, dict):
        return {k: _finite_or_none(v, f"{path}.{k}") for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_finite_or_none(v, f"{path}.{i}") for i, v in enumerate(node)]
    return node
