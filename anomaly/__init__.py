"""sensor-anomaly's ML core: a streaming LSTM forecaster with per-device memory.

The core knows nothing of Kafka or HTTP; the notebook, the CLI and the stream processor all call
it the same way::

    bundle = anomaly.fit(frame, features=["temp", "vibration"], time_col="ts", device_col="device")
    detector = anomaly.StreamingDetector(bundle)
    result = detector.process(anomaly.ReadingBatch.from_frame(new_frame, bundle.features, "ts", "device"))

A higher score means more anomalous; scores are calibrated tail probabilities in [0, 1].
"""

from anomaly.bundle import DetectorConfig, ModelBundle
from anomaly.detector import StreamingDetector, score_frame
from anomaly.errors import AnomalyError
from anomaly.events import AnomalyEvent, ProcessResult, ReadingStatus
from anomaly.readings import ReadingBatch
from anomaly.training import TrainingConfig, fit

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
