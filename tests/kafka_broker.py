"""Pytest fixtures that give integration and e2e tests a real Kafka broker, one per test session.

Why this module exists: tests that claim Kafka behaviour (commits, transactions, rebalances,
restarts) must run against a real broker, and the machines that run them differ: a developer may
already have one, CI may have a Docker engine or only Java. The session fixture picks, in order:

1. ``$KAFKA_BOOTSTRAP_SERVERS`` if set (a broker someone else runs; never stopped here);
2. a testcontainers ``KafkaContainer`` (Confluent image, KRaft) when a Docker engine answers a ping
   within about a second (``$KAFKA_TEST_IMAGE`` overrides the image);
3. :class:`streams.dev.localkafka.LocalKafka`, started once per session from Maven-resolved jars
   (fetched on first use; needs Java 17+ and Maven).

If none can be had, tests that need the broker are skipped, except under ``CI=true``, where they
FAIL: CI must never pass by skipping its broker tests. A broker that is there but fails to start
is always a failure.

What it must not do: mock a broker, share topics between tests (``kafka_topic`` makes unique
names), or stop a broker it did not start.

Use it from a ``conftest.py`` by importing the fixtures (``pytest_plugins`` is only honoured in
the rootdir conftest)::

    from tests.kafka_broker import kafka_bootstrap, kafka_broker, kafka_topic, local_kafka  # noqa: F401
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn

import pytest

from streams.dev.localkafka import LocalKafka, MissingPrerequisiteError
from streams.errors import BrokerUnavailableError
from streams.kafka.admin import TopicSpec, admin_client, ensure_topics, wait_for_broker

__all__ = [
    "ENV_BOOTSTRAP",
    "KafkaBroker",
    "docker_engine_available",
    "kafka_bootstrap",
    "kafka_broker",
    "kafka_topic",
    "local_kafka",
]

logger = logging.getLogger(__name__)

ENV_BOOTSTRAP = "KAFKA_BOOTSTRAP_SERVERS"
ENV_IMAGE = "KAFKA_TEST_IMAGE"
#: testcontainers' own default image (Kafka 3.6, KRaft capable); override with $KAFKA_TEST_IMAGE.
DEFAULT_IMAGE = "confluentinc/cp-kafka:7.6.0"
#: A broker named by $KAFKA_BOOTSTRAP_SERVERS gets this long to answer (it may still be starting).
ENV_BROKER_WAIT_S = 30.0
#: A Docker engine that does not answer within this is treated as absent.
DOCKER_PING_TIMEOUT_S = 1.0

TopicFactory = Callable[..., str]


@dataclass(frozen=True)
class KafkaBroker:
    """The broker a test session uses.

    ``local`` is the :class:`LocalKafka` when this session started one (``source == "local"``), so
    a test that must restart the session broker can; otherwise ``None``.
    """

    bootstrap: str
    source: Literal["env", "container", "local"]
    local: LocalKafka | None = None


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _unavailable(reason: str) -> NoReturn:
    """Skip (locally) or fail (under CI=true): no broker can be had."""
    if _in_ci():
        pytest.fail(f"CI=true and no Kafka broker is available: {reason}", pytrace=False)
    pytest.skip(f"no Kafka broker available: {reason}")


def docker_engine_available(timeout_s: float = DOCKER_PING_TIMEOUT_S) -> bool:
    """Whether a Docker engine answers a ping within ``timeout_s`` (False fast when none runs).

    Examples
    --------
    >>> isinstance(docker_engine_available(0.5), bool)
    True
    """
    host = os.environ.get("DOCKER_HOST", "")
    if not host and not Path("/var/run/docker.sock").exists():
        return False  # the usual "CLI installed, no engine" case: no import, no connection attempt
    try:
        import docker  # testcontainers' dependency

        client = docker.from_env(timeout=max(1, round(timeout_s)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as exc:  # any failure means "no usable engine"; the reason is only logged
        logger.debug("no Docker engine: %r", exc)
        return False


def _start_or_reason(broker: LocalKafka) -> str | None:
    """Start ``broker``; return why it cannot run if a prerequisite is missing, else None."""
    try:
        broker.start()
    except MissingPrerequisiteError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def _container_broker() -> Iterator[str]:
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # testcontainers < 4.9
        from testcontainers.kafka import KafkaContainer
    image = os.environ.get(ENV_IMAGE, DEFAULT_IMAGE)
    container = (
        KafkaContainer(image)
        .with_kraft()
        # Exactly-once tests need the transaction state log creatable on one broker.
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env("KAFKA_MIN_INSYNC_REPLICAS", "1")
    )
    container.start(timeout=120)
    try:
        yield container.get_bootstrap_server()
    finally:
        container.stop()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """The session's broker: ``$KAFKA_BOOTSTRAP_SERVERS``, else a container, else a LocalKafka."""
    env = os.environ.get(ENV_BOOTSTRAP, "").strip()
    if env:
        logger.info("using the Kafka broker at $%s=%s", ENV_BOOTSTRAP, env)
        try:
            wait_for_broker(env, timeout_s=ENV_BROKER_WAIT_S)
        except BrokerUnavailableError as exc:  # configured explicitly, so never a skip
            pytest.fail(f"${ENV_BOOTSTRAP} is set but {exc}", pytrace=False)
        yield KafkaBroker(bootstrap=env, source="env")
        return

    if docker_engine_available():
        logger.info("Docker engine found: starting a Kafka container")
        with _container_broker() as bootstrap:
            yield KafkaBroker(bootstrap=bootstrap, source="container")
        return

    data_dir = tmp_path_factory.mktemp("kafka-session")
    broker = LocalKafka(data_dir, start_timeout_s=120.0)
    missing = _start_or_reason(broker)
    if missing:
        _unavailable(f"no ${ENV_BOOTSTRAP}, no Docker engine, and LocalKafka cannot run: {missing}")
    # BrokerStartError and other LocalKafkaErrors propagate: a broker that should start but does not
    # is a failure everywhere (its log tail is in the message; the logs stay in data_dir/logs).
    try:
        yield KafkaBroker(bootstrap=broker.bootstrap, source="local", local=broker)
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    """``host:port`` of the session's real Kafka broker (see :func:`kafka_broker`)."""
    return kafka_broker.bootstrap


@pytest.fixture
def kafka_topic(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[TopicFactory]:
    """Factory: ``kafka_topic(partitions=1, *, prefix=None, configs=None) -> name``.

    Each call creates a new topic named after the test plus a random suffix, waits until every
    partition has a leader, and returns its name. The topics are deleted after the test.
    """
    admin = admin_client(kafka_bootstrap, client_id="tests-kafka-topic")
    created: list[str] = []

    def create(partitions: int = 1, *, prefix: str | None = None, configs: Mapping[str, str] | None = None) -> str:
        base = prefix or re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-.")
        name = f"{base[:200]}-{uuid.uuid4().hex[:8]}"
        ensure_topics(admin, {name: TopicSpec(partitions=partitions, configs=dict(configs or {}))})
        created.append(name)
        return name

    try:
        yield create
    finally:
        if created:
            try:
                admin.delete_topics(created, raise_errors=False)
            except Exception as exc:  # cleanup only; a leftover uniquely named topic harms nothing
                logger.warning("could not delete test topics %s: %r", created, exc)
        admin.close()


@pytest.fixture
def local_kafka(tmp_path: Path) -> Iterator[LocalKafka]:
    """A dedicated, started :class:`LocalKafka` for one test, for tests that stop or restart it.

    Independent of the session broker, so restarting it disturbs no other test. Skipped (failed
    under CI=true) when Java or the jars cannot be had.
    """
    broker = LocalKafka(tmp_path / "kafka", start_timeout_s=120.0)
    missing = _start_or_reason(broker)
    if missing:
        _unavailable(f"LocalKafka cannot run: {missing}")
    try:
        yield broker
    finally:
        broker.stop()
