"""``sensor-anomaly export`` against the real broker: a time range by timestamp offsets, bad messages counted."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from kafka import KafkaProducer

from anomaly.events import AnomalyEvent
from anomaly.synthetic import FleetSpec, simulate_fleet
from streams.cli import main
from streams.codec import encode_event, encode_reading
from streams.export import export_topic

pytestmark = pytest.mark.kafka

STEPS = 120
INTERVAL_MS = 1000


@pytest.fixture(scope="module")
def fleet() -> tuple[FleetSpec, pd.DataFrame]:
    # record timestamps near now: the broker's time-based retention would delete far older segments
    start = (int(time.time() * 1000) // 1000) * 1000 - 3_600_000
    spec = FleetSpec(n_devices=5, seed=2, start_ms=start, interval_ms=INTERVAL_MS, cycle_period_steps=100)
    return spec, simulate_fleet(spec, STEPS).readings


def send_all(bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes | None, int]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for key, value, ts in items:
        producer.send(topic, key=key, value=value, timestamp_ms=ts)
    producer.flush(timeout=60)
    producer.close()


@pytest.fixture(scope="module")
def readings_topic(kafka_bootstrap, fleet, tmp_path_factory):
    """The fleet's readings (record timestamp = reading time) plus bad messages at known times."""
    from streams.kafka.admin import TopicSpec, admin_client, ensure_topics

    spec, frame = fleet
    topic = f"export-readings-{int(time.time() * 1e6)}"
    admin = admin_client(kafka_bootstrap)
    ensure_topics(admin, {topic: TopicSpec(partitions=3)})
    admin.close()
    features = list(spec.features)
    items = []
    for row in frame.itertuples(index=False):
        key, value = encode_reading(row.device_id, int(row.ts), {f: float(getattr(row, f)) for f in features})
        items.append((key, value, int(row.ts)))
    mid = spec.ts_of(STEPS // 2)
    items += [
        (b"dev-00001", b"{not json", mid),                                                     # invalid_json
        (b"dev-00002", b'{"device_id": "dev-00002", "ts": 1, "values": {"temp": 1.0}}', mid),  # bad_timestamp
        (b"dev-00003", b'{"device_id": "dev-00003", "ts": %d, "values": {"temp": "hot"}}' % mid, mid),
    ]
    # in time order, as a live producer sends: the offset range of [since, until) assumes that
    send_all(kafka_bootstrap, topic, sorted(items, key=lambda item: item[2]))
    return topic


def test_exports_exactly_the_time_range_and_counts_bad_messages(kafka_bootstrap, readings_topic, fleet, tmp_path):
    spec, frame = fleet
    since, until = spec.ts_of(30), spec.ts_of(90)
    out = tmp_path / "history.parquet"
    summary = export_topic(kafka_bootstrap, readings_topic, out, since=since, until=until, progress=False)
    table = pd.read_parquet(out)
    expected = frame[(frame["ts"] >= since) & (frame["ts"] < until)].sort_values(["ts", "device_id"])
    assert list(table.columns) == ["device_id", "ts", *sorted(spec.features)]
    assert len(table) == len(expected) == 60 * spec.n_devices
    assert summary.rows == len(table) and summary.partitions == 3 and not summary.incomplete_partitions
    assert table["ts"].dtype == np.int64
    merged = table.merge(expected, on=["device_id", "ts"], suffixes=("", "_sent"), validate="one_to_one")
    for f in spec.features:
        np.testing.assert_allclose(merged[f], merged[f"{f}_sent"], rtol=1e-6)
    assert table["ts"].is_monotonic_increasing
    assert dict(summary.bad_messages) == {"invalid_json": 1, "bad_timestamp": 1, "wrong_type": 1}
    assert summary.messages == len(table) + 3, "only records inside the range were read"


def test_open_range_reads_everything_and_features_can_be_chosen(kafka_bootstrap, readings_topic, fleet, tmp_path):
    _, frame = fleet
    out = tmp_path / "all.csv"
    summary = export_topic(kafka_bootstrap, readings_topic, out, features=["current", "temp"], with_source=True,
                           progress=False)
    table = pd.read_csv(out)
    assert list(table.columns) == ["device_id", "ts", "current", "temp", "partition", "offset"]
    assert len(table) == len(frame) and summary.rows == len(frame)
    assert set(table["partition"]) == {0, 1, 2}
    assert summary.bad_messages["invalid_json"] == 1


def test_the_cli_writes_the_table_and_prints_a_summary(kafka_bootstrap, readings_topic, fleet, tmp_path, capsys):
    spec, _ = fleet
    out = tmp_path / "cli.csv.gz"
    code = main(["export", "--bootstrap", kafka_bootstrap, "--topic", readings_topic, "--since",
                 pd.Timestamp(spec.ts_of(100), unit="ms", tz="UTC").isoformat(), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    table = pd.read_csv(out)
    assert len(table) == (STEPS - 100) * spec.n_devices
    assert printed.startswith(f"exported {len(table)} rows from {len(table)} messages of 3 partition(s)")


def test_a_range_with_nothing_in_it_writes_an_empty_table(kafka_bootstrap, readings_topic, fleet, tmp_path):
    spec, _ = fleet
    out = tmp_path / "empty.parquet"
    summary = export_topic(kafka_bootstrap, readings_topic, out, since=spec.ts_of(STEPS + 10),
                           features=["temp"], progress=False)
    assert summary.rows == 0 and summary.messages == 0
    assert list(pd.read_parquet(out).columns) == ["device_id", "ts", "temp"]


def test_bad_arguments_are_named(kafka_bootstrap, readings_topic, tmp_path, capsys):
    assert main(["export", "--bootstrap", kafka_bootstrap, "--topic", readings_topic, "--out",
                 str(tmp_path / "x.json")]) == 2
    assert "unsupported extension" in capsys.readouterr().err
    assert main(["export", "--bootstrap", kafka_bootstrap, "--topic", "no-such-topic-xyz", "--out",
                 str(tmp_path / "x.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", "--bootstrap", kafka_bootstrap, "--topic", readings_topic, "--since", "2024-02-01",
                 "--until", "2024-01-01", "--out", str(tmp_path / "x.csv")]) == 2
    assert "empty time range" in capsys.readouterr().err


def test_events_export_flattens_events_and_skips_what_is_not_one(kafka_bootstrap, kafka_topic, tmp_path):
    topic = kafka_topic(partitions=2)
    now = int(time.time() * 1000)
    items = []
    for i, kind in enumerate(["start", "end", "start"]):
        event = AnomalyEvent(f"pump-{i % 2}", now - 10_000 + i * 1000, kind, 0.999, 0.99, {"temp": 70.0},
                             {"temp": 90.0}, {"temp": 0.8, "rpm": 0.2}, "lstm", "3", row=0,
                             episode_start_ms=now - 10_000)
        key, value = encode_event(event, "sensor.readings", i % 2, 100 + i)
        items.append((key, value, now - 10_000 + i * 1000))
    items.append((b"pump-0", b"garbage", now - 5000))
    send_all(kafka_bootstrap, topic, items)
    out = tmp_path / "events.parquet"
    code = main(["export", "--bootstrap", kafka_bootstrap, "--topic", topic, "--events", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    table = pd.read_parquet(out)
    assert table["kind"].tolist() == ["start", "end", "start"]
    assert set(table["model_version"]) == {"3"}
    assert table["contribution_rpm"].tolist() == pytest.approx([0.2] * 3)
    assert table["source_offset"].tolist() == [100, 101, 102]
