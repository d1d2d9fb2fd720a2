"""Hot reload: watch the model registry's ``LIVE`` pointer and hand the processor a validated model.

Why it exists: a new model must reach a running service without a restart and without losing a
reading. The registry (:mod:`anomaly.registry`) holds versions and the pointer; this module decides
*when* the service takes a new version, checks it first, and defines what happens to device state.
The processor calls it between two batches, on its own thread::

    switch = watcher.poll()             # at most every model_poll_interval_s: read LIVE (a tiny file)
    if switch is not None:              # LIVE names another version, which loaded and validated
        processor.commit()              # everything the old model produced is durable first
        handover = watcher.apply(switch, processor.detector)   # state rule, metrics
        processor.detector = switch.detector                   # the next batch uses the new model
        send handover.closing_events to the events topic

Validation (:meth:`anomaly.registry.ModelRegistry.validate`): loads without running code, the version
in the bundle equals its directory, the same features in the same order as the serving model, and
finite scores in [0, 1] on probe readings. A version that fails is **rejected**: logged at ERROR with
the reason, counted in ``sensor_anomaly_model_reloads_total{outcome="failure"}``, and not retried
while the pointer and the bundle's files stay as they are; the old model keeps serving.

**State rule on a switch.** A device's hidden state (h, c, smoothed score, open episode) belongs to
the model that produced it and means nothing to another, so every device **warms up again** under
the new model: its first ``warmup_steps`` readings advance the new state but are not scored (status
``warmup``), exactly like a new device. Each device's last timestamp is carried over, so
duplicates and out-of-order readings are still dropped across the switch. A device inside an
anomaly episode gets an ``end`` event from the *old* model at the switch (``score`` 0, no
contributions, ``source.offset`` -1: no reading caused it), so every ``start`` on the events topic
has its ``end``. The devices reset are counted in ``sensor_anomaly_model_switch_state_resets_total``.
Changelog snapshots written by the old model carry its version and are discarded on restore (the
changelog's version rule); new snapshots carry the new version. Events name the version that
produced them (``model.version``).

Cost: reading ``LIVE`` every ``model_poll_interval_s`` (microseconds). A switch loads and validates
the bundle on the processing thread — for the models this service runs, tens of milliseconds — once.

What it must not do: touch Kafka (the processor sends the closing events and commits), or switch in
the middle of a batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaly.bundle import METADATA_FILE, WEIGHTS_FILE, ModelBundle
from anomaly.detector import StreamingDetector
from anomaly.errors import AnomalyError
from anomaly.events import AnomalyEvent
from anomaly.registry import ModelRegistry, RegistryError
from streams.config import ServiceConfig
from streams.metrics import ServiceMetrics

__all__ = ["HandOver", "ModelSwitch", "ModelWatcher"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSwitch:
    """A validated new live model, with a fresh detector ready for the next batch."""

    bundle: ModelBundle
    detector: StreamingDetector
    previous_version: str
    load_s: float
    """Wall time to load and validate the bundle."""


@dataclass(frozen=True)
class HandOver:
    """What :meth:`ModelWatcher.apply` did to device state."""

    devices_reset: int
    """Devices whose state was dropped (they warm up again under the new model)."""
    closing_events: list[AnomalyEvent]
    """``end`` events (old model version) of devices that were inside an episode; ``row`` is -1."""


class ModelWatcher:
    """Polls a registry's ``LIVE`` pointer and prepares validated switches (see the module docstring).

    Parameters
    ----------
    registry : ModelRegistry
    current : ModelBundle
        The model the processor serves now.
    metrics : ServiceMetrics, optional
    poll_interval_s : float
        Least time between two reads of the pointer by :meth:`poll`.
    clock : callable
        Monotonic seconds (injectable for tests).

    Examples
    --------
    >>> import tempfile
    >>> reg = ModelRegistry(tempfile.mkdtemp(), create=True)
    >>> _ = reg.publish(ModelBundle.untrained(["x"], hidden_size=4), live=True)
    >>> watcher = ModelWatcher(reg, reg.load_live(), poll_interval_s=5.0)
    >>> watcher.check() is None                       # LIVE names the serving version
    True
    >>> _ = reg.publish(ModelBundle.untrained(["x"], hidden_size=4), live=True)
    >>> switch = watcher.check()
    >>> switch.previous_version, switch.bundle.version, switch.detector.model_version
    ('1', '2', '2')
    """

    def __init__(self, registry: ModelRegistry, current: ModelBundle, metrics: ServiceMetrics | None = None, *,
                 poll_interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self.registry = registry
        self.current = current
        self.metrics = metrics
        self.poll_interval_s = float(poll_interval_s)
        self._clock = clock
        self._next_check = clock() + self.poll_interval_s
        self._rejected: tuple[str, tuple[object, ...]] | None = None
        self._last_warning = ""

    @classmethod
    def for_config(cls, config: ServiceConfig, current: ModelBundle,
                   metrics: ServiceMetrics | None = None) -> ModelWatcher | None:
        """A watcher when ``config.model_dir`` is a registry; None for a single bundle (no hot reload)."""
        if not ModelRegistry.is_registry(config.model_dir):
            logger.info("model %s is a single bundle, not a registry: hot reload is off", config.model_dir)
            return None
        return cls(ModelRegistry(config.model_dir), current, metrics, poll_interval_s=config.model_poll_interval_s)

    @property
    def current_version(self) -> str:
        return self.current.version

    def poll(self) -> ModelSwitch | None:
        """:meth:`check` if ``poll_interval_s`` has passed since the last check, else None (cheap)."""
        if self._clock() < self._next_check:
            return None
        return self.check()

    def check(self) -> ModelSwitch | None:
        """Read the pointer now; a validated switch when it names another version, else None.

        Never raises for a bad registry or bundle: the problem is logged (and, for a bundle,
        counted) and the serving model stays. A returned switch counts as taken (the watcher now
        compares against its version): apply it with :meth:`apply` before the next batch.
        """
        self._next_check = self._clock() + self.poll_interval_s
        try:
            live = self.registry.live_version()
        except RegistryError as exc:
            self._warn_once(f"cannot read the live model pointer, still serving version {self.current.version}: "
                            f"{exc}")
            return None
        if live is None:
            self._warn_once(f"model registry {self.registry.root} has no LIVE pointer; still serving version "
                            f"{self.current.version}")
            return None
        self._last_warning = ""
        if live == self.current.version:
            self._rejected = None
            return None
        fingerprint = self._fingerprint(live)
        if self._rejected == (live, fingerprint):
            return None
        started = time.perf_counter()
        try:
            bundle = self.registry.load(live)
            self.registry.validate(bundle, reference=self.current)
            detector = StreamingDetector(bundle)
        except (AnomalyError, OSError) as exc:
            self._rejected = (live, fingerprint)
            logger.error("model version %s rejected, still serving version %s: %s", live, self.current.version, exc)
            if self.metrics is not None:
                self.metrics.observe_model_reload(False)
            return None
        load_s = time.perf_counter() - started
        switch = ModelSwitch(bundle=bundle, detector=detector, previous_version=self.current.version, load_s=load_s)
        self._rejected = None
        self.current = bundle
        logger.info("model version %s loaded and validated in %.3f s; switching from version %s at the next batch",
                    live, load_s, switch.previous_version)
        return switch

    def apply(self, switch: ModelSwitch, old: StreamingDetector) -> HandOver:
        """Apply the state rule from ``old`` to ``switch.detector``; call right before using the new detector.

        Carries each device's last timestamp over (so duplicates stay dropped) and its last known context
        values (a commanded mode holds whatever the model; rescaled to the new bundle), closes open episodes
        with ``end`` events of the old model, and records the switch in the metrics (reload success,
        model info, devices reset, the closing events as ``end`` events).

        Cost: one pass over the old store's devices (a dict lookup each) and vectorised copies.
        """
        old_store, new_store = old.store, switch.detector.store
        devices = old_store.devices()
        closing: list[AnomalyEvent] = []
        if devices:
            ids = np.array(devices, dtype=object)
            old_slots = old_store.slots_for(ids)  # all present: no allocation
            new_slots = new_store.slots_for(ids)
            new_store.last_ts[new_slots] = old_store.last_ts[old_slots]
            if new_store.n_context:  # the schema check made the context inputs the same: rescale the last values
                raw = old.bundle.context_scaler.inverse(old_store.last_context[old_slots])  # type: ignore[union-attr]
                new_store.last_context[new_slots] = switch.bundle.context_scaler.transform(raw)  # type: ignore[union-attr]
            for i in np.flatnonzero(old_store.in_episode[old_slots]).tolist():
                slot = old_slots[i]
                closing.append(AnomalyEvent(
                    device_id=devices[i], ts_ms=int(old_store.last_ts[slot]), kind="end", score=0.0,
                    threshold=old.score_threshold, expected={}, actual={}, contributions={},
                    model_name=old.bundle.name, model_version=old.bundle.version, row=-1,
                    episode_start_ms=int(old_store.episode_start[slot])))
        if self.metrics is not None:
            self.metrics.observe_model_reload(True)
            self.metrics.set_model(switch.bundle.name, switch.bundle.version, len(switch.bundle.features),
                                   switch.load_s)
            self.metrics.observe_model_switch(len(devices), len(closing))
        logger.info("switched model %s version %s -> %s %s: %d device states reset (warm-up of %d readings), "
                    "%d open episodes closed", switch.bundle.name, switch.previous_version, switch.bundle.version,
                    switch.bundle.features, len(devices), switch.bundle.config.warmup_steps, len(closing))
        return HandOver(devices_reset=len(devices), closing_events=closing)

    def _fingerprint(self, version: str) -> tuple[object, ...]:
        """Size and mtime of the version's files: a rejected bundle is retried once they change."""
        try:
            root = self.registry.path_of(version)
        except RegistryError:
            return ()
        out: list[object] = []
        for name in (METADATA_FILE, WEIGHTS_FILE):
            try:
                st = Path(root, name).stat()
                out.append((st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def _warn_once(self, message: str) -> None:
        if message != self._last_warning:
            logger.warning(message)
            self._last_warning = message
