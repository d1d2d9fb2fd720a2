"""Kafka security end to end: the service's TLS/SASL settings against a broker that authenticates.

Against ``tests/secure_kafka.py``'s broker (SASL_PLAINTEXT and SASL_SSL listeners, users created with
``kafka-storage format --add-scram``):

* every client the service builds gets its security keywords from ``ServiceConfig.kafka_security()``;
  with the right credentials a producer and a consumer built from them round-trip records over
  SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN, and over TLS with the CA file checked against the
  broker's certificate;
* the stream processor (admin client, consumer, producer and changelog consumer) scores readings
  with SCRAM-SHA-512 over SASL_SSL, as the Kubernetes ConfigMap configures it;
* a wrong password fails within a bounded time, and the broker's own log says why (invalid
  credentials); the service command itself then stops with exit code 2 and a clear error.

The first tests need no broker: how :mod:`streams.dev.localkafka` renders the SASL listeners.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from anomaly.bundle import ModelBundle
from streams.config import Secret, ServiceConfig
from streams.dev.localkafka import LocalKafka, security_properties
from streams.errors import ConfigError
from streams.kafka.admin import TopicSpec, admin_client, ensure_topics
from tests.integration.helpers import ProcessorThread, fleet_messages, produce
from tests.secure_kafka import SecureBroker, secure_kafka, security_model

__all__ = ["secure_kafka", "security_model"]

#: A client with wrong credentials must give up within this (kafka-python's bootstrap timeout below),
#: instead of the 30 s default or, for the service, retrying forever.
AUTH_FAILURE_BOUND_S = 5.0


# ---------------------------------------------------------------- rendering (no broker)


def test_sasl_listener_properties_keep_inter_broker_and_controller_traffic_plaintext() -> None:
    props = security_properties(broker_port=9092, controller_port=9093, sasl_users={"alice": "a-1", "bob": "b.2"},
                                sasl_plaintext_port=9094, sasl_ssl_port=9095, tls_keystore="/k/keystore.pem")
    assert props["listeners"] == ("PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093,"
                                  "SASL_PLAINTEXT://127.0.0.1:9094,SASL_SSL://127.0.0.1:9095")
    assert "CONTROLLER" not in props["advertised.listeners"]
    assert props["listener.security.protocol.map"].split(",") == [
        "PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT", "SASL_PLAINTEXT:SASL_PLAINTEXT", "SASL_SSL:SASL_SSL"]
    assert "inter.broker.listener.name" not in props  # the template's PLAINTEXT stays
    for listener in ("sasl_plaintext", "sasl_ssl"):
        assert props[f"listener.name.{listener}.sasl.enabled.mechanisms"] == "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
        assert props[f"listener.name.{listener}.scram-sha-512.sasl.jaas.config"].startswith(
            "org.apache.kafka.common.security.scram.ScramLoginModule required")
        assert 'user_alice="a-1" user_bob="b.2";' in props[f"listener.name.{listener}.plain.sasl.jaas.config"]
    assert props["listener.name.sasl_ssl.ssl.keystore.type"] == "PEM"
    assert props["listener.name.sasl_ssl.ssl.keystore.location"] == "/k/keystore.pem"


@pytest.mark.parametrize(("users", "message"), [
    ({}, "at least one user"),
    ({"al ice": "pw"}, "user name must be"),
    ({"alice": 'p"w'}, "password of 'alice' must be"),
    ({"alice": "pw,x]"}, "password of 'alice' must be"),
])
def test_credentials_that_would_break_jaas_or_add_scram_syntax_are_refused(users: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        security_properties(broker_port=1, controller_port=2, sasl_users=users, sasl_plaintext_port=3)


def test_tls_listener_needs_sasl_users(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs sasl_users"):
        LocalKafka(tmp_path, tls_keystore=tmp_path / "keystore.pem")


def test_sasl_settings_without_credentials_stop_start_up_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SASL_SSL needs sasl_mechanism, sasl_username and sasl_password"):
        ServiceConfig.from_sources(env={"SENSOR_ANOMALY_BOOTSTRAP_SERVERS": "k:9093",
                                        "SENSOR_ANOMALY_MODEL_DIR": str(tmp_path),
                                        "SENSOR_ANOMALY_SECURITY_PROTOCOL": "SASL_SSL",
                                        "SENSOR_ANOMALY_SASL_MECHANISM": "SCRAM-SHA-512"})


def test_security_keywords_from_environment_match_kafka_python_names(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    config = ServiceConfig.from_sources(env={
        "SENSOR_ANOMALY_BOOTSTRAP_SERVERS": "k:9093", "SENSOR_ANOMALY_MODEL_DIR": str(tmp_path),
        "SENSOR_ANOMALY_SECURITY_PROTOCOL": "SASL_SSL", "SENSOR_ANOMALY_SASL_MECHANISM": "SCRAM-SHA-512",
        "SENSOR_ANOMALY_SASL_USERNAME": "svc", "SENSOR_ANOMALY_SASL_PASSWORD": "pw",
        "SENSOR_ANOMALY_SSL_CAFILE": str(ca)})
    assert config.kafka_security() == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "svc",
        "sasl_plain_password": "pw", "ssl_cafile": str(ca), "ssl_check_hostname": True}
    assert "pw" not in repr(config.redacted())
    for name in config.kafka_security():  # every keyword is one kafka-python's clients accept
        for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
            assert name in client.DEFAULT_CONFIG, f"{client.__name__} does not know {name}"


# ---------------------------------------------------------------- against the authenticating broker


def _round_trip(broker: SecureBroker, protocol: str, mechanism: str) -> list[bytes]:
    topic = f"security-{protocol.lower()}-{mechanism.lower()}-{uuid.uuid4().hex[:8]}"
    admin = admin_client(broker.bootstrap)
    try:
        ensure_topics(admin, {topic: TopicSpec(partitions=1)})
    finally:
        admin.close()
    client = broker.client_config(protocol, mechanism)
    producer = KafkaProducer(**client, bootstrap_timeout_ms=30_000, acks="all")
    for i in range(3):
        producer.send(topic, key=b"dev-1", value=f"reading {i}".encode())
    producer.flush(timeout=30)
    producer.close()
    consumer = KafkaConsumer(**client, group_id=f"g-{uuid.uuid4().hex[:8]}", auto_offset_reset="earliest",
                             enable_auto_commit=False, bootstrap_timeout_ms=30_000)
    consumer.assign([TopicPartition(topic, 0)])
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(values) < 3 and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            values.extend(r.value for r in records)
    consumer.close()
    return values


@pytest.mark.kafka
@pytest.mark.parametrize(("protocol", "mechanism"), [
    ("SASL_PLAINTEXT", "SCRAM-SHA-512"),
    ("SASL_PLAINTEXT", "SCRAM-SHA-256"),
    ("SASL_PLAINTEXT", "PLAIN"),
    ("SASL_SSL", "SCRAM-SHA-512"),
])
def test_right_credentials_produce_and_consume(secure_kafka: SecureBroker, protocol: str, mechanism: str) -> None:
    assert _round_trip(secure_kafka, protocol, mechanism) == [b"reading 0", b"reading 1", b"reading 2"]


@pytest.mark.kafka
def test_the_processor_scores_readings_over_sasl_ssl_with_scram(secure_kafka: SecureBroker, security_model: Path,
                                                                tmp_path: Path) -> None:
    topic = f"secure-readings-{uuid.uuid4().hex[:8]}"
    messages, _ = fleet_messages(60)
    sent = produce(secure_kafka.bootstrap, topic, messages)  # test data through the plaintext listener
    config = ServiceConfig(
        bootstrap_servers=secure_kafka.sasl_ssl, model_dir=security_model, input_topic=topic,
        events_topic=f"{topic}.events", dlq_topic=f"{topic}.dlq", group_id=f"g-{uuid.uuid4().hex[:8]}",
        input_partitions=2, commit_interval_s=0.2, poll_timeout_ms=50, security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512", sasl_username=secure_kafka.user, sasl_password=Secret(secure_kafka.password),
        ssl_cafile=secure_kafka.ca_file)
    worker = ProcessorThread(config, ModelBundle.load(security_model))
    worker.wait_for(lambda s: s.records >= sent and s.commits > 0)
    stats = worker.stop()
    assert stats.readings["scored"] + stats.readings["warmup"] == sent
    assert stats.readings["scored"] > 0
    # the offsets were committed through the authenticated consumer
    consumer = KafkaConsumer(**secure_kafka.client_config("SASL_SSL"), group_id=config.group_id,
                             enable_auto_commit=False)
    committed = sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in (0, 1))
    consumer.close()
    assert committed == sent


@pytest.mark.kafka
@pytest.mark.parametrize("client", ["producer", "consumer", "admin"])
def test_wrong_password_fails_within_the_bootstrap_timeout_and_the_broker_says_why(
        secure_kafka: SecureBroker, client: str) -> None:
    config = secure_kafka.client_config("SASL_PLAINTEXT", "SCRAM-SHA-512", password="wrong-password")
    server_log = secure_kafka.local.logs_dir / "server.log"
    marker = "Failed authentication with /127.0.0.1"
    before = server_log.read_text(errors="replace").count(marker)
    started = time.monotonic()
    factory = {"producer": KafkaProducer, "consumer": KafkaConsumer, "admin": KafkaAdminClient}[client]
    with pytest.raises(KafkaError, match="Unable to bootstrap"):
        built = factory(**config, bootstrap_timeout_ms=int(AUTH_FAILURE_BOUND_S * 1000))
        built.close()  # not reached: kafka-python 3.0 bootstraps in the constructor
    elapsed = time.monotonic() - started
    assert elapsed < AUTH_FAILURE_BOUND_S + 5, f"gave up after {elapsed:.1f} s"
    # kafka-python 3.0.12 surfaces only a bootstrap timeout (the broker usually drops the connection
    # before its error response is read); the broker logs the real reason ("... due to invalid
    # credentials with SASL mechanism SCRAM-SHA-512").
    deadline = time.monotonic() + 10
    while server_log.read_text(errors="replace").count(marker) <= before:
        assert time.monotonic() < deadline, "the broker logged no failed authentication"
        time.sleep(0.2)


@pytest.mark.kafka
def test_serve_with_a_wrong_password_stops_with_a_clear_error(secure_kafka: SecureBroker, security_model: Path) -> None:
    env = dict(os.environ)
    env.update({
        "SENSOR_ANOMALY_BOOTSTRAP_SERVERS": secure_kafka.sasl_plaintext,
        "SENSOR_ANOMALY_MODEL_DIR": str(security_model),
        "SENSOR_ANOMALY_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SENSOR_ANOMALY_SASL_MECHANISM": "SCRAM-SHA-512",
        "SENSOR_ANOMALY_SASL_USERNAME": secure_kafka.user, "SENSOR_ANOMALY_SASL_PASSWORD": "wrong-password",
        "SENSOR_ANOMALY_METRICS_HOST": "127.0.0.1", "SENSOR_ANOMALY_METRICS_PORT": "0",
        "SENSOR_ANOMALY_GROUP_ID": f"g-{uuid.uuid4().hex[:8]}",
    })
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"serve kept running for 45 s with a wrong password:\n{out[-2000:]}")
    assert proc.returncode == 2
    last = out.strip().splitlines()[-1]
    assert "authentication" in last.lower() and secure_kafka.user in last
