"""The core's command line: ``train`` and ``score`` (and the parser others extend).

Why it exists: the same operations a notebook does, from a shell. ``streams.cli`` adds the
service's commands (``serve``, ``simulate``, ``demo``, ``export``) to the parser built here; the
``sensor-anomaly`` console script points there, so this module stays free of Kafka.

Every failure caused by the user's input (a bad flag, a missing column, a corrupt bundle) ends
with exit code 2 and a one-line ``sensor-anomaly: error: ...`` message.

What it must not do: import torch, pandas or :mod:`anomaly.evaluation` at module level. ``--help`` and
``serve`` pay only for what they run; a command's heavy imports happen inside its handler, and
``evaluate``'s flags are added by :func:`add_lazy_command` when ``evaluate`` is the command given.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from anomaly.errors import AnomalyError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Command", "add_lazy_command", "build_parser", "main", "run"]

logger = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]
PROG = "sensor-anomaly"


class UsageError(Exception):
    """A command was given arguments that cannot work together (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are ONE line on stderr (argparse prints the usage block first).

    Subcommand parsers inherit the class (``add_subparsers`` uses the parent's type), so every
    command's flag errors look alike: ``sensor-anomaly train: error: ... (see --help)``.
    """

    populate: str | None = None  # "module:function" that adds this parser's arguments on first use

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        if self.populate is not None:
            module, function = self.populate.split(":")
            self.populate = None
            getattr(importlib.import_module(module), function)(self)
        return super().parse_known_args(args, namespace)


def add_lazy_command(sub: argparse._SubParsersAction, name: str, populate: str,  # type: ignore[type-arg]
                     help: str, description: str) -> argparse.ArgumentParser:
    """Register command ``name`` whose flags ``populate`` ("module:function") adds when it is parsed.

    The top-level ``--help`` lists the command from ``help`` alone, so the module that defines its
    flags and handler (and what that module imports) is loaded only when the command is run or its
    own ``--help`` is asked for.

    >>> parser, sub = build_parser()
    >>> args = parser.parse_args(["evaluate", "nab", "--data", "nab", "--out", "res"])
    >>> args.benchmark, args.detector, str(args.out)
    ('nab', 'ours', 'res')
    """
    parser = sub.add_parser(name, help=help, description=description)
    parser.populate = populate
    return parser


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def csv_list(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return items


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


def _looks_numeric(column: pd.Series) -> bool:
    """A default feature: a numeric column, or a text column whose cells are mostly numbers.

    The second case keeps a column with a few typos among the features, so training stops at the
    bad cell with a message naming it instead of silently leaving the column out.
    """
    import pandas as pd

    if pd.api.types.is_bool_dtype(column.dtype):
        return False
    if pd.api.types.is_numeric_dtype(column.dtype):
        return True
    present = column.dropna()
    return len(present) > 0 and float(pd.to_numeric(present, errors="coerce").notna().mean()) >= 0.9


def _cmd_train(args: argparse.Namespace) -> int:
    from anomaly.evaluation.datasets import read_table
    from anomaly.training import fit

    frame = read_table(args.data)
    if args.time_col not in frame:
        raise UsageError(f"--time-col {args.time_col!r} is not a column of {args.data} "
                         f"(columns: {list(frame.columns)})")
    context = args.context or []
    features = args.features or [c for c in frame.columns if c not in (args.time_col, args.device_col, *context)
                                 and _looks_numeric(frame[c])]
    if not features:
        raise UsageError(f"no numeric feature columns in {args.data}; pass --features")
    overrides = {k: v for k, v in {"epochs": args.epochs, "hidden_size": args.hidden_size,
                                   "num_layers": args.layers, "window": args.window,
                                   "val_fraction": args.val_fraction, "seed": args.seed}.items() if v is not None}
    from anomaly.bundle import DetectorConfig

    if args.seasonal and args.episode_rule != "novelty":
        raise UsageError("--seasonal needs --episode-rule novelty (the seasonal error channel feeds its records)")
    detector = DetectorConfig(false_alarm_rate=args.false_alarm_rate, warmup_steps=args.warmup_steps,
                              episode_rule=args.episode_rule)
    bundle = fit(frame, features, time_col=args.time_col, device_col=args.device_col, detector=detector,
                 name=args.name, version=args.version, progress=not args.quiet, seasonal=args.seasonal,
                 context=context, **overrides)
    bundle.training.update({"time_col": args.time_col, "device_col": args.device_col, "source": str(args.data)})
    bundle.save(args.out)
    print(f"trained {bundle.name} version {bundle.version} on {bundle.training['rows']} rows "
          f"({bundle.training['devices']} devices, features {','.join(features)}"
          f"{', context ' + ','.join(context) if context else ''}) in "
          f"{bundle.training['seconds']} s; threshold score {1 - 10 ** -bundle.config.threshold:.6f}; "
          f"saved to {args.out}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from anomaly.bundle import ModelBundle
    from anomaly.detector import StreamingDetector, score_frame
    from anomaly.evaluation.datasets import read_table

    bundle = ModelBundle.load(args.model)
    frame = read_table(args.data)
    time_col = args.time_col or bundle.training.get("time_col") or "ts"
    device_col = args.device_col if args.device_col is not None else bundle.training.get("device_col")
    detector = StreamingDetector(bundle)
    scored = score_frame(detector, frame, time_col=time_col, device_col=device_col)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scored.to_csv(out, index=False)
    starts = int((scored["is_anomaly"].astype(int).diff().fillna(scored["is_anomaly"].astype(int)) > 0).sum())
    print(f"scored {int((scored['status'] == 'scored').sum())} of {len(scored)} rows with {bundle.name} "
          f"version {bundle.version}; {int(scored['is_anomaly'].sum())} rows in {starts} anomaly episode(s); "
          f"wrote {out}")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:  # type: ignore[type-arg]
    """The parser with the core's commands; callers may add more subcommands."""
    parser = _Parser(prog=PROG, description="Streaming LSTM anomaly detection for sensor fleets.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model bundle on normal history (CSV or Parquet)",
                           description="Train a forecaster on normal history and calibrate its scorer.")
    train.add_argument("--data", required=True, type=Path, help="CSV or Parquet file of normal readings")
    train.add_argument("--features", type=csv_list, help="comma-separated feature columns (default: all numeric)")
    train.add_argument("--context", type=csv_list,
                       help="comma-separated context columns (commands, setpoints, modes): model inputs at every "
                            "step, never forecast or scored (default: none)")
    train.add_argument("--time-col", default="ts", help="timestamp column (ISO-8601 or epoch ms; default: ts)")
    train.add_argument("--device-col", default=None, help="device id column (default: one device)")
    train.add_argument("--out", required=True, type=Path, help="directory to write the model bundle to")
    train.add_argument("--name", default="sensor-anomaly", help="model name recorded in the bundle")
    train.add_argument("--version", default="1", help="model version recorded in the bundle (default: 1)")
    train.add_argument("--epochs", type=_positive_int, help="maximum training epochs (default: 30)")
    train.add_argument("--hidden-size", type=_positive_int, help="LSTM hidden size (default: 64)")
    train.add_argument("--layers", type=_positive_int, help="LSTM layers (default: 1)")
    train.add_argument("--window", type=_positive_int, help="truncated-BPTT window (default: 32)")
    train.add_argument("--val-fraction", type=_probability, help="held-out share of each device (default: 0.25)")
    train.add_argument("--false-alarm-rate", type=_probability, default=1e-4,
                       help="target share of normal readings above the threshold (default: 1e-4)")
    train.add_argument("--warmup-steps", type=_positive_int, default=10,
                       help="readings of a new device that are not scored (default: 10)")
    train.add_argument("--seed", type=int, help="random seed (default: 0)")
    train.add_argument("--episode-rule", choices=("threshold", "novelty"), default="threshold",
                       help="threshold (default): calibrated score with hysteresis; novelty: an alert when a "
                            "device beats its own record of surprise or value range by 5 %% (what the NAB and "
                            "SKAB results use)")
    train.add_argument("--seasonal", action="store_true",
                       help="with --episode-rule novelty: if the training rows have a clear cycle (daily, "
                            "weekly...), add the seasonal error channel (each reading against the device's "
                            "profile of past cycles; P x F x 4 bytes more state per device)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    score = sub.add_parser("score", help="score a CSV/Parquet file with a model bundle",
                           description="Stream a table through the detector; adds score, is_anomaly, status "
                                       "and expected_* columns.")
    score.add_argument("--model", required=True, type=Path, help="model bundle directory")
    score.add_argument("--data", required=True, type=Path, help="CSV or Parquet file of readings")
    score.add_argument("--out", required=True, type=Path, help="CSV file to write")
    score.add_argument("--time-col", help="timestamp column (default: the one the model was trained with)")
    score.add_argument("--device-col", help="device id column (default: the one the model was trained with)")
    score.set_defaults(func=_cmd_score)
    add_lazy_command(sub, "evaluate", "anomaly.evaluation.runs:add_evaluate_arguments",
                     help="detection quality on the NAB, SKAB or MSL benchmark",
                     description="Train and stream every file of a benchmark through the detector, write per-row "
                                 "results and plots, and print the benchmark's scores.")
    return parser, sub


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse and dispatch; map the package errors to exit code 2 with one line on stderr."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # library warnings (pandas dtype guesses, numpy casts) would add lines to stderr; they are logged
    # instead, and shown with -v
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if args.verbose else logging.ERROR)
    try:
        return int(args.func(args))
    except (AnomalyError, UsageError, ValueError, OSError) as exc:
        logger.debug("command failed", exc_info=True)
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        logging.captureWarnings(False)


def main(argv: Sequence[str] | None = None) -> int:
    parser, _ = build_parser()
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
