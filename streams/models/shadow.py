"""Shadow mode: score every reading with a candidate model too, publish its events apart, count agreement.

Why it exists: before a new version is made live (the registry's pointer switch), operators want to
see what it would have raised on today's traffic. ``serve --shadow-model VERSION`` runs a second
:class:`~anomaly.detector.StreamingDetector` over the same decoded batch as the live one. Its events
go to ``shadow_topic`` (default ``sensor.anomalies.shadow``, same layout as the events topic, with
the shadow's ``model.version``); nothing it does reaches the events topic, the changelog or the
offsets.

**Agreement** (``sensor_anomaly_shadow_agreement_total{outcome}``) compares episode *starts* per
device. A start of one model is matched with a start of the other on the same device at most
``match_window_ms`` of event time apart (default :data:`MATCH_WINDOW_READINGS` nominal intervals
of the live model); a matched pair counts once as ``both``. A start still unmatched once its
device's readings have moved more than the window past it counts as ``live_only`` or
``shadow_only``. A start on a reading that the other model did not score (it was warming up, e.g.
after a restart or a live switch) is ``not_comparable`` and never matched. Starts still waiting for
their window at shutdown are not counted (:meth:`ShadowScorer.flush` counts them, for tests and
reports).

Shadow state is not persisted: after a restart, a rebalance or a rewind, the shadow's devices warm up
again (their starts meanwhile are ``not_comparable``). A failure inside the shadow model is logged
once and turns shadow scoring off; it never stops the live path.

Cost per batch: one more detector pass (about doubling scoring time) and a Python step per event.
What it must not do: produce, commit or change the live result.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from anomaly.bundle import ModelBundle
from anomaly.detector import StreamingDetector
from anomaly.events import ProcessResult, ReadingStatus
from anomaly.registry import ModelRegistry, RegistryError, check_schema
from streams.codec import DecodedBatch, encode_event
from streams.config import ServiceConfig
from streams.errors import ConfigError
from streams.metrics import ServiceMetrics

__all__ = ["MATCH_WINDOW_READINGS", "ShadowMessage", "ShadowScorer", "match_starts"]

logger = logging.getLogger(__name__)

MATCH_WINDOW_READINGS = 30
"""Default match window in readings: two models seeing one anomaly start their episodes a few readings
apart (different smoothing and thresholds); 30 readings tolerates that without pairing unrelated episodes."""

_SIDES = ("live", "shadow")


def match_starts(pending: dict[str, dict[str, int]], starts: Iterable[tuple[int, str, str]],
                 watermark: Mapping[str, int], window_ms: int) -> Counter[str]:
    """Match episode starts of the two models; the agreement rule of this module, as a pure function.

    Parameters
    ----------
    pending : dict
        ``{"live": {device: ts_ms}, "shadow": {...}}``: unmatched starts carried between batches;
        updated in place.
    starts : iterable of (ts_ms, side, device)
        New starts (``side`` is ``"live"`` or ``"shadow"``), taken in time order (live first at equal times).
    watermark : mapping
        Each device's latest event time seen so far: a pending start older than ``watermark - window_ms``
        can no longer be matched.
    window_ms : int
        Largest distance in event time between two matched starts.

    Returns
    -------
    collections.Counter
        ``both`` per matched pair, ``live_only`` / ``shadow_only`` per start that cannot be matched any more.

    Examples
    --------
    >>> pending = {"live": {}, "shadow": {}}
    >>> dict(match_starts(pending, [(1000, "live", "a"), (3000, "shadow", "a"), (5000, "live", "b")],
    ...                   {"a": 4000, "b": 5000}, window_ms=2000))
    {'both': 1}
    >>> dict(match_starts(pending, [], {"b": 8000}, window_ms=2000)), pending
    ({'live_only': 1}, {'live': {}, 'shadow': {}})
    """
    counts: Counter[str] = Counter()
    for ts, side, device in sorted(starts, key=lambda s: (s[0], s[1] != "live", s[2])):
        other = "shadow" if side == "live" else "live"
        earlier = pending[other].get(device)
        if earlier is not None and abs(ts - earlier) <= window_ms:
            del pending[other][device]
            counts["both"] += 1
            continue
        if device in pending[side]:  # an earlier unmatched start of the same model: it stays unmatched
            counts[f"{side}_only"] += 1
        pending[side][device] = ts
    for side in _SIDES:
        for device, ts in list(pending[side].items()):
            if watermark.get(device, ts) > ts + window_ms:
                del pending[side][device]
                counts[f"{side}_only"] += 1
    return counts


class ShadowMessage(NamedTuple):
    """One shadow-topic record: key, value and the *source* partition (the processor maps it)."""

    key: bytes
    value: bytes
    partition: int


class ShadowScorer:
    """A candidate model scoring beside the live one (see the module docstring).

    Parameters
    ----------
    bundle : ModelBundle
        The shadow (candidate) model.
    live : ModelBundle
        The live model: the shadow must use its features and context inputs in their order.
    metrics : ServiceMetrics, optional
    match_window_ms : int, optional
        Event-time window for matching starts (default ``MATCH_WINDOW_READINGS`` live intervals).

    Examples
    --------
    >>> from types import SimpleNamespace as Record
    >>> from streams.codec import decode_records, encode_reading
    >>> live = ModelBundle.untrained(["x"], hidden_size=4).with_config(warmup_steps=2)
    >>> shadow = ShadowScorer(live.with_version("2"), live)
    >>> messages = [encode_reading("a", 1_704_067_200_000 + 1000 * i, {"x": 1.0}) for i in range(5)]
    >>> records = [Record(topic="t", partition=0, offset=i, timestamp=-1, headers=[], key=key, value=value)
    ...            for i, (key, value) in enumerate(messages)]
    >>> decoded = decode_records(records, live.inputs)
    >>> shadow.process(decoded, StreamingDetector(live).process(decoded.batch)), shadow.detector.model_version
    ([], '2')
    """

    def __init__(self, bundle: ModelBundle, live: ModelBundle, metrics: ServiceMetrics | None = None, *,
                 match_window_ms: int | None = None):
        check_schema(bundle, live)
        self.bundle = bundle
        self.detector = StreamingDetector(bundle)
        self.metrics = metrics
        window = MATCH_WINDOW_READINGS * live.config.nominal_interval_ms if match_window_ms is None \
            else match_window_ms
        if not window >= 0:
            raise ValueError(f"match_window_ms must be >= 0, got {window}")
        self.match_window_ms = int(window)
        self.agreement: Counter[str] = Counter()
        """Totals by outcome since start (the metric counts the same)."""
        self.events: Counter[str] = Counter()
        self.enabled = True
        self._pending: dict[str, dict[str, int]] = {side: {} for side in _SIDES}
        if metrics is not None:
            metrics.set_shadow_model(bundle.name, bundle.version)

    @classmethod
    def for_config(cls, config: ServiceConfig, live: ModelBundle,
                   metrics: ServiceMetrics | None = None) -> ShadowScorer | None:
        """The shadow scorer that ``config.shadow_model`` asks for, or None when it is unset.

        Raises :class:`~streams.errors.ConfigError` (the service does not start) when ``model_dir``
        is not a registry or the version is missing or fails validation against the live model.
        """
        if not config.shadow_model:
            return None
        if not ModelRegistry.is_registry(config.model_dir):
            raise ConfigError(f"setting shadow_model={config.shadow_model!r} needs model_dir to be a model registry "
                              f"(a directory with versions/), but {config.model_dir} is a single bundle")
        registry = ModelRegistry(config.model_dir)
        try:
            bundle = registry.load(config.shadow_model)
            registry.validate(bundle, reference=live)
        except RegistryError as exc:
            raise ConfigError(f"setting shadow_model={config.shadow_model!r}: {exc}") from exc
        logger.info("shadow model %s version %s scores beside live version %s; events to %s", bundle.name,
                    bundle.version, live.version, config.shadow_topic)
        return cls(bundle, live, metrics)

    # ------------------------------------------------------------------ per batch
    def process(self, decoded: DecodedBatch, live: ProcessResult) -> list[ShadowMessage]:
        """Score ``decoded.batch`` with the shadow model; returns the shadow-topic records to send.

        ``live`` is the live detector's result for the same batch (for agreement).
        """
        if not self.enabled or len(decoded.batch) == 0:
            return []
        try:
            result = self.detector.process(decoded.batch)
        except Exception:  # the shadow must never stop the live path
            logger.exception("shadow model version %s failed; shadow scoring is off until restart",
                             self.bundle.version)
            self.enabled = False
            return []
        messages = []
        for event in result.events:
            row = event.row
            key, value = encode_event(event, str(decoded.source_topic[row]), int(decoded.source_partition[row]),
                                      int(decoded.source_offset[row]))
            messages.append(ShadowMessage(key, value, int(decoded.source_partition[row])))
        kinds = Counter(e.kind for e in result.events)
        counts = self._compare(live, result)
        self.events.update(kinds)
        self.agreement.update(counts)
        if self.metrics is not None:
            self.metrics.observe_shadow(kinds, counts)
        return messages

    def _compare(self, live: ProcessResult, shadow: ProcessResult) -> Counter[str]:
        counts: Counter[str] = Counter()
        starts: list[tuple[int, str, str]] = []
        for side, mine, other in (("live", live, shadow), ("shadow", shadow, live)):
            for event in mine.events:
                if event.kind != "start":
                    continue
                if other.status[event.row] != ReadingStatus.SCORED:
                    counts["not_comparable"] += 1
                    continue
                starts.append((event.ts_ms, side, event.device_id))
        store = self.detector.store  # sees the same readings as the live one: its last_ts is the device's clock
        waiting = {d for side in _SIDES for d in self._pending[side]} | {d for _, _, d in starts}
        watermark = {d: int(store.last_ts[store.slot_of(d)]) for d in waiting if d in store}
        counts.update(match_starts(self._pending, starts, watermark, self.match_window_ms))
        return counts

    # ------------------------------------------------------------------ lifecycle
    def drop_devices(self, devices: list[str]) -> None:
        """Forget devices (their partition was revoked or rewound); they warm up again in the shadow."""
        self.detector.store.remove(devices)
        for name in _SIDES:
            for device in devices:
                self._pending[name].pop(device, None)

    def flush(self) -> Counter[str]:
        """Count every pending start as unmatched (end of a test or a report); returns those counts."""
        counts: Counter[str] = Counter()
        for name in _SIDES:
            counts[f"{name}_only"] += len(self._pending[name])
            self._pending[name].clear()
        counts = +counts
        self.agreement.update(counts)
        if self.metrics is not None:
            self.metrics.observe_shadow({}, counts)
        return counts
