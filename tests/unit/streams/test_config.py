"""streams.config: precedence of flags over environment over defaults, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.config import ServiceConfig
from streams.errors import ConfigError

BASE = {"SENSOR_ANOMALY_BOOTSTRAP_SERVERS": "k:9092", "SENSOR_ANOMALY_MODEL_DIR": "/models/m"}


def test_defaults_environment_and_flags_in_that_order():
    config = ServiceConfig.from_sources(env=BASE)
    assert config.changelog_buckets == 64 and config.commit_interval_s == 1.0 and config.model_dir == Path("/models/m")
    env = BASE | {"SENSOR_ANOMALY_CHANGELOG_BUCKETS": "256", "SENSOR_ANOMALY_COMMIT_INTERVAL_S": "5"}
    config = ServiceConfig.from_sources(env=env)
    assert (config.changelog_buckets, config.commit_interval_s) == (256, 5.0)
    config = ServiceConfig.from_sources({"commit_interval_s": 2.5, "group_id": None}, env=env)
    assert config.commit_interval_s == 2.5 and config.group_id == "sensor-anomaly"  # None = flag not given


def test_bootstrap_falls_back_to_kafka_bootstrap_servers():
    config = ServiceConfig.from_sources(env={"KAFKA_BOOTSTRAP_SERVERS": "b:9092", "SENSOR_ANOMALY_MODEL_DIR": "m"})
    assert config.bootstrap_servers == "b:9092"


@pytest.mark.parametrize(("env", "named"), [
    ({"SENSOR_ANOMALY_CHANGELOG_BUCKETS": "0"}, "changelog_buckets"),
    ({"SENSOR_ANOMALY_CHANGELOG_BUCKETS": "70000"}, "changelog_buckets"),
    ({"SENSOR_ANOMALY_CHANGELOG_BUCKETS": "many"}, "SENSOR_ANOMALY_CHANGELOG_BUCKETS"),
    ({"SENSOR_ANOMALY_COMMIT_INTERVAL_S": "-1"}, "commit_interval_s"),
    ({"SENSOR_ANOMALY_COMMIT_INTERVAL_S": "nan"}, "SENSOR_ANOMALY_COMMIT_INTERVAL_S"),
    ({"SENSOR_ANOMALY_PROCESSING_GUARANTEE": "maybe"}, "processing_guarantee"),
    ({"SENSOR_ANOMALY_METRICS_PORT": "70000"}, "metrics_port"),
    ({"SENSOR_ANOMALY_EVENTS_TOPIC": "sensor.readings"}, "events_topic"),
    ({"SENSOR_ANOMALY_SECURITY_PROTOCOL": "SASL_SSL"}, "sasl_mechanism"),
])
def test_a_bad_value_stops_with_a_message_naming_the_setting(env, named):
    with pytest.raises(ConfigError, match=named):
        ServiceConfig.from_sources(env=BASE | env)


def test_missing_required_settings_name_the_flag_and_the_variable():
    with pytest.raises(ConfigError, match="--model or SENSOR_ANOMALY_MODEL_DIR"):
        ServiceConfig.from_sources(env={"KAFKA_BOOTSTRAP_SERVERS": "b:9092"})
    with pytest.raises(ConfigError, match="unknown setting 'bogus'"):
        ServiceConfig.from_sources({"bogus": 1}, env=BASE)
