"""ReadingBatch and to_epoch_ms: the input contract, and clear errors for bad tables and records."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly.errors import DataError, InvalidReadingError
from anomaly.readings import ReadingBatch, to_epoch_ms

FEATURES = ["x", "y"]


def frame(**columns) -> pd.DataFrame:
    base = {"ts": [0, 1000, 2000], "device": ["a", "b", "a"], "x": [1.0, 2.0, 3.0], "y": [4.0, 5.0, 6.0]}
    return pd.DataFrame(base | columns)


# ---------------------------------------------------------------------------------------------- timestamps


@pytest.mark.parametrize(("values", "expected"), [
    ([0, 1500], [0, 1500]),
    (np.array([1.7e12, 1.7e12 + 250.0]), [1_700_000_000_000, 1_700_000_000_250]),
    (["1970-01-01T00:00:01Z", "1970-01-01 00:00:02.5"], [1000, 2500]),
    (["2024-01-01T01:00:00+01:00"], [1_704_067_200_000]),  # offsets are honoured
    ([dt.datetime(2024, 1, 1)], [1_704_067_200_000]),  # naive date-times are UTC
    (pd.Series(pd.to_datetime(["2024-01-01"], utc=True)), [1_704_067_200_000]),
    ([1000, "1970-01-01T00:00:02Z"], [1000, 2000]),  # a number stays epoch ms beside text
    ([], []),
])
def test_timestamps_in_every_accepted_form_become_epoch_ms(values, expected):
    out = to_epoch_ms(values)
    assert out.dtype == np.int64
    assert out.tolist() == expected


@pytest.mark.parametrize(("values", "message"), [
    ([0, np.nan], "missing"),
    (["2024-01-01", None], "missing"),
    ([0, np.inf], "infinite"),
    ([1e30], "out of range"),
    (["2024-01-01", "not a date"], "cannot parse"),
    (["1000-01-01"], "cannot parse"),  # outside pandas' nanosecond range
    ([True, False], "boolean"),
    ([True, "2024-01-01"], "boolean"),
])
def test_bad_timestamps_raise_invalid_reading_error(values, message):
    with pytest.raises(InvalidReadingError, match=message):
        to_epoch_ms(values)


# ------------------------------------------------------------------------------------------------ from_frame


def test_from_frame_keeps_row_order_feature_order_and_dtypes():
    batch = ReadingBatch.from_frame(frame(), ["y", "x"], time_col="ts", device_col="device")
    assert batch.device_ids.tolist() == ["a", "b", "a"]
    assert batch.timestamps_ms.tolist() == [0, 1000, 2000]
    assert batch.values.tolist() == [[4.0, 1.0], [5.0, 2.0], [6.0, 3.0]]
    assert batch.values.dtype == np.float32 and batch.values.flags.c_contiguous


def test_from_frame_without_device_column_uses_one_device():
    batch = ReadingBatch.from_frame(frame(), FEATURES, time_col="ts", default_device="pump")
    assert set(batch.device_ids) == {"pump"}


def test_nan_cells_are_missing_features_not_errors():
    batch = ReadingBatch.from_frame(frame(x=[1.0, np.nan, None]), FEATURES, time_col="ts")
    assert np.isnan(batch.values[1:, 0]).all()
    assert batch.values[0, 0] == 1.0


def test_numeric_text_cells_are_converted():
    batch = ReadingBatch.from_frame(frame(x=["1.5", "2", "-3e2"]), FEATURES, time_col="ts")
    assert batch.values[:, 0].tolist() == [1.5, 2.0, -300.0]


def test_huge_but_representable_values_are_kept():
    batch = ReadingBatch.from_frame(frame(x=[1e30, -1e38, 0.0]), FEATURES, time_col="ts")
    assert np.isfinite(batch.values).all()
    assert batch.values[0, 0] == pytest.approx(1e30, rel=1e-6)


def test_empty_frame_gives_an_empty_batch():
    batch = ReadingBatch.from_frame(frame().iloc[:0], FEATURES, time_col="ts", device_col="device")
    assert len(batch) == 0 and batch.values.shape == (0, 2)


@pytest.mark.parametrize(("table", "features", "device_col", "message"), [
    (frame().drop(columns="y"), FEATURES, None, r"missing column\(s\) \['y'\]"),
    (frame().drop(columns="ts"), FEATURES, None, r"missing column\(s\) \['ts'\]"),
    (frame(), FEATURES, "site", r"missing column\(s\) \['site'\]"),
    (frame(x=[1.0, "abc", 2.0]), FEATURES, None, r"column 'x' has a non-numeric value 'abc' at row 1"),
    (frame(y=[1.0, 2.0, [3.0]]), FEATURES, None, r"column 'y' has a non-numeric value \[3.0\] at row 2"),
    (frame(x=[1.0, np.inf, 2.0]), FEATURES, None, r"column 'x' has an infinite value at row 1"),
    (frame(y=["-inf", 1.0, 2.0]), FEATURES, None, r"column 'y' has an infinite value at row 0"),
    (frame(x=[1.0, 2.0, 1e300]), FEATURES, None, r"column 'x' has a value 1e\+300 at row 2 outside the float32"),
    (frame(device=["a", None, "b"]), FEATURES, "device", r"column 'device' has a missing device id at row 1"),
    (frame(ts=[0, "yesterday", 2]), FEATURES, None, r"column 'ts': cannot parse"),
    (frame(ts=[0.0, np.nan, 2.0]), FEATURES, None, r"column 'ts': timestamps contain missing values"),
])
def test_bad_tables_raise_data_error_naming_the_column(table, features, device_col, message):
    with pytest.raises(DataError, match=message):
        ReadingBatch.from_frame(table, features, time_col="ts", device_col=device_col)


def test_bad_tables_raise_without_numpy_warnings(recwarn):
    with pytest.raises(DataError):
        ReadingBatch.from_frame(frame(x=[1e300, 1.0, 2.0]), FEATURES, time_col="ts")
    with pytest.raises(DataError):
        ReadingBatch.from_frame(frame(ts=[1e30, 0, 1]), FEATURES, time_col="ts")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 10**12),
                          st.one_of(st.none(), st.floats(-1e30, 1e30, allow_nan=False))), max_size=20))
def test_from_frame_round_trips_any_valid_table(rows):
    table = pd.DataFrame(rows, columns=["device", "ts", "x"]).astype({"x": float})
    batch = ReadingBatch.from_frame(table, ["x"], time_col="ts", device_col="device")
    assert batch.device_ids.tolist() == table["device"].tolist()
    assert batch.timestamps_ms.tolist() == table["ts"].tolist()
    np.testing.assert_array_equal(batch.values[:, 0], table["x"].to_numpy(dtype=np.float32))


# ---------------------------------------------------------------------------------------------- from_records


def test_from_records_fills_absent_and_null_features_with_nan_and_ignores_unknown_ones():
    batch = ReadingBatch.from_records([
        {"device_id": "a", "ts": 1000, "values": {"x": 1.0, "z": 9.0}},
        {"device_id": 7, "ts": "1970-01-01T00:00:02Z", "values": {"y": 2, "x": None}},
    ], FEATURES)
    assert batch.device_ids.tolist() == ["a", "7"]
    assert batch.timestamps_ms.tolist() == [1000, 2000]
    np.testing.assert_array_equal(batch.values, np.array([[1.0, np.nan], [np.nan, 2.0]], dtype=np.float32))


def test_from_records_with_no_records_is_empty():
    assert ReadingBatch.from_records([], FEATURES).values.shape == (0, 2)


@pytest.mark.parametrize(("record", "message"), [
    ({"device_id": "a", "ts": 0}, r"record 0 lacks field 'values'"),
    ({"ts": 0, "values": {}}, r"record 0 lacks field 'device_id'"),
    ("not a mapping", r"record 0 lacks field"),
    ({"device_id": "a", "ts": 0, "values": [1.0]}, r"'values' must be a mapping"),
    ({"device_id": "a", "ts": 0, "values": {"x": "1.0"}}, r"feature 'x' must be a number, got str"),
    ({"device_id": "a", "ts": 0, "values": {"x": True}}, r"feature 'x' must be a number, got bool"),
    ({"device_id": "a", "ts": 0, "values": {"y": 1e300}}, r"feature 'y' value 1e\+300 is outside the float32"),
    ({"device_id": "a", "ts": 0, "values": {"x": float("inf")}}, r"infinite value"),
    ({"device_id": "a", "ts": "garbage", "values": {"x": 1.0}}, r"cannot parse timestamps"),
])
def test_bad_records_raise_invalid_reading_error(record, message):
    with pytest.raises(InvalidReadingError, match=message):
        ReadingBatch.from_records([record], FEATURES)


# ------------------------------------------------------------------------------------- constructor and helpers


@pytest.mark.parametrize(("ids", "ts", "values", "message"), [
    (["a"], np.array([0, 1], dtype=np.int64), np.zeros((1, 2), np.float32), r"timestamps_ms of shape \(1,\)"),
    (["a"], np.array([0], dtype=np.int64), np.zeros((2, 2), np.float32), r"values of shape \(1, F\)"),
    (["a"], np.array([0], dtype=np.int64), np.zeros(2, np.float32), r"values of shape \(1, F\)"),
    (["a"], np.array([0], dtype=np.int64), np.zeros((1, 2), np.float64), "float32 values"),
    (["a"], np.array([0], dtype=np.int32), np.zeros((1, 2), np.float32), "int64 timestamps_ms"),
    (["a"], np.array([0], dtype=np.int64), np.array([[1.0, np.inf]], np.float32), r"reading 0 \(device 'a'\)"),
])
def test_constructor_checks_shapes_dtypes_and_infinities(ids, ts, values, message):
    with pytest.raises(InvalidReadingError, match=message):
        ReadingBatch(np.asarray(ids, dtype=object), ts, values)


def test_from_arrays_converts_dtypes_and_reshapes_flat_values():
    batch = ReadingBatch.from_arrays(["a", "b"], [0, 1], [1, 2])
    assert batch.values.dtype == np.float32 and batch.values.shape == (2, 1)
    assert batch.timestamps_ms.dtype == np.int64
    assert ReadingBatch.from_arrays([], [], []).values.shape[0] == 0


def test_concat_and_take_keep_rows_aligned():
    a = ReadingBatch.from_arrays(["a", "b"], [0, 1], [[1.0], [2.0]])
    b = ReadingBatch.from_arrays(["c"], [5], [[3.0]])
    both = ReadingBatch.concat([a, b])
    assert both.device_ids.tolist() == ["a", "b", "c"] and both.n_features == 1
    picked = both.take(np.array([2, 0]))
    assert picked.device_ids.tolist() == ["c", "a"]
    assert picked.timestamps_ms.tolist() == [5, 0]
    assert picked.values[:, 0].tolist() == [3.0, 1.0]
    with pytest.raises(InvalidReadingError, match="zero batches"):
        ReadingBatch.concat([])
