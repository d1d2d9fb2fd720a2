"""What the detector returns: per-reading outcomes and anomaly episode events.

Why a module of its own: the CLI, the evaluation commands and the stream processor all consume
these types, and the stream processor turns :class:`AnomalyEvent` into Kafka messages. Keeping them
apart from the detector keeps that contract small and stable. No Kafka here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Literal

import numpy as np

__all__ = ["AnomalyEvent", "ProcessResult", "ReadingStatus"]


class ReadingStatus(IntEnum):
    """What happened to one reading inside :meth:`StreamingDetector.process`."""

    SCORED = 0
    """Advanced the device's state and got an anomaly score."""
    WARMUP = 1
    """Advanced the device's state, but the device is still warming up (or restarted after a gap): no score."""
    DUPLICATE = 2
    """Same timestamp as the device's previous reading: dropped, state untouched."""
    OUT_OF_ORDER = 3
    """Older than the device's previous reading: dropped, state untouched."""
    EMPTY = 4
    """Every feature missing: nothing to judge or learn from; dropped, state untouched (but see ``CONTEXT``)."""
    CONTEXT = 5
    """No feature, but context values (a bundle with context inputs): the device's last known context is
    updated, nothing is scored and the network does not step."""

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class AnomalyEvent:
    """A device entering (``start``) or leaving (``end``) an anomaly episode.

    ``expected`` and ``actual`` are in the sensors' own units, keyed by feature name;
    ``contributions`` are each feature's share of the squared Mahalanobis distance of the
    triggering reading (they sum to 1). ``row`` is the index of the triggering reading in the
    :class:`~anomaly.readings.ReadingBatch` handed to ``process``, so a caller can map it back to its
    source (a Kafka offset, a CSV row).
    """

    device_id: str
    ts_ms: int
    kind: Literal["start", "end"]
    score: float
    threshold: float
    expected: dict[str, float]
    actual: dict[str, float]
    contributions: dict[str, float]
    model_name: str
    model_version: str
    row: int
    episode_start_ms: int | None = None

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out.pop("row")
        out["model"] = {"name": out.pop("model_name"), "version": out.pop("model_version")}
        return out


@dataclass
class ProcessResult:
    """Per-reading outcomes of one ``process`` call, aligned with the input batch (N readings).

    Attributes
    ----------
    scores : numpy.ndarray
        [N] float32 anomaly score in [0, 1]; NaN where the reading was not scored. Under the threshold
        episode rule: the decision statistic (smoothed surprise) as ``1 - 10**-surprise``. Under the
        novelty rule: the novelty *alert* score (the novelty, capped below the threshold while the
        device is refractory), so ``scores >= threshold`` exactly where the detector alerts.
    raw_scores : numpy.ndarray
        [N] float32 unsmoothed score of the reading alone (calibrated tail probability); NaN if not scored.
    status : numpy.ndarray
        [N] int8 :class:`ReadingStatus` values.
    anomalous : numpy.ndarray
        [N] bool, True where the device is inside an anomaly episode after this reading.
    expected : numpy.ndarray
        [N, F] float32 predicted values in sensor units; NaN where the reading was dropped or is the
        first of its device (nothing to predict from).
    events : list[AnomalyEvent]
        Episode starts and ends, in processing order.
    gap_resets : int
        Devices whose state was reset because of a gap longer than the configured limit.
    novelty : numpy.ndarray
        [N] float32 novelty score in [0, 1) (see :mod:`anomaly.adaptation`) under the novelty rule,
        uncapped; NaN where not scored and everywhere under the threshold rule.
    alerts : numpy.ndarray
        [N] bool, readings that raise an alert (a page): novelty alerts under the novelty rule (which
        need not open an episode: a value leaving its range alerts without one), episode starts under
        the threshold rule.
    """

    scores: np.ndarray
    raw_scores: np.ndarray
    status: np.ndarray
    anomalous: np.ndarray
    expected: np.ndarray
    events: list[AnomalyEvent] = field(default_factory=list)
    gap_resets: int = 0
    novelty: np.ndarray = None  # type: ignore[assignment]  # filled in __post_init__
    alerts: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.novelty is None:
            self.novelty = np.full(n, np.nan, dtype=np.float32)
        if self.alerts is None:
            self.alerts = np.zeros(n, dtype=bool)

    def counts(self) -> dict[str, int]:
        """Readings per outcome, keyed by :attr:`ReadingStatus.label`."""
        bins = np.bincount(self.status.astype(np.int64), minlength=len(ReadingStatus))
        return {s.label: int(bins[s.value]) for s in ReadingStatus}
