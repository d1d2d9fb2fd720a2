"""Tests of anomaly/evaluation/msl.py: ``evaluate msl`` end to end on a tiny synthetic root of Telemanom's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly.adaptation import NoveltyConfig
from anomaly.cli import build_parser, run
from anomaly.errors import DataError
from anomaly.evaluation.datasets import MSL_LABELS, load_msl
from anomaly.evaluation.msl import format_msl, run_msl
from anomaly.evaluation.runs import EvalSettings

pytest.importorskip("river")

SMALL = EvalSettings(hidden_size=8, epochs=2, window=8, piece_length=32, novelty=NoveltyConfig(learn_readings=20))
COMMANDS = 3


def _channel(rng: np.random.Generator, rows: int, spike: int | None) -> np.ndarray:
    """Telemetry (a slow wave and noise) in column 0 and one-hot commands in columns 1..3."""
    t = np.arange(rows)
    out = np.zeros((rows, 1 + COMMANDS))
    out[:, 0] = 0.5 * np.sin(t / 15) + rng.normal(0, 0.02, rows)
    out[t % 50 == 0, 1 + rng.integers(0, COMMANDS)] = 1.0
    if spike is not None:
        out[spike:spike + 5, 0] += 3.0
    return out


def _msl_root(tmp_path: Path) -> Path:
    root = tmp_path / "msl"
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    lines = ["chan_id,spacecraft,anomaly_sequences,class,num_values"]
    for chan, craft, spike in (("A-1", "MSL", 300), ("B-1", "MSL", 200), ("C-1", "SMAP", 350)):
        np.save(root / "train" / f"{chan}.npy", _channel(rng, 400, None))
        np.save(root / "test" / f"{chan}.npy", _channel(rng, 450, spike))
        lines.append(f'{chan},{craft},"[[{spike}, {spike + 20}]]",[point],450')
    (root / MSL_LABELS).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def msl_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _msl_root(tmp_path_factory.mktemp("msl"))


def test_msl_run_writes_one_row_per_test_row_plots_and_counts_per_spacecraft(msl_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    msl = run_msl(msl_root, out, settings=SMALL, progress=False)
    assert list(msl.per_channel.chan_id) == ["A-1", "B-1", "C-1"]
    for chan in ("A-1", "B-1", "C-1"):
        frame = pd.read_csv(out / f"{chan}.csv")
        assert list(frame.columns) == ["anomaly_score", "anomaly_pred"] and len(frame) == 450
        assert frame.anomaly_score.between(0.0, 1.0).all() and set(frame.anomaly_pred) <= {0, 1}
        assert (out / f"{chan}.png").is_file()
    counts = msl.counts()
    assert counts.tp + counts.fn == 3  # one labelled sequence per channel
    assert counts.tp >= 2  # a 3.0 jump on a 0.5 wave with 0.02 noise is plain to see
    assert set(msl.by_spacecraft()) == {"MSL", "SMAP"}
    assert msl.counts(["A-1", "B-1"]) == msl.by_spacecraft()["MSL"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"]["tp"] == counts.tp and summary["context"] is False
    text = format_msl(msl)
    assert "SMAP" in text and "total" in text


def test_msl_river_baseline_runs_the_same_loop(msl_root: Path, tmp_path: Path) -> None:
    msl = run_msl(msl_root, tmp_path / "river", "river-hst", settings=SMALL, progress=False, plots=False,
                  channels=("B-1",))
    assert len(msl.per_channel) == 1 and len(msl.results["B-1"]) == 450
    assert not (tmp_path / "river" / "B-1.png").exists()


def test_msl_loader_names_what_is_wrong(msl_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="label file not found"):
        load_msl(tmp_path)
    with pytest.raises(DataError, match=r"no channel\(s\) \['Z-9'\]"):
        load_msl(msl_root, ("Z-9",))
    broken = _msl_root(tmp_path / "broken")
    (broken / "test" / "B-1.npy").unlink()
    with pytest.raises(DataError, match=r"B-1\.npy not found"):
        load_msl(broken)
    labels = (broken / MSL_LABELS).read_text().replace("[[350, 370]]", "[[350, 999]]")
    (broken / MSL_LABELS).write_text(labels)
    with pytest.raises(DataError, match=r"\[350, 999\] outside its 450 test rows"):
        load_msl(broken, ("C-1",))


def test_evaluate_msl_command_prints_the_counts(msl_root: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = run(build_parser()[0], ["evaluate", "msl", "--data", str(msl_root), "--out", str(tmp_path / "cli"),
                        "--detector", "river-hst", "--no-plots", "--quiet"])
    assert code == 0
    assert "precision" in capsys.readouterr().out
    assert (tmp_path / "cli" / "C-1.csv").is_file()


def test_msl_run_with_context_feeds_the_commands_to_the_model(msl_root: Path, tmp_path: Path) -> None:
    msl = run_msl(msl_root, tmp_path / "ctx", settings=SMALL, progress=False, plots=False, context=True,
                  channels=("A-1",))
    assert msl.context and len(msl.results["A-1"]) == 450
    assert json.loads((tmp_path / "ctx" / "summary.json").read_text())["context"] is True
    assert "with context" in format_msl(msl)
