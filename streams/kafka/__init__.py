"""Kafka client specifics: admin operations (topics, broker readiness) apart from the processing loop."""
