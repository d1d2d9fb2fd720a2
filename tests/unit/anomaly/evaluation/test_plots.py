"""Plots (anomaly/evaluation/plots.py): PNGs are written headless, with windows, threshold and detections drawn."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Polygon, Rectangle

from anomaly.errors import DataError
from anomaly.evaluation.plots import SeriesPlot, plot_file, plot_grid, save_grid, save_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def spec(n=200, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    ts = pd.date_range("2024-01-01", periods=n, freq="min")
    scores = rng.random(n) ** 8
    fields = dict(timestamps=ts, values=pd.DataFrame({"temp": rng.normal(size=n), "vib": rng.normal(size=n)}),
                  scores=scores, threshold=0.5, windows=[(ts[100], ts[120])], title="device 7")
    fields.update(overrides)
    return SeriesPlot(**fields)


def shaded(ax):
    return [p for p in ax.patches if isinstance(p, (Polygon, Rectangle))]


def test_save_plot_writes_a_png_with_all_parts(tmp_path):
    s = spec()
    path = save_plot(tmp_path / "sub" / "one.png", s)
    assert path.read_bytes()[:8] == PNG_MAGIC
    fig = plot_file(s)
    ax_values, ax_score = fig.axes
    assert len(shaded(ax_values)) == 1 and len(shaded(ax_score)) == 1
    labels = [line.get_label() for line in ax_values.lines]
    assert labels[:2] == ["temp", "vib"] and "detection" in labels
    fired = np.asarray(s.scores) >= 0.5
    detection_line = next(line for line in ax_values.lines if line.get_label() == "detection")
    assert len(detection_line.get_xdata()) == int(fired.sum()) > 0
    assert any(line.get_label().startswith("threshold") for line in ax_score.lines)


def test_plot_without_scores_has_one_panel_and_explicit_detections(tmp_path):
    n = 50
    fig = plot_file(timestamps=np.arange(n), values=np.sin(np.arange(n)), detections=np.arange(n) % 10 == 0,
                    windows=[(5, 9), (30, 35)])
    (ax,) = fig.axes
    assert len(shaded(ax)) == 2
    detection_line = next(line for line in ax.lines if line.get_label() == "detection")
    assert len(detection_line.get_xdata()) == 5
    path = save_plot(tmp_path / "noscore.png", timestamps=np.arange(n), values=np.arange(n))
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_save_grid_writes_a_png_for_many_files(tmp_path):
    specs = [spec(seed=i, title=f"file {i}", standardize=True) for i in range(5)]
    path = save_grid(tmp_path / "grid.png", specs, ncols=2)
    assert path.read_bytes()[:8] == PNG_MAGIC
    fig = plot_grid(specs, ncols=2)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 10  # five cells, each with a twin score axis; the sixth cell is hidden


def test_plot_inputs_are_checked():
    with pytest.raises(DataError, match="timestamps"):
        SeriesPlot(timestamps=np.arange(3), values=np.arange(4))
    with pytest.raises(DataError, match="scores"):
        SeriesPlot(timestamps=np.arange(3), values=np.arange(3), scores=np.arange(2))
    with pytest.raises(DataError):
        plot_grid([])
