"""Per-device state beside Kafka: the compacted changelog's encoding and restore."""
