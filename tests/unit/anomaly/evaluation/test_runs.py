"""Tests of anomaly/evaluation/runs.py: both benchmark commands end to end on tiny synthetic roots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly.adaptation import NoveltyConfig
from anomaly.cli import build_parser, run
from anomaly.errors import DataError
from anomaly.evaluation.datasets import SKAB_FEATURES
from anomaly.evaluation.runs import EvalSettings, format_nab, format_skab, run_nab, run_skab

pytest.importorskip("river")

SMALL = EvalSettings(hidden_size=8, epochs=2, window=8, piece_length=32,
                     novelty=NoveltyConfig(learn_readings=20))
NAB_ROWS = 1000
SKAB_ROWS = 600


def _nab_root(tmp_path: Path, labels: bool = True) -> Path:
    """Two 5-minute series with a daily-ish wave, each with one spike inside a labelled window."""
    root = tmp_path / "nab"
    rng = np.random.default_rng(0)
    stamps = pd.date_range("2014-01-01", periods=NAB_ROWS, freq="5min")
    windows = {}
    for category, name, spike in (("artificialWithAnomaly", "a", 700), ("realKnownCause", "b", 850)):
        value = 10 + np.sin(np.arange(NAB_ROWS) / 20) + rng.normal(0, 0.1, NAB_ROWS)
        value[spike:spike + 3] += 12.0
        folder = root / "data" / category
        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"timestamp": stamps.strftime("%Y-%m-%d %H:%M:%S"), "value": value.round(4)}).to_csv(
            folder / f"{name}.csv", index=False)
        windows[f"{category}/{name}.csv"] = [[f"{stamps[spike - 40]}.000000", f"{stamps[spike + 40]}.000000"]]
    if labels:
        (root / "labels").mkdir()
        (root / "labels" / "combined_windows.json").write_text(json.dumps(windows, indent=4))
    return root


def _skab_root(tmp_path: Path) -> Path:
    """Two valve experiments: 8 noisy sensors; the flow turns erratic for 120 rows (labelled) from row 450."""
    root = tmp_path / "skab"
    folder = root / "data" / "valve1"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("0", "1"):
        values = rng.normal(0, 1, (SKAB_ROWS, len(SKAB_FEATURES))) * 0.05 + np.arange(1, 9)
        anomaly = np.zeros(SKAB_ROWS)
        anomaly[450:570] = 1.0
        values[450:570, -1] += rng.normal(0, 1.0, 120)  # Volume Flow RateRMS: 20 times its noise
        frame = pd.DataFrame(values, columns=list(SKAB_FEATURES))
        frame.insert(0, "datetime", pd.date_range("2020-03-09 10:00:00", periods=SKAB_ROWS, freq="1s")
                     .strftime("%Y-%m-%d %H:%M:%S"))
        frame["anomaly"], frame["changepoint"] = anomaly, 0.0
        frame.to_csv(folder / f"{name}.csv", sep=";", index=False, lineterminator="\r\n")
    return root


@pytest.fixture(scope="module")
def nab_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _nab_root(tmp_path_factory.mktemp("nab"))


@pytest.fixture(scope="module")
def skab_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _skab_root(tmp_path_factory.mktemp("skab"))


def test_nab_run_streams_every_file_writes_results_and_plots_and_scores_them(nab_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    nab = run_nab(nab_root, out, settings=SMALL, progress=False)
    for key in ("artificialWithAnomaly/a", "realKnownCause/b"):
        frame = pd.read_csv(out / f"{key}.csv")
        source = pd.read_csv(nab_root / "data" / f"{key}.csv")
        assert list(frame.columns) == ["timestamp", "value", "anomaly_score"]
        assert frame["timestamp"].tolist() == source["timestamp"].tolist()
        assert frame["value"].tolist() == pytest.approx(source["value"].tolist())
        assert frame["anomaly_score"].between(0.0, 1.0).all()
        assert (out / f"{key}.png").stat().st_size > 0
    assert nab.report is not None and nab.fixed_threshold == pytest.approx(SMALL.novelty.threshold)
    standard = nab.fixed["standard"]
    assert standard.tp > 0 and standard.normalized > 0  # a 120-sigma spike is found in its window
    summary = json.loads((out / "summary.json").read_text())
    assert summary["profiles"]["standard"]["fixed"] == pytest.approx(standard.normalized)
    assert summary["settings"]["hidden_size"] == 8
    assert summary["settings"]["seasonal"] is True and summary["settings"]["seasonal_alpha"] == 0.5
    text = format_nab(nab)
    assert "standard" in text and "fixed" in text


def test_nab_river_baseline_runs_through_the_same_loop(nab_root: Path, tmp_path: Path) -> None:
    nab = run_nab(nab_root, tmp_path / "river", "river-hst", settings=SMALL, progress=False, plots=False)
    assert nab.report is not None and nab.fixed_threshold is None and nab.fixed == {}
    frame = pd.read_csv(tmp_path / "river" / "realKnownCause" / "b.csv")
    assert len(frame) == NAB_ROWS and frame["anomaly_score"].between(0.0, 1.0).all()
    assert not (tmp_path / "river" / "realKnownCause" / "b.png").exists()


def test_nab_without_labels_writes_results_but_does_not_score(tmp_path: Path) -> None:
    root = _nab_root(tmp_path, labels=False)
    nab = run_nab(root, tmp_path / "res", "river-hst", progress=False, plots=False)
    assert nab.report is None and len(nab.results) == 2
    assert "not scored" in format_nab(nab)


def test_skab_run_trains_on_the_first_rows_and_scores_only_the_rest(skab_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    skab = run_skab(skab_root, out, settings=SMALL, progress=False)
    train = SMALL.skab_train_rows
    for name in ("0", "1"):
        frame = pd.read_csv(out / "valve1" / f"{name}.csv")
        source = pd.read_csv(skab_root / "data" / "valve1" / f"{name}.csv", sep=";")
        assert list(frame.columns) == ["datetime", "anomaly_score", "anomaly_pred"]
        assert frame["datetime"].tolist() == source["datetime"].iloc[train:].tolist()
        assert set(frame["anomaly_pred"].unique()) <= {0, 1}
        assert (out / "valve1" / f"{name}.png").is_file()
    m = skab.metrics
    assert m.tp + m.fp + m.tn + m.fn == 2 * (SKAB_ROWS - train)
    assert m.tp > 0 and m.f1 > 0.3  # one sensor 20 times noisier for two minutes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored_rows"] == 2 * (SKAB_ROWS - train) and summary["f1"] == pytest.approx(m.f1)
    assert "F1" in format_skab(skab)


def test_skab_river_baseline(skab_root: Path, tmp_path: Path) -> None:
    skab = run_skab(skab_root, tmp_path / "river", "river-hst", settings=SMALL, progress=False, plots=False)
    frame = pd.read_csv(tmp_path / "river" / "valve1" / "0.csv")
    assert len(frame) == SKAB_ROWS - SMALL.skab_train_rows
    assert skab.metrics.tp + skab.metrics.fn == 2 * 120
    assert "quantile" in skab.threshold["rule"]


def test_skab_file_shorter_than_the_training_part_is_an_error_naming_it(skab_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"0\.csv has 600 rows"):
        run_skab(skab_root, tmp_path / "res", "river-hst", settings=EvalSettings(skab_train_rows=600),
                 progress=False, plots=False)


def test_missing_roots_and_unknown_detectors_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="NAB data folder"):
        run_nab(tmp_path, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="SKAB data folder"):
        run_skab(tmp_path, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="unknown detector"):
        run_nab(tmp_path, tmp_path / "out", "isolation-forest", progress=False)  # type: ignore[arg-type]


def _parser():
    return build_parser()[0]


def test_evaluate_command_runs_a_benchmark_and_prints_its_scores(skab_root: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = run(_parser(), ["evaluate", "skab", "--data", str(skab_root), "--out", str(tmp_path / "cli"),
                           "--detector", "river-hst", "--no-plots", "--quiet"])
    assert code == 0
    assert "F1" in capsys.readouterr().out
    assert (tmp_path / "cli" / "valve1" / "1.csv").is_file()


def test_evaluate_command_reports_a_bad_root_with_exit_code_2(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = run(_parser(), ["evaluate", "nab", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                           "--quiet"])
    assert code == 2
    assert "NAB data folder not found" in capsys.readouterr().err


def test_evaluate_command_rejects_an_unknown_detector() -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["evaluate", "nab", "--data", "x", "--out", "y", "--detector", "magic"])
    assert exc.value.code == 2


def test_seasonal_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="seasonal_alpha"):
        EvalSettings(seasonal_alpha=0.0)
    assert EvalSettings(seasonal=False).detector_config().seasonal_alpha == 0.5
    with pytest.raises(ValueError, match="seasonal_explains"):
        EvalSettings(seasonal_explains="no")  # type: ignore[arg-type]
    assert EvalSettings().detector_config().seasonal_explains is True
    assert EvalSettings(seasonal_explains=False).detector_config().seasonal_explains is False
