"""Integration tests run against a real Kafka broker: fixtures from ``tests/kafka_broker.py``.

``pytest_plugins`` is only honoured in the rootdir conftest, so the fixtures are imported here by
name (``tests/e2e/conftest.py`` can do the same). The repository root is on pytest's path
(``pythonpath = ["."]`` in pyproject.toml), so ``tests.kafka_broker`` imports as a module.
Every test here is marked ``@pytest.mark.kafka``.
"""

from __future__ import annotations

from tests.kafka_broker import kafka_bootstrap, kafka_broker, kafka_topic, local_kafka

__all__ = ["kafka_bootstrap", "kafka_broker", "kafka_topic", "local_kafka"]
