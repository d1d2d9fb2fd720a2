"""The service around the detector: Kafka in and out, per-device state changelog, metrics.

``streams`` adapts :mod:`anomaly` (which knows nothing of Kafka) to Kafka topics.
"""
