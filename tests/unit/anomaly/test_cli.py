"""The core CLI: train -> score on CSV and Parquet as real subprocesses, --help, and exit code 2 with
exactly one line on stderr for every bad argument, table or bundle."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly.bundle import METADATA_FILE, WEIGHTS_FILE, ModelBundle
from anomaly.cli import main
from anomaly.detector import StreamingDetector, score_frame

REPO = Path(__file__).resolve().parents[3]
TRAIN_FLAGS = ["--device-col", "device", "--epochs", "2", "--hidden-size", "8", "--warmup-steps", "5", "--quiet"]


def readings(devices: int = 2, steps: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for d in range(devices):
        t = np.arange(steps)
        parts.append(pd.DataFrame({
            "device": f"pump-{d}",
            "ts": 1_700_000_000_000 + t * 1000,
            "x": 5 * d + np.sin(t / 10) + rng.normal(0, 0.05, steps),
            "y": np.cos(t / 7 + d) + rng.normal(0, 0.05, steps),
        }))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    frame = readings()
    paths = {name: root / name for name in (
        "ok.csv", "ok.parquet", "empty.csv", "header.csv", "nonnum.csv", "inf.csv", "huge.csv", "short.csv",
        "holes.csv", "junk.txt", "broken.parquet", "iso.csv")}
    frame.to_csv(paths["ok.csv"], index=False)
    frame.to_parquet(paths["ok.parquet"])
    paths["empty.csv"].write_text("")
    frame.iloc[:0].to_csv(paths["header.csv"], index=False)
    frame.astype({"x": object}).assign(x=lambda f: f["x"].where(f.index != 7, "oops")).to_csv(
        paths["nonnum.csv"], index=False)
    frame.assign(y=lambda f: f["y"].where(f.index != 3, np.inf)).to_csv(paths["inf.csv"], index=False)
    lines = paths["ok.csv"].read_text().splitlines()
    cells = lines[4].split(",")
    cells[2] = "1e400"  # beyond float64: pandas reads it as inf
    paths["huge.csv"].write_text("\n".join([*lines[:4], ",".join(cells), *lines[5:]]) + "\n")
    frame.iloc[:30].to_csv(paths["short.csv"], index=False)
    frame.assign(x=lambda f: f["x"].where(f.index % 17 != 0)).to_csv(paths["holes.csv"], index=False)
    paths["junk.txt"].write_text("device,ts,x,y\n")
    paths["broken.parquet"].write_bytes(b"PAR1 not really")
    frame.assign(ts=pd.to_datetime(frame["ts"], unit="ms").dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")).to_csv(
        paths["iso.csv"], index=False)
    return paths


def cli(*args: str | Path) -> subprocess.Popen[str]:
    """Start ``python -m anomaly.cli ARGS`` as a real process (stdout and stderr captured)."""
    return subprocess.Popen([sys.executable, "-m", "anomaly.cli", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def pipelines(files, tmp_path_factory):
    """train -> score for the CSV and the Parquet file, as subprocesses (the two pipelines run side by side)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    trains = {kind: cli("train", "--data", files[f"ok.{kind}"], "--features", "x,y", "--out", root / f"model-{kind}",
                        *TRAIN_FLAGS) for kind in ("csv", "parquet")}
    for kind, proc in trains.items():
        runs[kind] = {"train": finish(proc), "model": root / f"model-{kind}", "scores": root / f"scores-{kind}.csv"}
    scores = {kind: cli("score", "--model", runs[kind]["model"], "--data", files[f"ok.{kind}"], "--out",
                        runs[kind]["scores"]) for kind in ("csv", "parquet")}
    for kind, proc in scores.items():
        runs[kind]["score"] = finish(proc)
    return runs


# ------------------------------------------------------------------------------------------------ happy path


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_train_then_score_as_subprocesses(pipelines, files, kind):
    run = pipelines[kind]
    code, out, err = run["train"]
    assert (code, err) == (0, ""), err
    assert "trained sensor-anomaly version 1 on 600 rows (2 devices, features x,y)" in out
    assert sorted(p.name for p in run["model"].iterdir()) == [METADATA_FILE, WEIGHTS_FILE]

    code, out, err = run["score"]
    assert (code, err) == (0, ""), err
    assert "scored 590 of 600 rows" in out  # 2 devices x 5 warm-up readings are not scored
    scored = pd.read_csv(run["scores"])
    original = readings()
    assert list(scored.columns) == [*original.columns, "score", "is_anomaly", "status", "expected_x", "expected_y"]
    pd.testing.assert_frame_equal(scored[original.columns], original, check_dtype=False)
    warm = scored.groupby("device").cumcount() < 5
    assert (scored.loc[warm, "status"] == "warmup").all() and scored.loc[warm, "score"].isna().all()
    assert (scored.loc[~warm, "status"] == "scored").all()
    assert scored.loc[~warm, "score"].between(0, 1).all()
    assert scored["is_anomaly"].dtype == bool
    first = scored.groupby("device").cumcount() == 0
    assert scored.loc[first, "expected_x"].isna().all() and scored.loc[~first, "expected_x"].notna().all()


def test_the_cli_scores_what_the_library_scores(pipelines, files):
    bundle = ModelBundle.load(pipelines["csv"]["model"])
    assert bundle.training["device_col"] == "device" and bundle.training["time_col"] == "ts"
    library = score_frame(StreamingDetector(bundle), readings(), time_col="ts", device_col="device")
    cli_scores = pd.read_csv(pipelines["csv"]["scores"])
    np.testing.assert_allclose(cli_scores["score"], library["score"], rtol=1e-5, equal_nan=True)
    np.testing.assert_array_equal(cli_scores["is_anomaly"], library["is_anomaly"])


def test_train_can_make_the_bundle_the_benchmark_results_use(files, tmp_path, capsys):
    out = tmp_path / "novelty"
    assert main(["train", "--data", str(files["ok.csv"]), "--out", str(out), *TRAIN_FLAGS,
                 "--episode-rule", "novelty", "--seasonal"]) == 0
    config = ModelBundle.load(out).config
    assert config.episode_rule == "novelty"
    period = config.seasonal_period  # x = sin(t / 10) repeats every 63 readings, y = cos(t / 7) every 44
    assert period is not None and min(abs(period - 63), abs(period - 44)) <= 2, period
    assert main(["train", "--data", str(files["ok.csv"]), "--out", str(tmp_path / "x"), *TRAIN_FLAGS,
                 "--seasonal"]) == 2
    assert "--seasonal needs --episode-rule novelty" in capsys.readouterr().err


def test_train_with_context_columns_and_score_them(files, tmp_path, capsys):
    out = tmp_path / "ctx"
    assert main(["train", "--data", str(files["ok.csv"]), "--out", str(out), *TRAIN_FLAGS, "--context", "y"]) == 0
    assert "features x, context y)" in capsys.readouterr().out  # --features defaults to the other numeric columns
    bundle = ModelBundle.load(out)
    assert bundle.features == ("x",) and bundle.context == ("y",)
    scores = tmp_path / "scores.csv"
    assert main(["score", "--model", str(out), "--data", str(files["ok.csv"]), "--out", str(scores)]) == 0
    table = pd.read_csv(scores)
    assert "expected_x" in table and "expected_y" not in table and (table["status"] == "scored").sum() > 500


def test_csv_and_parquet_train_the_same_model(pipelines):
    a, b = (ModelBundle.load(pipelines[k]["model"]) for k in ("csv", "parquet"))
    for key, tensor in a.model.state_dict().items():
        np.testing.assert_allclose(tensor.numpy(), b.model.state_dict()[key].numpy(), rtol=1e-5, atol=1e-7)


def test_missing_cells_and_iso_timestamps_are_fine(pipelines, files, tmp_path, capsys):
    model = pipelines["csv"]["model"]
    assert main(["score", "--model", str(model), "--data", str(files["holes.csv"]), "--out",
                 str(tmp_path / "a.csv")]) == 0
    assert main(["train", "--data", str(files["iso.csv"]), "--out", str(tmp_path / "m"), *TRAIN_FLAGS]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert "features x,y" in out.out  # default features: the numeric columns other than time and device


# ----------------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize(("argv", "expected"), [
    (["--help"], ["train", "score"]),
    (["train", "--help"], ["--data", "--features", "--device-col", "--time-col", "--out", "Parquet"]),
    (["score", "--help"], ["--model", "--data", "--out", "expected_*"]),
])
def test_help_for_each_command(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in expected:
        assert word in text, word


# --------------------------------------------------------------------------------------------------- errors


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse exits; main() returns for everything else
        return int(exc.code or 0)


def assert_one_line_error(capsys, code: int, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("sensor-anomaly"), err
    assert "error:" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("argv", "fragments"), [
    ([], ["required: COMMAND"]),
    (["fly"], ["invalid choice: 'fly'"]),
    (["train", "--data", "{ok.csv}"], ["sensor-anomaly train: error:", "required: --out"]),
    (["train", "--data", "{ok.csv}", "--out", "{out}", "--epochs", "0"], ["--epochs", "integer >= 1, got 0"]),
    (["train", "--data", "{ok.csv}", "--out", "{out}", "--epochs", "many"], ["--epochs", "'many'"]),
    (["train", "--data", "{ok.csv}", "--out", "{out}", "--features", ","], ["comma-separated list"]),
    (["train", "--data", "{ok.csv}", "--out", "{out}", "--false-alarm-rate", "2"], ["number in (0, 1)"]),
    (["score", "--model", "{out}", "--data", "{ok.csv}", "--out", "{out}", "--bogus"], ["unrecognized", "--bogus"]),
])
def test_bad_arguments_exit_2_with_one_line(argv, fragments, files, tmp_path, capsys):
    names = {k.replace(".", "_"): v for k, v in files.items()}
    argv = [a.replace("{out}", str(tmp_path / "out")).replace("{ok.csv}", str(names["ok_csv"])) for a in argv]
    assert_one_line_error(capsys, run_main(argv), *fragments)


@pytest.mark.parametrize(("data", "extra", "fragments"), [
    ("missing.csv", [], ["table file not found"]),
    ("junk.txt", [], ["unsupported table format"]),
    ("empty.csv", [], ["cannot parse", "No columns"]),
    ("header.csv", ["--features", "x,y"], ["the table has no rows"]),
    ("header.csv", [], ["no numeric feature columns"]),
    ("broken.parquet", [], ["cannot parse", "broken.parquet"]),
    ("nonnum.csv", [], ["column 'x' has a non-numeric value 'oops' at row 7"]),
    ("inf.csv", [], ["column 'y' has an infinite value at row 3"]),
    ("huge.csv", [], ["column 'x' has an infinite value at row 3"]),
    ("ok.csv", ["--features", "x,z"], ["missing column(s) ['z']"]),
    ("ok.csv", ["--time-col", "when"], ["--time-col 'when' is not a column"]),
    ("short.csv", [], ["too little data"]),
])
def test_bad_training_data_exits_2_with_one_line(data, extra, fragments, files, tmp_path, capsys):
    path = files.get(data, tmp_path / data)
    code = run_main(["train", "--data", str(path), "--out", str(tmp_path / "m"), *TRAIN_FLAGS, *extra])
    assert_one_line_error(capsys, code, *fragments)
    assert not (tmp_path / "m").exists()


def test_an_output_path_that_is_a_file_exits_2(files, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("")
    code = run_main(["train", "--data", str(files["ok.csv"]), "--out", str(blocker), *TRAIN_FLAGS])
    assert_one_line_error(capsys, code, "taken")


@pytest.fixture
def model_copy(pipelines, tmp_path) -> Path:
    target = tmp_path / "model"
    target.mkdir()
    for p in pipelines["csv"]["model"].iterdir():
        (target / p.name).write_bytes(p.read_bytes())
    return target


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_scoring_with_a_pickle_for_weights_exits_2_and_runs_nothing(model_copy, files, tmp_path, capsys):
    marker = tmp_path / "pwned"
    (model_copy / WEIGHTS_FILE).write_bytes(pickle.dumps(_Exploit(marker)))
    code = run_main(["score", "--model", str(model_copy), "--data", str(files["ok.csv"]), "--out",
                     str(tmp_path / "s.csv")])
    assert_one_line_error(capsys, code, WEIGHTS_FILE)
    assert not marker.exists()
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize(("change", "fragments"), [
    (lambda m: m.update(features="x,y"), [METADATA_FILE, "'features' must be a list of strings"]),
    (lambda m: m["detector"].update(threshold="high"), [METADATA_FILE, "invalid field"]),
    (lambda m: m.pop("scaler"), [METADATA_FILE, "invalid field: 'scaler'"]),
    (lambda m: m["hyperparameters"].update(hidden_size=9), [WEIGHTS_FILE, "has shape", "hidden 9"]),
])
def test_scoring_with_a_bad_bundle_exits_2_naming_the_problem(model_copy, files, tmp_path, capsys, change,
                                                              fragments):
    meta = json.loads((model_copy / METADATA_FILE).read_text())
    change(meta)
    (model_copy / METADATA_FILE).write_text(json.dumps(meta))
    code = run_main(["score", "--model", str(model_copy), "--data", str(files["ok.csv"]), "--out",
                     str(tmp_path / "s.csv")])
    assert_one_line_error(capsys, code, *fragments)


@pytest.mark.parametrize(("model", "data", "fragments"), [
    ("nowhere", "ok.csv", ["model bundle directory", "does not exist"]),
    ("model", "nonnum.csv", ["column 'x' has a non-numeric value 'oops' at row 7"]),
    ("model", "inf.csv", ["column 'y' has an infinite value at row 3"]),
    ("model", "junk.txt", ["unsupported table format"]),
])
def test_bad_scoring_input_exits_2_with_one_line(model, data, fragments, model_copy, files, tmp_path, capsys):
    model_dir = model_copy if model == "model" else tmp_path / model
    code = run_main(["score", "--model", str(model_dir), "--data", str(files[data]), "--out",
                     str(tmp_path / "s.csv")])
    assert_one_line_error(capsys, code, *fragments)


def test_scoring_data_without_the_model_features_exits_2(model_copy, files, tmp_path, capsys):
    frame = readings().rename(columns={"y": "humidity"})
    path = tmp_path / "renamed.csv"
    frame.to_csv(path, index=False)
    code = run_main(["score", "--model", str(model_copy), "--data", str(path), "--out", str(tmp_path / "s.csv")])
    assert_one_line_error(capsys, code, "missing column(s) ['y']")


def test_errors_are_one_line_in_a_real_process_too(files, tmp_path):
    """Warnings, log records and tracebacks would show here, not under capsys (one process: each costs seconds)."""
    code, out, err = finish(cli("train", "--data", files["nonnum.csv"], "--out", tmp_path / "m", *TRAIN_FLAGS))
    assert code == 2, err
    assert err.splitlines() == ["sensor-anomaly: error: column 'x' has a non-numeric value 'oops' at row 7"]
    assert out == ""
