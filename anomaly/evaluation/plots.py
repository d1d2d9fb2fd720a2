"""Pictures of scored series: values, anomaly score, threshold, labelled windows and detections.

Why this module exists: a benchmark number says how much a detector is off, a plot says where and
why (late detections, a threshold just under the noise, a window with no signal). The CLI's
``evaluate`` command, the notebooks and the benchmark scripts draw the same pictures from here.

What it must not do: score or threshold anything (that is :mod:`anomaly.evaluation.scorers` and the
detector), or touch global matplotlib state. It builds :class:`matplotlib.figure.Figure` objects
directly (no ``pyplot``, no ``matplotlib.use``), which render with the Agg canvas, so it is safe in
servers, tests and headless CI and never opens a window. No Kafka, no HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from anomaly.errors import DataError

__all__ = ["SeriesPlot", "plot_file", "plot_grid", "save_grid", "save_plot"]

logger = logging.getLogger(__name__)

#: Up to this many features get a legend entry each; more would hide the plot.
_MAX_LEGEND_FEATURES = 10

_WINDOW_STYLE = {"color": "tab:red", "alpha": 0.15, "linewidth": 0}
_DETECTION_COLOR = "crimson"


@dataclass(frozen=True)
class SeriesPlot:
    """What to draw for one file.

    Attributes
    ----------
    timestamps : array-like
        [N] x positions: datetimes, strings that parse as datetimes, or numbers.
    values : DataFrame, Mapping of name to [N] arrays, or array [N] / [N, F]
        The series; each column is one line.
    scores : array-like, optional
        [N] anomaly scores, drawn in their own panel.
    threshold : float, optional
        Drawn as a dashed line in the score panel.
    windows : sequence of (start, end)
        Labelled anomaly windows, shaded in every panel.
    detections : array-like of bool, optional
        [N] rows where the detector fired. Default: ``scores >= threshold`` when both are given.
    title : str
    standardize : bool
        Draw each feature as a z-score (for multivariate series whose scales differ, e.g. SKAB).
    """

    timestamps: Any
    values: Any
    scores: Any = None
    threshold: float | None = None
    windows: Sequence[tuple[Any, Any]] = ()
    detections: Any = None
    title: str = ""
    standardize: bool = False
    _frame: pd.DataFrame = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_frame", _as_frame(self.values))
        n = len(self._frame)
        if len(self.x) != n:
            raise DataError(f"plot {self.title!r}: {len(self.x)} timestamps but {n} value rows")
        for label, arr in (("scores", self.scores), ("detections", self.detections)):
            if arr is not None and np.asarray(arr).reshape(-1).size != n:
                raise DataError(f"plot {self.title!r}: {label} has {np.asarray(arr).size} rows, expected {n}")

    @property
    def x(self) -> np.ndarray:
        """[N] x positions (datetime64 or numbers)."""
        ts = np.asarray(self.timestamps)
        if ts.dtype.kind in "iuf" or ts.dtype.kind == "M":
            return ts
        try:
            return pd.to_datetime(pd.Series(ts)).to_numpy()
        except (ValueError, TypeError) as exc:
            raise DataError(f"plot {self.title!r}: cannot parse timestamps: {exc}") from exc

    @property
    def fired(self) -> np.ndarray | None:
        """[N] bool detections, or None when there is nothing to mark."""
        if self.detections is not None:
            return np.asarray(self.detections, dtype=bool).reshape(-1)
        if self.scores is not None and self.threshold is not None:
            return np.asarray(self.scores, dtype=np.float64).reshape(-1) >= self.threshold
        return None


def _as_frame(values: Any) -> pd.DataFrame:
    if isinstance(values, pd.DataFrame):
        frame = values
    elif isinstance(values, pd.Series):
        frame = values.to_frame(name=values.name if values.name is not None else "value")
    elif isinstance(values, Mapping):
        frame = pd.DataFrame({str(k): np.asarray(v).reshape(-1) for k, v in values.items()})
    else:
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise DataError(f"plot values must be [N] or [N, F], got shape {arr.shape}")
        frame = pd.DataFrame(arr, columns=["value"] if arr.shape[1] == 1 else
                             [f"feature {i}" for i in range(arr.shape[1])])
    if frame.shape[1] == 0:
        raise DataError("plot values hold no columns")
    return frame.reset_index(drop=True)


def _window_x(bound: Any, x: np.ndarray) -> Any:
    return bound if x.dtype.kind in "iuf" else pd.Timestamp(bound)


def _shade_windows(ax: Axes, spec: SeriesPlot, x: np.ndarray, label: bool) -> None:
    for i, (start, end) in enumerate(spec.windows):
        ax.axvspan(_window_x(start, x), _window_x(end, x), **_WINDOW_STYLE,
                   label="anomaly window" if label and i == 0 else None)


def _draw(spec: SeriesPlot, ax_values: Axes, ax_score: Axes | None, *, compact: bool) -> None:
    x = spec.x
    frame = spec._frame
    for col in frame.columns:
        y = frame[col].to_numpy(dtype=np.float64)
        if spec.standardize:
            sd = np.nanstd(y)
            y = (y - np.nanmean(y)) / (sd if sd > 0 else 1.0)
        ax_values.plot(x, y, linewidth=0.8, label=str(col))
    if spec.standardize:
        ax_values.set_ylabel("z-score", fontsize=8 if compact else 10)
    _shade_windows(ax_values, spec, x, label=True)
    fired = spec.fired
    if fired is not None and fired.any():
        # A rug at the top of the values panel: works for any number of features.
        ax_values.plot(x[fired], np.full(int(fired.sum()), 0.97), linestyle="none", marker="|",
                       markersize=8 if not compact else 5, color=_DETECTION_COLOR,
                       transform=ax_values.get_xaxis_transform(), label="detection")
    if spec.title:
        ax_values.set_title(spec.title, fontsize=9 if compact else 11)
    if ax_score is not None and spec.scores is not None:
        scores = np.asarray(spec.scores, dtype=np.float64).reshape(-1)
        ax_score.plot(x, scores, color="black", linewidth=0.7, alpha=0.7 if compact else 0.9,
                      label="anomaly score")
        if spec.threshold is not None:
            ax_score.axhline(spec.threshold, color="darkorange", linestyle="--", linewidth=0.8,
                             label=f"threshold {spec.threshold:.4g}")
        if fired is not None and fired.any():
            ax_score.plot(x[fired], scores[fired], linestyle="none", marker="o", markersize=3,
                          color=_DETECTION_COLOR)
        if not compact:
            _shade_windows(ax_score, spec, x, label=False)
            ax_score.set_ylabel("score")
            ax_score.legend(loc="upper left", fontsize=8)
    if not compact and frame.shape[1] <= _MAX_LEGEND_FEATURES:
        ax_values.legend(loc="upper left", fontsize=8)


def plot_file(spec: SeriesPlot | None = None, *, figsize: tuple[float, float] = (12.0, 5.0),
              **fields: Any) -> Figure:
    """Draw one file: values on top, score and threshold below, windows shaded, detections marked.

    Parameters
    ----------
    spec : SeriesPlot, optional
        What to draw; or pass its fields as keyword arguments instead.
    figsize : (float, float)
        Inches.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = plot_file(timestamps=np.arange(50), values=np.sin(np.arange(50) / 5),
    ...                 scores=np.linspace(0, 1, 50), threshold=0.9, windows=[(40, 45)])
    >>> len(fig.axes)
    2
    """
    spec = spec if spec is not None else SeriesPlot(**fields)
    has_score = spec.scores is not None
    fig = Figure(figsize=figsize, layout="constrained")
    if has_score:
        ax_values, ax_score = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    else:
        ax_values, ax_score = fig.subplots(1, 1), None
    _draw(spec, ax_values, ax_score, compact=False)
    return fig


def plot_grid(specs: Sequence[SeriesPlot], *, ncols: int = 2,
              cell_size: tuple[float, float] = (6.0, 2.4)) -> Figure:
    """Draw many files, one cell each (values, with the score on a twin axis).

    Parameters
    ----------
    specs : sequence of SeriesPlot
    ncols : int
        Cells per row.
    cell_size : (float, float)
        Inches per cell.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    DataError
        ``specs`` is empty or ``ncols`` < 1.
    """
    if not specs:
        raise DataError("plot_grid needs at least one SeriesPlot")
    if ncols < 1:
        raise DataError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, len(specs))
    nrows = -(-len(specs) // ncols)
    fig = Figure(figsize=(cell_size[0] * ncols, cell_size[1] * nrows), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    for ax, spec in zip(axes, specs, strict=False):
        ax_score = ax.twinx() if spec.scores is not None else None
        _draw(spec, ax, ax_score, compact=True)
        ax.tick_params(labelsize=7)
        if ax_score is not None:
            ax_score.tick_params(labelsize=7)
    for ax in axes[len(specs):]:
        ax.set_visible(False)
    return fig


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi)
    logger.info("wrote plot %s", p)
    return p


def save_plot(path: str | Path, spec: SeriesPlot | None = None, *, dpi: int = 100, **fields: Any) -> Path:
    """Draw one file with :func:`plot_file` and write it (format from the suffix, e.g. ``.png``).

    Returns
    -------
    Path
        The file written (parent folders are created).
    """
    figsize = fields.pop("figsize", (12.0, 5.0))
    return _save(plot_file(spec, figsize=figsize, **fields), path, dpi)


def save_grid(path: str | Path, specs: Sequence[SeriesPlot], *, ncols: int = 2, dpi: int = 100,
              cell_size: tuple[float, float] = (6.0, 2.4)) -> Path:
    """Draw many files with :func:`plot_grid` and write the figure.

    Returns
    -------
    Path
        The file written (parent folders are created).
    """
    return _save(plot_grid(specs, ncols=ncols, cell_size=cell_size), path, dpi)
