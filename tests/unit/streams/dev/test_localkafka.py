"""Unit tests for streams/dev/localkafka.py: config rendering, ports, prerequisites, pid safety, CLI.

No broker is started here (that is tests/integration/test_broker.py); where a test needs Java to
"exist", a tiny fake ``java`` script prints a version and nothing more is launched.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import stat
from pathlib import Path

import pytest

from streams.dev import localkafka
from streams.dev.localkafka import (
    DEPLOY_DIR,
    KAFKA_VERSION,
    KafkaJarsMissingError,
    LocalKafka,
    LocalKafkaError,
    MissingPrerequisiteError,
    ensure_jars,
    new_cluster_id,
    pick_free_ports,
    render_server_properties,
)


def _props(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


@pytest.fixture
def fake_libs(tmp_path: Path) -> Path:
    """A folder that looks like broker jars to ensure_jars (empty files; never run)."""
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").write_bytes(b"")
    (libs / "log4j-core-2.25.3.jar").write_bytes(b"")
    return libs


def _fake_java(tmp_path: Path, version_line: str) -> str:
    script = tmp_path / "java"
    script.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SENSOR_ANOMALY_CACHE", str(cache))
    monkeypatch.delenv(localkafka.LIBS_ENV, raising=False)
    return cache


# ---------------------------------------------------------------- config rendering


def test_default_template_renders_a_single_node_kraft_broker_with_eos_settings() -> None:
    text = render_server_properties(broker_port=19092, controller_port=19093, log_dirs="/data/kraft")
    props = _props(text)
    assert not [line for line in text.splitlines() if "$" in line and not line.startswith("#")]
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["log.dirs"] == "/data/kraft"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    replication = {k: v for k, v in props.items() if k.endswith(("replication.factor", "min.isr"))}
    assert replication and set(replication.values()) == {"1"}
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"


def test_extra_properties_replace_template_lines_and_append_new_keys() -> None:
    sasl_listeners = "PLAINTEXT://127.0.0.1:1,SASL_PLAINTEXT://127.0.0.1:3,CONTROLLER://127.0.0.1:2"
    text = render_server_properties(
        broker_port=1,
        controller_port=2,
        log_dirs="/d",
        extra_properties={"listeners": sasl_listeners, "sasl.enabled.mechanisms": "SCRAM-SHA-512"},
    )
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("listeners=")] == [f"listeners={sasl_listeners}"]
    assert lines[-1] == "sasl.enabled.mechanisms=SCRAM-SHA-512"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"broker_port": 0, "controller_port": 2}, "broker_port must be in 1..65535, got 0"),
        ({"broker_port": 1, "controller_port": 70000}, "controller_port must be in 1..65535"),
        ({"broker_port": 5, "controller_port": 5}, "must differ"),
        ({"broker_port": 1, "controller_port": 2, "extra_properties": {"bad key": "x"}}, "'bad key'"),
        ({"broker_port": 1, "controller_port": 2, "extra_properties": {"a.b": "x\ny=z"}}, "one line"),
        ({"broker_port": 1, "controller_port": 2, "template": "x=${nope}\n"}, "placeholder without a value"),
    ],
)
def test_render_rejects_bad_settings_naming_them(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        render_server_properties(log_dirs="/d", **kwargs)


def test_pom_and_module_agree_on_the_kafka_version() -> None:
    pom = (DEPLOY_DIR / "pom.xml").read_text()
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    assert match is not None and match.group(1) == KAFKA_VERSION


def test_log4j2_config_writes_server_log_into_the_logs_dir() -> None:
    xml = (DEPLOY_DIR / "log4j2.xml").read_text()
    assert 'fileName="${logsDir}/server.log"' in xml
    assert "${sys:kafka.logs.dir" in xml


# ---------------------------------------------------------------- ports and ids


def test_picked_ports_are_distinct_and_bindable() -> None:
    ports = pick_free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_pick_free_ports_rejects_zero() -> None:
    with pytest.raises(ValueError, match="count must be >= 1"):
        pick_free_ports(0)


def test_cluster_id_is_22_char_urlsafe_base64_of_16_bytes() -> None:
    for _ in range(50):
        cid = new_cluster_id()
        assert len(cid) == 22 and not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_data_dir_reuses_stored_ports_and_cluster_id(tmp_path: Path) -> None:
    first = LocalKafka(tmp_path / "k")
    first._prepare_data_dir()
    second = LocalKafka(tmp_path / "k")
    second._prepare_data_dir()
    assert (second.port, second.controller_port, second.cluster_id) == (
        first.port,
        first.controller_port,
        first.cluster_id,
    )
    assert second.bootstrap == f"127.0.0.1:{first.port}"
    assert _props((tmp_path / "k" / "server.properties").read_text())["log.dirs"] == str(tmp_path / "k" / "kraft")


def test_a_taken_port_is_reported_before_anything_starts(tmp_path: Path, fake_libs: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        kafka = LocalKafka(tmp_path / "k", port=port, libs_dir=fake_libs, java=_fake_java(tmp_path, 'version "17.0.1"'))
        with pytest.raises(LocalKafkaError, match=f"broker port {port} on 127.0.0.1 is already in use"):
            kafka.start()
    assert not (tmp_path / "k" / "localkafka.pid").exists()


def test_bootstrap_before_any_start_says_so(tmp_path: Path) -> None:
    with pytest.raises(LocalKafkaError, match="no broker has been started"):
        _ = LocalKafka(tmp_path / "never").bootstrap


def test_bad_heap_is_rejected() -> None:
    with pytest.raises(ValueError, match="heap must look like"):
        LocalKafka(heap="lots")


def test_jvm_gc_choice_replaces_the_default_gc(tmp_path: Path) -> None:
    default = LocalKafka(tmp_path / "a")._java_command(Path("/libs"), "kafka.Kafka")
    serial = LocalKafka(tmp_path / "b", jvm_options=["-XX:+UseSerialGC"])._java_command(Path("/libs"), "kafka.Kafka")
    assert "-XX:+UseG1GC" in default
    assert "-XX:+UseG1GC" not in serial and "-XX:+UseSerialGC" in serial
    assert serial[serial.index("-cp") + 1] == "/libs/*"
    assert serial[-1] == "kafka.Kafka"


# ---------------------------------------------------------------- prerequisites


def test_missing_jars_without_fetching_name_the_command_to_run(tmp_path: Path, empty_cache: Path) -> None:
    kafka = LocalKafka(tmp_path / "k", fetch_jars=False)
    with pytest.raises(KafkaJarsMissingError) as info:
        kafka.start()
    message = str(info.value)
    assert "fetch-jars.sh" in message
    assert str(empty_cache / f"kafka-{KAFKA_VERSION}" / "libs") in message
    assert not kafka.is_running()
    assert not (tmp_path / "k").exists()  # nothing written, nothing started


def test_missing_jars_and_no_maven_say_to_install_maven(
    tmp_path: Path, empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    with pytest.raises(KafkaJarsMissingError, match=r"Maven \(mvn\) is not on PATH"):
        ensure_jars()


def test_explicit_libs_dir_without_jars_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KafkaJarsMissingError, match="no Kafka broker jars"):
        LocalKafka(tmp_path / "k", libs_dir=tmp_path).start()


def test_explicit_and_env_libs_dirs_are_used_as_is(fake_libs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ensure_jars(fake_libs) == fake_libs
    monkeypatch.setenv(localkafka.LIBS_ENV, str(fake_libs))
    assert ensure_jars() == fake_libs


def test_cache_marker_must_match_the_pom(fake_libs: Path, empty_cache: Path) -> None:
    libs = empty_cache / f"kafka-{KAFKA_VERSION}" / "libs"
    libs.parent.mkdir(parents=True)
    fake_libs.rename(libs)
    (libs / ".complete").write_text(localkafka._pom_digest() or "")
    assert ensure_jars(fetch=False) == libs


@pytest.mark.parametrize(
    ("version_line", "message"),
    [
        ('openjdk version "1.8.0_292"', r"needs Java 17\+, but .* is Java 8"),
        ('openjdk version "11.0.2" 2019-01-15', r"needs Java 17\+, but .* is Java 11"),
        ("no version here", "cannot read the Java version"),
    ],
)
def test_old_or_broken_java_is_refused(tmp_path: Path, fake_libs: Path, version_line: str, message: str) -> None:
    kafka = LocalKafka(tmp_path / "k", libs_dir=fake_libs, java=_fake_java(tmp_path, version_line))
    with pytest.raises(MissingPrerequisiteError, match=message):
        kafka.start()
    assert not (tmp_path / "k").exists()


def test_absent_java_is_a_missing_prerequisite(tmp_path: Path, fake_libs: Path) -> None:
    kafka = LocalKafka(tmp_path / "k", libs_dir=fake_libs, java=str(tmp_path / "no-java"))
    with pytest.raises(MissingPrerequisiteError, match="needs Java 17"):
        kafka.start()


# ---------------------------------------------------------------- pid safety and CLI


def test_a_pid_file_naming_another_process_is_not_our_broker(tmp_path: Path) -> None:
    data = tmp_path / "k"
    data.mkdir()
    (data / "localkafka.pid").write_text(f"{os.getpid()}\n")  # this pytest process, not a broker
    kafka = LocalKafka(data)
    assert kafka.pid is None and not kafka.is_running()
    kafka.stop()  # must not signal pytest
    assert not (data / "localkafka.pid").exists()


def test_cli_status_and_down_on_a_stopped_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert localkafka.main(["status", "--data-dir", str(tmp_path / "k")]) == 1
    assert "stopped" in capsys.readouterr().out
    assert localkafka.main(["down", "--data-dir", str(tmp_path / "k")]) == 0
    assert "not running" in capsys.readouterr().err


def test_cli_up_reports_missing_jars_as_an_error(
    tmp_path: Path, empty_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    assert localkafka.main(["up", "--data-dir", str(tmp_path / "k")]) == 1
    assert "error: Kafka broker jars are missing" in capsys.readouterr().err
