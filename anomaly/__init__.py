"""sensor-anomaly's ML core: a streaming LSTM forecaster with per-device memory.

The core knows nothing of Kafka or HTTP; the notebook, the CLI and the stream processor all call
it the same way::

    bundle = anomaly.fit(frame, features=["temp", "vibration"], time_col="ts", device_col="device")
    detector = anomaly.StreamingDetector(bundle)
    result = detector.process(anomaly.ReadingBatch.from_frame(new_frame, bundle.features, "ts", "device"))

A higher score means more anomalous; scores are calibrated tail probabilities in [0, 1].

The names below are imported on first use (PEP 562), so ``import anomaly`` and ``--help`` do not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AnomalyError",
    "AnomalyEvent",
    "DetectorConfig",
    "ModelBundle",
    "ProcessResult",
    "ReadingBatch",
    "ReadingStatus",
    "StreamingDetector",
    "TrainingConfig",
    "fit",
    "score_frame",
]

_HOME = {
    "AnomalyError": "anomaly.errors", "AnomalyEvent": "anomaly.events", "DetectorConfig": "anomaly.bundle",
    "ModelBundle": "anomaly.bundle", "ProcessResult": "anomaly.events", "ReadingBatch": "anomaly.readings",
    "ReadingStatus": "anomaly.events", "StreamingDetector": "anomaly.detector", "TrainingConfig": "anomaly.training",
    "fit": "anomaly.training", "score_frame": "anomaly.detector",
}

if TYPE_CHECKING:
    from anomaly.bundle import DetectorConfig, ModelBundle
    from anomaly.detector import StreamingDetector, score_frame
    from anomaly.errors import AnomalyError
    from anomaly.events import AnomalyEvent, ProcessResult, ReadingStatus
    from anomaly.readings import ReadingBatch
    from anomaly.training import TrainingConfig, fit


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'anomaly' has no attribute {name!r}")
