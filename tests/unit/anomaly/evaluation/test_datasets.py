"""Table reader and NAB/SKAB loaders (anomaly/evaluation/datasets.py) on hand-made fixtures and the real folders."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly.errors import DataError
from anomaly.evaluation.datasets import (
    SKAB_FEATURES,
    SKAB_LABEL_COLUMNS,
    label_segments,
    load_nab,
    load_skab,
    load_skab_anomaly_free,
    nab_windows,
    read_table,
)

# the benchmark data sits beside the checkout (../shared/data), in CI too
DATA = Path(os.environ.get("SENSOR_ANOMALY_DATA", Path(__file__).resolve().parents[4].parent / "shared" / "data"))


# ---------------------------------------------------------------------------------- read_table


@pytest.mark.parametrize(
    "raw",
    [
        b"a,b\n1,2.5\n3,4\n",  # LF
        b"a,b\r\n1,2.5\r\n3,4\r\n",  # CRLF
        b"a,b\n1,2.5\n3,4",  # no final newline
        b"a;b\r\n1;2.5\r\n3;4",  # SKAB style
        b"a\tb\n1\t2.5\n3\t4\n",
    ],
)
def test_read_table_accepts_line_endings_and_separators(tmp_path, raw):
    path = tmp_path / "t.csv"
    path.write_bytes(raw)
    frame = read_table(path)
    assert list(frame.columns) == ["a", "b"]
    assert frame["a"].tolist() == [1, 3] and frame["b"].tolist() == [2.5, 4.0]


def test_read_table_reads_parquet(tmp_path):
    frame = pd.DataFrame({"ts": pd.date_range("2024-01-01", periods=3, freq="s"), "x": [1.0, 2.0, 3.0]})
    frame.to_parquet(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(read_table(tmp_path / "t.parquet"), frame)


def test_read_table_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "t.xlsx").write_bytes(b"")
    with pytest.raises(DataError, match="unsupported table format"):
        read_table(tmp_path / "t.xlsx")
    (tmp_path / "ragged.csv").write_text("a,b\n1,2,3,4\n")
    with pytest.raises(DataError, match=r"ragged\.csv"):
        read_table(tmp_path / "ragged.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty\.csv"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet"):
        read_table(tmp_path / "bad.parquet")


# ----------------------------------------------------------------------------------------- NAB


def make_nab(root: Path, windows: dict | None) -> None:
    (root / "data" / "catA").mkdir(parents=True)
    (root / "data" / "catB").mkdir(parents=True)
    # Repeated timestamp (DST) and a step back, CRLF, no final newline: all must survive as they are.
    (root / "data" / "catA" / "dst.csv").write_bytes(
        b"timestamp,value\r\n2014-03-09 02:55:00,1\r\n2014-03-09 03:00:00,2\r\n"
        b"2014-03-09 03:00:00,3\r\n2014-03-09 02:00:00,4.5\r\n2014-03-09 03:05:00,5"
    )
    (root / "data" / "catB" / "plain.csv").write_text(
        "timestamp,value\n2014-01-01 00:00:00,10\n2014-01-01 00:05:00,11\n2014-01-01 00:10:00,12\n"
    )
    if windows is not None:
        (root / "labels").mkdir()
        (root / "labels" / "combined_windows.json").write_text(json.dumps(windows, indent=4))


def test_load_nab_keeps_rows_in_file_order_and_reads_windows(tmp_path):
    make_nab(tmp_path, {
        "catA/dst.csv": [],
        "catB/plain.csv": [["2014-01-01 00:05:00.000000", "2014-01-01 00:10:00.000000"]],
    })
    files = load_nab(tmp_path)
    assert [f.key for f in files] == ["catA/dst.csv", "catB/plain.csv"]
    dst, plain = files
    assert dst.frame["value"].tolist() == [1.0, 2.0, 3.0, 4.5, 5.0]
    assert dst.frame["timestamp"].dtype == "datetime64[ns]"
    assert dst.frame["timestamp"].dt.strftime("%H:%M").tolist() == ["02:55", "03:00", "03:00", "02:00", "03:05"]
    assert dst.windows == () and dst.labelled
    assert plain.windows == ((pd.Timestamp("2014-01-01 00:05"), pd.Timestamp("2014-01-01 00:10")),)
    assert nab_windows(files)["catB/plain.csv"] == list(plain.windows)
    assert [f.key for f in load_nab(tmp_path, categories=("catB",))] == ["catB/plain.csv"]


def test_load_nab_without_labels_marks_files_unlabelled(tmp_path):
    make_nab(tmp_path, None)
    files = load_nab(tmp_path)
    assert not any(f.labelled for f in files)
    with pytest.raises(DataError, match="without labels"):
        nab_windows(files)


def test_load_nab_rejects_bad_layouts(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_nab(tmp_path)
    make_nab(tmp_path, {"catA/dst.csv": [], "catB/plain.csv": [["2014-01-01 00:06:00", "2014-01-01 00:10:00"]]})
    with pytest.raises(DataError, match="does not occur"):
        load_nab(tmp_path)
    (tmp_path / "labels" / "combined_windows.json").write_text("{}")
    (tmp_path / "data" / "catB" / "plain.csv").write_text("timestamp,val\n2014-01-01 00:00:00,1\n")
    with pytest.raises(DataError, match="missing column"):
        load_nab(tmp_path)
    (tmp_path / "data" / "catB" / "plain.csv").write_text("timestamp,value\nyesterday,1\n")
    with pytest.raises(DataError, match="timestamps"):
        load_nab(tmp_path)


# ---------------------------------------------------------------------------------------- SKAB


def skab_csv(rows: list[str], labelled: bool = True) -> bytes:
    header = ";".join(("datetime", *SKAB_FEATURES) + (SKAB_LABEL_COLUMNS if labelled else ()))
    return ("\r\n".join([header, *rows]) + "\r\n").encode()


def skab_row(second: int, anomaly: float, labelled: bool = True) -> str:
    values = ";".join(str(1.0 + i / 10) for i in range(8))
    labels = f";{anomaly};0.0" if labelled else ""
    return f"2020-03-09 10:14:{second:02d};{values}{labels}"


def test_load_skab_orders_files_numerically_and_types_columns(tmp_path):
    group = tmp_path / "data" / "valve1"
    group.mkdir(parents=True)
    for name in ("0", "2", "10"):
        (group / f"{name}.csv").write_bytes(skab_csv([skab_row(s, float(s in (2, 3))) for s in range(5)]))
    files = load_skab(tmp_path)
    assert [f.name for f in files] == ["0", "2", "10"]
    f = files[0]
    assert f.features.shape == (5, 8) and list(f.features.columns) == list(SKAB_FEATURES)
    assert f.anomaly.tolist() == [0, 0, 1, 1, 0] and f.anomaly.dtype == np.int8
    assert f.windows == [(pd.Timestamp("2020-03-09 10:14:02"), pd.Timestamp("2020-03-09 10:14:03"))]
    assert f.frame["datetime"].dtype == "datetime64[ns]"


def test_load_skab_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_skab(tmp_path, "valve9")
    group = tmp_path / "data" / "valve1"
    group.mkdir(parents=True)
    (group / "0.csv").write_bytes(skab_csv([skab_row(0, 2.0)]))
    with pytest.raises(DataError, match="only 0/1"):
        load_skab(tmp_path)
    (group / "0.csv").write_bytes(skab_csv([skab_row(0, 0.0, labelled=False)], labelled=False))
    with pytest.raises(DataError, match="missing column"):
        load_skab(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_skab_anomaly_free(tmp_path)


def test_load_skab_anomaly_free(tmp_path):
    folder = tmp_path / "data" / "anomaly-free"
    folder.mkdir(parents=True)
    (folder / "anomaly-free.csv").write_bytes(skab_csv([skab_row(s, 0, False) for s in range(3)], False))
    frame = load_skab_anomaly_free(tmp_path)
    assert list(frame.columns) == ["datetime", *SKAB_FEATURES] and len(frame) == 3


def test_label_segments():
    assert label_segments(np.arange(6), np.array([1, 1, 0, 1, 0, 1])) == [(0, 1), (3, 3), (5, 5)]
    assert label_segments(np.arange(3), np.zeros(3)) == []
    with pytest.raises(DataError):
        label_segments(np.arange(3), np.zeros(2))


# ------------------------------------------------------------------------------- real folders


def test_real_nab_folder_matches_its_readme():
    root = DATA / "nab"
    if not (root / "data").is_dir():
        pytest.skip(f"NAB data not found under {root}")
    files = load_nab(root)
    assert len(files) == 35
    assert sum(len(f.windows) for f in files) == 55
    by_cat = {}
    for f in files:
        by_cat.setdefault(f.category, []).append(len(f.frame))
    assert {c: (len(v), sum(v)) for c, v in by_cat.items()} == {
        "artificialNoAnomaly": (5, 20_160),
        "artificialWithAnomaly": (6, 24_192),
        "realAWSCloudwatch": (17, 67_740),
        "realKnownCause": (7, 69_561),
    }
    named = {f.name: f for f in files}
    dst = named["ec2_disk_write_bytes_1ef3de"].frame["timestamp"]
    assert (dst == pd.Timestamp("2014-03-09 03:00:00")).sum() == 12  # DST duplicates kept
    machine = named["machine_temperature_system_failure"].frame["timestamp"]
    assert not machine.is_monotonic_increasing  # the step back is kept, not sorted away
    assert len(named["nyc_taxi"].frame) == 10_320  # no final newline, last row kept
    assert named["rogue_agent_key_hold"].frame["value"].dtype == np.float64  # CRLF file parses


def test_real_skab_folder_matches_its_readme():
    root = DATA / "skab"
    if not (root / "data" / "valve1").is_dir():
        pytest.skip(f"SKAB data not found under {root}")
    files = load_skab(root, "valve1")
    assert len(files) == 16 and sum(len(f.frame) for f in files) == 18_160
    for f in files:
        assert len(f.windows) == 1  # one contiguous anomalous segment per file
        assert 337 <= int(f.anomaly.sum()) <= 405
        assert f.frame["datetime"].is_monotonic_increasing
    assert len(load_skab_anomaly_free(root)) == 9_405
