"""Tests for streams/codec.py: input validation and dead letters, source mapping, event and DLQ encoding.

Records are real kafka-python ``ConsumerRecord`` tuples, as a consumer built without deserializers
hands them over. Every dead-letter reason is checked with a message a producer could really send,
with both JSON backends (orjson when installed, and the stdlib fallback).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.consumer.fetcher import ConsumerRecord

import streams.codec as codec
from anomaly.events import AnomalyEvent
from streams.codec import (
    DLQ_HEADER_PREFIX,
    MAX_TS_MS,
    MIN_TS_MS,
    DeadLetter,
    DeadLetterReason,
    dead_letter_headers,
    decode_event,
    decode_records,
    encode_event,
    encode_reading,
    encode_window,
    iso_from_ms,
)
from streams.errors import CodecError, ConfigError, StreamsError

FEATURES = ["temp", "rpm", "pressure"]
TOPIC = "sensor.readings"
TS = 1_718_000_000_123  # 2024-06-10T06:13:20.123Z
BACKENDS = ["stdlib", *(["orjson"] if codec._orjson is not None else [])]


def record(value: object, key: object = b"pump-7", offset: int = 0, partition: int = 0,
           topic: str = TOPIC, timestamp: int | None = None, headers: list | None = None) -> ConsumerRecord:
    ksize = len(key) if isinstance(key, (bytes, str)) else -1
    vsize = len(value) if isinstance(value, (bytes, str)) else -1
    ts = TS + 5 if timestamp is None else timestamp
    return ConsumerRecord(topic, partition, 0, offset, ts, 0, key, value, headers or [], None, ksize, vsize,
                          -1)


def js(obj: object) -> bytes:
    return json.dumps(obj).encode()


def window(n: int, *extra: object) -> dict:
    """A window of ``n`` good readings of pump-7, then ``extra`` items as given."""
    return {"device_id": "pump-7", "readings": [{"ts": TS + i, "values": {"temp": 1.0}} for i in range(n)]
            + list(extra)}


def reading(device_id: object = "pump-7", ts: object = TS, values: object = None, **extra: object) -> dict:
    out = {"device_id": device_id, "ts": ts, "values": {"temp": 71.5} if values is None else values}
    out.update(extra)
    return out


@contextlib.contextmanager
def json_backend(name: str) -> Iterator[None]:
    saved = codec._orjson
    if name == "stdlib":
        codec._orjson = None
    try:
        yield
    finally:
        codec._orjson = saved


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    with json_backend(request.param):
        yield request.param


# ---------------------------------------------------------------------------------------- dead letters

SURROGATE_ID = b'{"device_id": "\\ud800", "ts": 1718000000123, "values": {"temp": 1.0}}'
REASON_CASES = [
    # (reason, value, key, decode kwargs, words the detail must contain)
    ("oversized", js(reading(values={"temp": 1.0, "pad": "x" * 200})), b"pump-7", {"max_message_bytes": 100},
     "more than the limit of 100"),
    ("oversized", b" " * codec.DEFAULT_MAX_MESSAGE_BYTES + js(reading()), b"pump-7", {}, "bytes"),
    ("oversized", js(window(4)), b"pump-7", {"max_window_readings": 3}, "4 readings"),
    ("empty_value", None, b"pump-7", {}, "tombstone"),
    ("empty_value", b"", b"pump-7", {}, "empty"),
    ("invalid_json", b'{"device_id": "pump-7", "ts": 1718000000123', b"pump-7", {}, "not JSON"),
    ("invalid_json", b'{"device_id": "pump-7",}', b"pump-7", {}, "not JSON"),
    ("invalid_json", b"temp=71.5", b"pump-7", {}, "not JSON"),
    ("invalid_json", b'{"device_id": "pump-\xff"}', b"pump-7", {}, "UTF-8"),
    ("invalid_json", js(reading()).decode().encode("utf-16"), b"pump-7", {}, "UTF-8"),
    ("invalid_json", b"[" * 100_000, b"pump-7", {}, "not JSON"),
    ("invalid_json", 12345, b"pump-7", {}, "value is a int"),
    ("not_an_object", b"[1, 2]", b"pump-7", {}, "got array"),
    ("not_an_object", b"71.5", b"pump-7", {}, "got float"),
    ("not_an_object", b'"pump-7"', b"pump-7", {}, "got str"),
    ("not_an_object", b"null", b"pump-7", {}, "got null"),
    ("unknown_schema", js({"device_id": "pump-7"}), b"pump-7", {}, "'device_id'"),
    ("unknown_schema", js({"id": "pump-7", "temperature": 71.5}), b"pump-7", {}, "'temperature'"),
    ("unknown_schema", js(reading(readings=[])), b"pump-7", {}, "both"),
    ("missing_field", js({"ts": TS, "values": {"temp": 1.0}}), b"pump-7", {}, "device_id is missing"),
    ("missing_field", js({"device_id": "pump-7", "values": {"temp": 1.0}}), b"pump-7", {}, "ts is missing"),
    ("missing_field", js({"device_id": "pump-7", "ts": TS}), b"pump-7", {}, "values is missing"),
    ("missing_field", js({"device_id": "pump-7", "readings": [{"values": {"temp": 1.0}}]}), b"pump-7", {},
     "readings[0].ts is missing"),
    ("missing_field", js(window(1, {"ts": TS + 1})), b"pump-7", {}, "readings[1].values is missing"),
    ("wrong_type", js(reading(device_id=7)), b"7", {}, "device_id: expected a string, got int"),
    ("wrong_type", js(reading(values=[71.5])), b"pump-7", {}, "values: expected an object, got array"),
    ("wrong_type", js(reading(values={"temp": "71.5"})), b"pump-7", {},
     "values.temp: expected a number or null"),
    ("wrong_type", js(reading(values={"temp": True})), b"pump-7", {}, "got boolean"),
    ("wrong_type", js(reading(values={"temp": {"c": 21.0}})), b"pump-7", {}, "got object"),
    ("wrong_type", js(reading(ts=True)), b"pump-7", {}, "ts: expected an ISO-8601 string or epoch ms"),
    ("wrong_type", js(reading(ts=[2024, 6, 10])), b"pump-7", {}, "got array"),
    ("wrong_type", js({"device_id": "pump-7", "readings": {"ts": TS, "values": {"temp": 1}}}), b"pump-7", {},
     "readings: expected an array"),
    ("wrong_type", js(window(1, 5)), b"pump-7", {}, "readings[1]: expected an object"),
    ("bad_device_id", js(reading(device_id="")), None, {}, "1 to 256 characters, got 0"),
    ("bad_device_id", js(reading(device_id="d" * 257)), None, {}, "got 257"),
    ("bad_device_id", SURROGATE_ID, None, {}, "UTF-8"),
    ("key_mismatch", js(reading(device_id="pump-7")), b"pump-8", {},
     "b'pump-8' differs from device_id 'pump-7'"),
    ("key_mismatch", js(window(1, {"device_id": "pump-8", "ts": TS + 1, "values": {"temp": 1.0}})), b"pump-7",
     {}, "readings[1].device_id 'pump-8'"),
    ("missing_key", js(reading()), None, {"require_key": True}, "no key"),
    ("bad_timestamp", js(reading(ts="yesterday")), b"pump-7", {}, "not an ISO-8601 time"),
    ("bad_timestamp", js(reading(ts="1718000000123")), b"pump-7", {}, "not an ISO-8601 time"),
    ("bad_timestamp", js(reading(ts="2024-06-10T25:00:00Z")), b"pump-7", {}, "hour"),
    ("bad_timestamp", js(reading(ts=1_718_000_000)), b"pump-7", {}, "outside [2000-01-01, 2100-01-01)"),
    ("bad_timestamp", js(reading(ts=1_718_000_000_123_000)), b"pump-7", {}, "outside"),
    ("bad_timestamp", js(reading(ts=-5)), b"pump-7", {}, "outside"),
    ("bad_timestamp", js(reading(ts=1.718e9)), b"pump-7", {}, "not epoch ms"),
    ("bad_timestamp", js(reading(ts="1999-12-31T23:59:59.999Z")), b"pump-7", {}, "outside"),
    ("bad_timestamp", js(reading(ts="2100-01-01T00:00:00")), b"pump-7", {}, "outside"),
    ("bad_timestamp", b'{"device_id": "pump-7", "ts": NaN, "values": {"temp": 1.0}}', b"pump-7", {},
     "nan is not epoch ms"),
    ("bad_timestamp", b'{"device_id": "pump-7", "ts": 1e400, "values": {"temp": 1.0}}', b"pump-7", {}, "inf"),
    ("non_finite_value", b'{"device_id": "pump-7", "ts": 1718000000123, "values": {"temp": NaN}}',
     b"pump-7", {}, "values.temp: nan"),
    ("non_finite_value", b'{"device_id": "pump-7", "ts": 1718000000123, "values": {"temp": -Infinity}}',
     b"pump-7", {}, "-inf"),
    ("non_finite_value", b'{"device_id": "pump-7", "ts": 1718000000123, "values": {"rpm": 1e400}}',
     b"pump-7", {}, "values.rpm"),
    ("non_finite_value", js(reading(values={"temp": 1e39})), b"pump-7", {}, "not a finite float32"),
    ("non_finite_value", js(reading(values={"temp": 10**40})), b"pump-7", {}, "float32"),
    ("non_finite_value", b'{"device_id": "pump-7", "readings": [{"ts": 1718000000123, "values": {"temp": 1}},'
                         b' {"ts": 1718000000124, "values": {"temp": Infinity}}]}', b"pump-7", {},
     "readings[1].values.temp"),
    ("no_known_features", js(reading(values={})), b"pump-7", {}, "no number for any model feature"),
    ("no_known_features", js(reading(values={"humidity": 40.0, "Temp": 71.5})), b"pump-7", {}, "'humidity'"),
    ("no_known_features", js(reading(values={"temp": None, "rpm": None})), b"pump-7", {}, "model has"),
    ("empty_window", js({"device_id": "pump-7", "readings": []}), b"pump-7", {}, "empty array"),
]


@pytest.mark.parametrize(("reason", "value", "key", "kwargs", "words"), REASON_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(REASON_CASES)])
def test_each_reason_dead_letters_the_message(backend: str, reason: str, value: object, key: object,
                                               kwargs: dict, words: str) -> None:
    rec = record(value, key=key, offset=41, partition=2)
    out = decode_records([rec], FEATURES, **kwargs)
    assert len(out) == 0
    assert out.messages == 0
    assert [(d.reason, d.record) for d in out.dead_letters] == [(reason, rec)]
    assert words in out.dead_letters[0].detail
    assert isinstance(out.dead_letters[0].reason, DeadLetterReason)


def test_every_reason_has_a_real_example() -> None:
    assert {c[0] for c in REASON_CASES} == {r.value for r in DeadLetterReason}


def test_reason_header_values_are_short_machine_codes() -> None:
    for reason in DeadLetterReason:
        assert reason.value.replace("_", "").isalpha() and reason.value.islower() and len(reason.value) <= 20


def test_a_window_with_one_bad_reading_is_dead_lettered_whole() -> None:
    good_then_bad = {"device_id": "pump-7", "readings": [
        {"ts": TS, "values": {"temp": 1.0}}, {"ts": TS + 1, "values": {"temp": "hot"}},
        {"ts": TS + 2, "values": {"temp": 3.0}}]}
    out = decode_records([record(js(good_then_bad))], FEATURES)
    assert len(out) == 0 and out.messages == 0
    assert out.dead_letters[0].reason == "wrong_type"
    assert out.dead_letters[0].detail.startswith("readings[1].values.temp")


def test_dead_letter_keeps_the_original_bytes_and_key() -> None:
    value = b'{"device_id": "pump-7", "ts": "soon", "values": {"temp": 1}}'
    dl = decode_records([record(value, key=b"pump-7")], FEATURES).dead_letters[0]
    assert dl.value is value
    assert dl.key == b"pump-7"
    assert dl.locate() == "sensor.readings[0]@0"
    assert DeadLetter("invalid_json", "x", record("{\u00e9", key="k\u00e9")).value == "{\u00e9".encode()
    assert DeadLetter("empty_value", "x", record(None, key=None)).key is None


def test_dead_letter_headers_name_reason_and_source() -> None:
    rec = record(b"{", key=b"pump-7", offset=41, partition=2, timestamp=1_718_000_000_500,
                 headers=[("trace-id", b"abc"), ("x-dlq-reason", b"bad_timestamp"), ("x-dlq-detail", b"old")])
    dl = decode_records([rec], FEATURES).dead_letters[0]
    headers = dead_letter_headers(dl)
    assert headers[0] == ("trace-id", b"abc")
    named = dict(headers)
    assert len(named) == len(headers), "each header name once: old x-dlq-* headers are replaced"
    assert named["x-dlq-reason"] == b"invalid_json"
    assert named["x-dlq-detail"].startswith(b"not JSON")
    assert named["x-dlq-source-topic"] == b"sensor.readings"
    assert named["x-dlq-source-partition"] == b"2"
    assert named["x-dlq-source-offset"] == b"41"
    assert named["x-dlq-source-timestamp"] == b"1718000000500"
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers)
    assert sum(k.startswith(DLQ_HEADER_PREFIX) for k, _ in headers) == 6


def test_dead_letter_detail_header_survives_odd_text() -> None:
    rec = record(js(reading(device_id="pump-7", values={"t\u00e9mp": 1.0})), key=b"pump-7")
    dl = decode_records([rec], ["temp"]).dead_letters[0]
    assert dl.reason == "no_known_features"
    assert "t\u00e9mp" in dict(dead_letter_headers(dl))["x-dlq-detail"].decode()
    odd = DeadLetter("bad_device_id", "device_id '\ud800' cannot be encoded", rec)
    assert b"\\ud800" in dict(dead_letter_headers(odd))["x-dlq-detail"]


def test_detail_is_bounded_for_huge_fields() -> None:
    rec = record(js(reading(ts="x" * 100_000)), key=b"pump-7")
    dl = decode_records([rec], FEATURES).dead_letters[0]
    assert dl.reason == "bad_timestamp"
    assert len(dl.detail) <= 300


# ---------------------------------------------------------------------------------------- accepted readings

def test_single_reading_with_epoch_ms(backend: str) -> None:
    rec = record(js(reading(values={"temp": 71.5, "rpm": 1500, "pressure": 101.25})), timestamp=TS + 40)
    out = decode_records([rec], FEATURES)
    assert out.messages == 1 and not out.dead_letters
    assert out.batch.device_ids.tolist() == ["pump-7"]
    assert out.batch.timestamps_ms.tolist() == [TS]
    assert out.batch.values.tolist() == [[71.5, 1500.0, 101.25]]
    assert out.batch.values.dtype == np.float32 and out.batch.timestamps_ms.dtype == np.int64
    assert out.produce_ts_ms.tolist() == [TS + 40]
    assert out.source_topic.tolist() == [TOPIC]


@pytest.mark.parametrize(("ts", "expected_ms"), [
    (TS, TS),
    (float(TS), TS),
    (TS + 0.75, TS),  # fractions of a millisecond are truncated
    ("2024-06-10T06:13:20.123Z", TS),
    ("2024-06-10T06:13:20.123+00:00", TS),
    ("2024-06-10T08:13:20.123+02:00", TS),
    ("2024-06-10T01:13:20.123-05:00", TS),
    ("2024-06-10T06:13:20.123", TS),  # naive = UTC
    ("2024-06-10 06:13:20.123", TS),
    ("2024-06-10T06:13:20.123999Z", TS),  # microseconds truncated to the millisecond
    ("2024-06-10T06:13:20Z", TS - 123),
    ("2024-06-10", 1_717_977_600_000),
    ("2000-01-01T00:00:00Z", MIN_TS_MS),
    (MAX_TS_MS - 1, MAX_TS_MS - 1),
])
def test_both_timestamp_forms(backend: str, ts: object, expected_ms: int) -> None:
    out = decode_records([record(js(reading(ts=ts)))], FEATURES)
    assert not out.dead_letters
    assert out.batch.timestamps_ms.tolist() == [expected_ms]


def test_null_missing_and_unknown_features() -> None:
    rec = record(js(reading(values={"temp": 1.5, "rpm": None, "humidity": 40, "door": "open"})))
    out = decode_records([rec], FEATURES)
    row = out.batch.values[0]
    assert row[0] == 1.5
    assert np.isnan(row[1]), "null is missing"
    assert np.isnan(row[2]), "absent is missing"
    assert out.unknown_features == 2, "unknown names are counted, and not type-checked"


def test_unknown_features_are_counted_over_the_batch() -> None:
    window = {"device_id": "pump-7", "readings": [{"ts": TS + i, "values": {"temp": 1.0, "x": 1, "y": 2}}
                                                  for i in range(3)]}
    records = [record(js(window)), record(js(reading(values={"temp": 1, "z": 0})), offset=1)]
    out = decode_records(records, FEATURES)
    assert out.unknown_features == 7


def test_extra_top_level_fields_are_ignored() -> None:
    out = decode_records([record(js(reading(schema=2, site="north")))], FEATURES)
    assert out.messages == 1 and not out.dead_letters


def test_key_rules() -> None:
    value = js(reading())
    recs = [record(value, key=None, offset=0), record(value, key=b"pump-7", offset=1),
            record(value, key="pump-7", offset=2), record(value, key=bytearray(b"pump-7"), offset=3),
            record(value, key=b"pump-70", offset=4)]
    out = decode_records(recs, FEATURES)
    assert out.source_offset.tolist() == [0, 1, 2, 3]
    assert [(d.reason, d.record.offset) for d in out.dead_letters] == [("key_mismatch", 4)]
    strict = decode_records(recs[:2], FEATURES, require_key=True)
    assert strict.source_offset.tolist() == [1]
    assert strict.dead_letters[0].reason == "missing_key"


def test_non_ascii_device_id_matches_its_utf8_key() -> None:
    rec = record(js(reading(device_id="Pumpe-\u00e4")), key="Pumpe-\u00e4".encode())
    out = decode_records([rec], FEATURES)
    assert out.batch.device_ids.tolist() == ["Pumpe-\u00e4"]


def test_window_rows_share_their_source() -> None:
    window = {"device_id": "pump-7", "readings": [
        {"ts": TS + i, "values": {"temp": float(i), "rpm": None}, "device_id": "pump-7"} for i in range(4)]}
    out = decode_records([record(js(window), offset=9, partition=3, timestamp=TS + 1000)], FEATURES)
    assert out.messages == 1 and len(out) == 4
    assert out.batch.timestamps_ms.tolist() == [TS, TS + 1, TS + 2, TS + 3]
    assert out.batch.values[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert np.isnan(out.batch.values[:, 1:]).all()
    assert out.source_offset.tolist() == [9] * 4
    assert out.source_partition.tolist() == [3] * 4
    assert out.produce_ts_ms.tolist() == [TS + 1000] * 4


def test_window_timestamps_may_mix_forms_and_order() -> None:
    window = {"device_id": "pump-7", "readings": [{"ts": "2024-06-10T06:13:20.123Z", "values": {"temp": 1}},
                                                  {"ts": TS - 10, "values": {"temp": 2}}]}
    out = decode_records([record(js(window))], FEATURES)
    assert out.batch.timestamps_ms.tolist() == [TS, TS - 10], "order is the detector's business"


def test_mixed_batch_keeps_good_messages_in_order_with_their_sources(backend: str) -> None:
    window = {"device_id": "fan-1",
              "readings": [{"ts": TS + i, "values": {"rpm": 900 + i}} for i in range(3)]}
    records = [
        record(js(reading(device_id="pump-7", values={"temp": 1.0})), key=b"pump-7", offset=100, partition=0),
        record(b"\x00garbage", key=b"pump-7", offset=101, partition=0),
        record(js(window), key=b"fan-1", offset=7, partition=1, timestamp=TS + 77),
        record(js(reading(device_id="pump-8", values={"temp": "n/a"})), key=b"pump-8", offset=8, partition=1),
        record(js(reading(device_id="pump-8", ts="2024-06-10T06:13:21.123Z", values={"temp": 2.0})),
               key=b"pump-8", offset=9, partition=1, topic="sensor.readings.eu"),
        record(js({"device_id": "fan-1", "readings": []}), key=b"fan-1", offset=10, partition=1),
    ]
    out = decode_records(records, FEATURES)
    assert out.messages == 3
    assert out.batch.device_ids.tolist() == ["pump-7", "fan-1", "fan-1", "fan-1", "pump-8"]
    assert out.source_offset.tolist() == [100, 7, 7, 7, 9]
    assert out.source_partition.tolist() == [0, 1, 1, 1, 1]
    assert out.source_partition.dtype == np.int32 and out.source_offset.dtype == np.int64
    assert out.source_topic.tolist() == [TOPIC] * 4 + ["sensor.readings.eu"]
    assert out.produce_ts_ms.tolist() == [TS + 5, TS + 77, TS + 77, TS + 77, TS + 5]
    assert out.batch.timestamps_ms.tolist() == [TS, TS, TS + 1, TS + 2, TS + 1000]
    assert out.batch.values[1:4, 1].tolist() == [900.0, 901.0, 902.0]
    assert [(d.reason, d.record.offset) for d in out.dead_letters] == [
        ("invalid_json", 101), ("wrong_type", 8), ("empty_window", 10)]


def test_dead_letters_are_logged_with_their_location(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="streams.codec"):
        decode_records([record(b"{", offset=55, partition=4)], FEATURES)
    assert "sensor.readings[4]@55 invalid_json" in caplog.text


def test_empty_poll_gives_an_empty_batch_of_the_right_width() -> None:
    out = decode_records([], FEATURES)
    assert len(out) == 0 and out.messages == 0 and out.dead_letters == []
    assert out.batch.values.shape == (0, 3)
    assert out.source_offset.dtype == np.int64 and out.produce_ts_ms.dtype == np.int64


def test_unknown_record_timestamp_is_minus_one() -> None:
    rec = record(js(reading()))._replace(timestamp=None)
    assert decode_records([rec], FEATURES).produce_ts_ms.tolist() == [-1]


def test_str_and_memoryview_values_are_read() -> None:
    value = js(reading())
    out = decode_records([record(value.decode()), record(memoryview(value), offset=1),
                          record(bytearray(value), offset=2)], FEATURES)
    assert out.messages == 3 and not out.dead_letters


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"features": []}, "at least one"),
    ({"features": ["temp", "temp"]}, "repeats 'temp'"),
    ({"features": "temp"}, "sequence of names"),
    ({"features": ["temp", ""]}, "features[1]"),
    ({"features": FEATURES, "max_message_bytes": 0}, "max_message_bytes"),
    ({"features": FEATURES, "max_window_readings": 0}, "max_window_readings"),
])
def test_bad_parameters_raise_config_error(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")) as info:
        decode_records([record(js(reading()))], **kwargs)
    assert isinstance(info.value, StreamsError)


# ---------------------------------------------------------------------------------------- encoders

def test_encode_reading_and_window_decode_back() -> None:
    key, value = encode_reading("pump-7", TS, {"temp": 71.5, "rpm": None, "pressure": float("nan")})
    assert key == b"pump-7"
    assert json.loads(value) == {"device_id": "pump-7", "ts": TS, "values": {"temp": 71.5, "rpm": None,
                                                                          "pressure": None}}
    wkey, wvalue = encode_window("pump-7", [(TS, {"temp": np.float32(1.5)}),
                                            (iso_from_ms(TS + 1), {"rpm": 3})])
    out = decode_records([record(value, key=key), record(wvalue, key=wkey, offset=1)], FEATURES)
    assert out.batch.timestamps_ms.tolist() == [TS, TS, TS + 1]
    np.testing.assert_array_equal(out.batch.values, np.array(
        [[71.5, np.nan, np.nan], [1.5, np.nan, np.nan], [np.nan, 3.0, np.nan]], dtype=np.float32))


@pytest.mark.parametrize(("call", "words"), [
    (lambda: encode_reading("pump-7", TS, {"temp": float("inf")}), "infinite"),
    (lambda: encode_reading("pump-7", TS, {"temp": True}), "expected a number"),
    (lambda: encode_reading("pump-7", TS, {"temp": "71"}), "expected a number"),
    (lambda: encode_reading("pump-7", TS, {1: 2.0}), "feature names must be strings"),
    (lambda: encode_reading("pump-7", TS, [("temp", 1.0)]), "expected a mapping"),
    (lambda: encode_reading("pump-7", True, {"temp": 1.0}), "ts: expected epoch ms"),
    (lambda: encode_reading("pump-7", 1.5e12, {"temp": 1.0}), "ts: expected epoch ms"),
    (lambda: encode_reading("", TS, {"temp": 1.0}), "device_id"),
    (lambda: encode_reading("\ud800", TS, {"temp": 1.0}), "UTF-8"),
    (lambda: encode_window("pump-7", []), "at least one reading"),
    (lambda: encode_window("pump-7", [(TS, {"temp": float("-inf")})]), "readings[0].values.temp"),
])
def test_encoders_refuse_what_the_decoder_would_reject(call: object, words: str) -> None:
    with pytest.raises(CodecError) as info:
        call()  # type: ignore[operator]
    assert words in str(info.value)


def make_event(**changes: object) -> AnomalyEvent:
    base: dict = dict(device_id="pump-7", ts_ms=TS, kind="start", score=0.9991, threshold=0.99,
                      expected={"temp": 70.0, "rpm": 1500.0}, actual={"temp": 90.5, "rpm": float("nan")},
                      contributions={"temp": 0.97, "rpm": 0.03}, model_name="lstm-fleet", model_version="3",
                      row=12, episode_start_ms=None)
    base.update(changes)
    return AnomalyEvent(**base)


def test_encode_event_carries_the_events_schema() -> None:
    key, value = encode_event(make_event(), "sensor.readings", 2, 41)
    assert key == b"pump-7"
    ev = decode_event(value)
    assert ev["device_id"] == "pump-7"
    assert ev["ts"] == "2024-06-10T06:13:20.123Z" and ev["ts_ms"] == TS
    assert ev["kind"] == "start"
    assert ev["score"] == pytest.approx(0.9991) and ev["threshold"] == pytest.approx(0.99)
    assert ev["expected"] == {"temp": 70.0, "rpm": 1500.0}
    assert ev["actual"] == {"temp": 90.5, "rpm": None}, "NaN is written as null: strict JSON"
    assert ev["contributions"] == {"temp": 0.97, "rpm": 0.03}
    assert ev["model"] == {"name": "lstm-fleet", "version": "3"}
    assert ev["source"] == {"topic": "sensor.readings", "partition": 2, "offset": 41}
    assert ev["episode_start"] is None and ev["episode_start_ms"] is None
    assert "row" not in ev, "row indexes the in-process batch; meaningless on the topic"
    json.loads(value, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_encode_event_end_with_numpy_scalars() -> None:
    event = make_event(kind="end", score=np.float32(0.2), threshold=np.float64(0.99),
                       episode_start_ms=TS - 60_000, expected={"temp": np.float32(70.25)},
                       contributions={"temp": np.float32(np.inf)},
                       ts_ms=np.int64(TS))
    ev = decode_event(encode_event(event, "sensor.readings", np.int32(0), np.int64(5))[1])
    assert ev["kind"] == "end"
    assert ev["score"] == pytest.approx(0.2)
    assert ev["expected"] == {"temp": 70.25}
    assert ev["contributions"] == {"temp": None}
    assert ev["episode_start"] == "2024-06-10T06:12:20.123Z" and ev["episode_start_ms"] == TS - 60_000
    assert ev["source"]["partition"] == 0 and ev["source"]["offset"] == 5


def test_encode_event_rejects_an_unknown_kind() -> None:
    with pytest.raises(CodecError, match="kind"):
        encode_event(make_event(kind="middle"), TOPIC, 0, 0)


@pytest.mark.parametrize(("data", "words"), [
    (b"{", "not JSON"), (b"[]", "JSON object"), (b'{"device_id": "a"}', "missing field"),
])
def test_decode_event_rejects_what_is_not_an_event(data: bytes, words: str) -> None:
    with pytest.raises(CodecError, match=words):
        decode_event(data)


def test_iso_from_ms_round_trips_through_the_decoder() -> None:
    for ms in (MIN_TS_MS, TS, MAX_TS_MS - 1):
        assert iso_from_ms(ms).endswith("Z")
        out = decode_records([record(js(reading(ts=iso_from_ms(ms))))], FEATURES)
        assert out.batch.timestamps_ms.tolist() == [ms]


# ---------------------------------------------------------------------------------------- properties

device_ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=256)
epoch_ms = st.integers(MIN_TS_MS, MAX_TS_MS - 1)
iso_times = st.builds(
    lambda naive, offset_min: (naive.replace(tzinfo=timezone(timedelta(minutes=offset_min)))),
    st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2099, 12, 30)),
    st.integers(-14 * 60, 14 * 60),
)
numbers = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False), st.integers(-(2**53), 2**53))
feature_values = st.one_of(st.none(), numbers)
value_maps = st.builds(  # one model feature with a number, the others (and an unknown one) optional
    lambda name, number, rest: {**rest, name: number},
    st.sampled_from(FEATURES), numbers,
    st.fixed_dictionaries({}, optional={"temp": feature_values, "rpm": feature_values,
                                        "pressure": feature_values, "humidity": feature_values}),
)


def expected_ms(ts: int | datetime) -> int:
    if isinstance(ts, int):
        return ts
    return (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def expected_row(values: dict) -> list[float]:
    return [np.float32(values[f]) if values.get(f) is not None else np.nan for f in FEATURES]


timestamps = st.one_of(epoch_ms, iso_times)
messages = st.tuples(device_ids, st.lists(st.tuples(timestamps, value_maps), min_size=1, max_size=12),
                     st.booleans())


@settings(max_examples=100, deadline=None)
@given(st.lists(messages, max_size=8), st.sampled_from(BACKENDS))
def test_encoded_messages_round_trip_exactly(msgs: list, backend_name: str) -> None:
    records, want_ids, want_ts, want_rows, want_offsets = [], [], [], [], []
    for offset, (device_id, items, as_window) in enumerate(msgs):
        wire = [(ts if isinstance(ts, int) else ts.isoformat(), values) for ts, values in items]
        if as_window or len(items) > 1:
            key, value = encode_window(device_id, wire)
        else:
            key, value = encode_reading(device_id, *wire[0])
        records.append(record(value, key=key, offset=offset))
        for ts, values in items:
            want_ids.append(device_id)
            want_ts.append(expected_ms(ts))
            want_rows.append(expected_row(values))
            want_offsets.append(offset)
    with json_backend(backend_name):
        out = decode_records(records, FEATURES)
    assert out.dead_letters == []
    assert out.messages == len(msgs)
    assert out.batch.device_ids.tolist() == want_ids
    assert out.batch.timestamps_ms.tolist() == want_ts
    assert out.source_offset.tolist() == want_offsets
    np.testing.assert_array_equal(out.batch.values,
                                  np.array(want_rows, dtype=np.float32).reshape(len(want_ids), len(FEATURES)))
    assert out.unknown_features == sum(1 for _, items, _ in msgs for _, v in items if "humidity" in v)


json_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
                        st.sampled_from(["2024-06-10T06:13:20Z", "pump-7", "", "NaN"]), epoch_ms)
json_values = st.recursive(json_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["device_id", "ts", "values", "readings", "temp", "rpm", "x"]), inner,
                    max_size=5)), max_leaves=15)
message_like = st.dictionaries(st.sampled_from(["device_id", "ts", "values", "readings"]), json_values,
                               max_size=4)


def check_never_raises(values: list, backend_name: str, **kwargs: object) -> None:
    records = [record(v, key=k, offset=i) for i, (v, k) in enumerate(values)]
    with json_backend(backend_name):
        out = decode_records(records, FEATURES, **kwargs)
    accepted = set(out.source_offset.tolist())
    rejected = [d.record.offset for d in out.dead_letters]
    assert len(accepted) == out.messages
    assert sorted([*accepted, *rejected]) == list(range(len(records))), "each record decoded or dead-lettered"
    assert all(isinstance(d.reason, DeadLetterReason) and d.detail for d in out.dead_letters)
    assert not np.isinf(out.batch.values).any()
    assert ((out.batch.timestamps_ms >= MIN_TS_MS) & (out.batch.timestamps_ms < MAX_TS_MS)).all()
    assert (~np.isnan(out.batch.values)).any(axis=1).all(), "every accepted reading has a model feature"
    for dl in out.dead_letters:
        dead_letter_headers(dl)


keys = st.one_of(st.none(), st.just(b"pump-7"), st.binary(max_size=8))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=200), keys), max_size=5), st.sampled_from(BACKENDS))
def test_arbitrary_bytes_never_raise(values: list, backend_name: str) -> None:
    check_never_raises(values, backend_name)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(message_like.map(lambda m: json.dumps(m).encode()), keys), max_size=5),
       st.sampled_from(BACKENDS))
def test_arbitrary_json_messages_never_raise(values: list, backend_name: str) -> None:
    check_never_raises(values, backend_name, max_window_readings=3)


@settings(max_examples=200, deadline=None)
@given(messages, st.data(), st.sampled_from(BACKENDS))
def test_corrupted_messages_never_raise(msg: tuple, data: st.DataObject, backend_name: str) -> None:
    device_id, items, _ = msg
    wire = [(ts if isinstance(ts, int) else ts.isoformat(), values) for ts, values in items]
    key, value = encode_window(device_id, wire)
    buf = bytearray(value)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        op = data.draw(st.sampled_from(["flip", "drop", "insert"]))
        if op == "flip":
            buf[pos] = data.draw(st.integers(0, 255))
        elif op == "drop":
            del buf[pos]
        else:
            buf.insert(pos, data.draw(st.sampled_from(b'{}[]",:.-e0 9Nn\\')))
        if not buf:
            break
    check_never_raises([(bytes(buf), key)], backend_name)


def test_float32_boundary_values_are_exact() -> None:
    f32max = float(np.finfo(np.float32).max)
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    out = decode_records([record(js(reading(values={"temp": f32max, "rpm": -f32max, "pressure": tiny})))],
                         FEATURES)
    assert out.batch.values.tolist() == [[f32max, -f32max, tiny]]
    assert math.isfinite(out.batch.values.max())


# ------------------------------------------------------------------------------------ context inputs

INPUTS = ["temp", "rpm", "valve"]  # a bundle's inputs: features temp, rpm, then the context input valve


@pytest.mark.parametrize(("values", "reason"), [
    ({"temp": 1.0, "valve": "open"}, "wrong_type"),
    ({"temp": 1.0, "valve": True}, "wrong_type"),
    ({"temp": 1.0, "valve": 1e39}, "non_finite_value"),
    ({"colour": 1.0}, "no_known_features"),
])
def test_bad_context_values_get_the_usual_dead_letter_reasons(values: dict, reason: str) -> None:
    out = decode_records([record(js(reading(values=values)))], INPUTS)
    assert [d.reason for d in out.dead_letters] == [reason] and len(out.batch) == 0


def test_context_values_come_in_values_and_a_context_only_reading_is_valid() -> None:
    out = decode_records([record(js(reading(values={"temp": 1.5, "valve": 1.0}))),
                          record(js(reading(ts=TS + 1, values={"valve": 0.0})), offset=1)], INPUTS)
    assert not out.dead_letters
    np.testing.assert_array_equal(out.batch.values, [[1.5, np.nan, 1.0], [np.nan, np.nan, 0.0]])
