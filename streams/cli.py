"""The ``sensor-anomaly`` command: the core's commands plus ``serve``, ``simulate``, ``demo`` and ``export``.

Why it exists here and not in ``anomaly.cli``: these commands talk to Kafka and serve HTTP, which
the core must never import. This module adds them to the parser ``anomaly.cli`` builds, so there
is one command with one set of conventions: ``--help`` everywhere, exit code 2 and one line on
stderr for bad flags, settings or data.

What it must not do: import torch, Kafka clients or the development tools (``streams.dev``) at
module level; each command imports what it runs, and ``simulate``/``demo`` fail with one line where
``streams.dev`` is not installed (the container image).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomaly import cli as core_cli
from streams.errors import StreamsError

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "bootstrap_servers": args.bootstrap, "model_dir": args.model, "group_id": args.group,
        "input_topic": args.input_topic, "events_topic": args.events_topic, "dlq_topic": args.dlq_topic,
        "input_partitions": args.partitions, "processing_guarantee": args.guarantee,
        "commit_interval_s": args.commit_interval, "metrics_host": args.metrics_host,
        "metrics_port": args.metrics_port, "transactional_id": args.transactional_id,
        "shadow_model": args.shadow_model, "max_poll_records": args.max_poll_records,
    }


def _cmd_serve(args: argparse.Namespace) -> int:
    from streams.config import ServiceConfig
    from streams.service import run_service

    overrides = _serve_overrides(args)
    if args.scores_topic:
        overrides["extra"] = {"scores_topic": args.scores_topic}
    config = ServiceConfig.from_sources(overrides)
    return run_service(config)


def _dev_module(name: str) -> Any:
    """``streams.dev.<name>``, or a ``StreamsError`` saying why the development tools are missing."""
    try:
        return importlib.import_module(f"streams.dev.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("streams.dev", f"streams.dev.{name}"):
            raise
        raise StreamsError(f"{name} is a development tool and this installation leaves out streams.dev (the "
                           f"container image does); run it from a source checkout") from None


def _cmd_simulate(args: argparse.Namespace) -> int:
    from anomaly.synthetic import FleetSpec

    run_simulator = _dev_module("simulator").run_simulator

    spec = FleetSpec(n_devices=args.devices, seed=args.seed, interval_ms=args.interval_ms,
                     start_ms=None if args.start_ms is None else args.start_ms,
                     clean_steps=args.clean_steps)
    summary = run_simulator(spec, topic=args.topic, bootstrap_servers=args.bootstrap, rate_per_s=args.rate,
                            duration_s=args.duration, max_readings=args.max_readings, window=args.window,
                            anomaly_rate=args.anomaly_rate)
    print(f"sent {summary.readings_sent} readings in {summary.messages_sent} messages "
          f"({summary.send_errors} failed) in {summary.wall_s:.1f} s; {len(summary.anomalies)} anomalies injected")
    for a in summary.anomalies:
        print(f"  {a.device_id} {a.kind} from {a.start_ms} to {a.end_ms} on {','.join(a.features)}")
    return 0 if summary.send_errors == 0 else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    demo = _dev_module("demo")
    return demo.run_demo(demo.DemoOptions(seconds=args.seconds, devices=args.devices, rate=args.rate,
                                          workdir=args.workdir, metrics_port=args.metrics_port,
                                          anomaly_rate=args.anomaly_rate))


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _port(text: str) -> int:
    value = core_cli._positive_int(text) if text != "0" else 0
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {value}")
    return value


def add_service_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``serve``, ``simulate``, ``demo`` and ``export`` on the core's subparsers."""
    serve = sub.add_parser(
        "serve", help="run the stream processor (Kafka in, anomaly events out)",
        description="Consume readings, score them with the model, produce anomaly events and dead letters. "
                    "Every flag can also be set as an environment variable SENSOR_ANOMALY_<SETTING> "
                    "(e.g. SENSOR_ANOMALY_BOOTSTRAP_SERVERS); flags win.")
    serve.add_argument("--bootstrap", help="Kafka bootstrap servers host:port[,...] (or KAFKA_BOOTSTRAP_SERVERS)")
    serve.add_argument("--model", type=Path, help="model bundle directory, or a model registry directory")
    serve.add_argument("--group", help="consumer group id (default: sensor-anomaly)")
    serve.add_argument("--input-topic", help="readings topic (default: sensor.readings)")
    serve.add_argument("--events-topic", help="anomaly events topic (default: sensor.anomalies)")
    serve.add_argument("--dlq-topic", help="dead-letter topic (default: sensor.readings.dlq)")
    serve.add_argument("--partitions", type=core_cli._positive_int,
                       help="partitions for topics created at start-up (default: 6)")
    serve.add_argument("--guarantee", choices=["at_least_once", "exactly_once"],
                       help="processing guarantee (default: at_least_once)")
    serve.add_argument("--commit-interval", type=float, help="seconds between commits (default: 1.0)")
    serve.add_argument("--max-poll-records", type=core_cli._positive_int, help="records per poll (default: 10000)")
    serve.add_argument("--metrics-host", help="bind address of /metrics, /healthz, /readyz (default: 0.0.0.0)")
    serve.add_argument("--metrics-port", type=_port, help="port of /metrics, /healthz, /readyz (default: 9400)")
    serve.add_argument("--transactional-id", help="exactly-once: transactional id (default: <group>-<hostname>)")
    serve.add_argument("--shadow-model", help="also score with this registry version; events to the shadow topic")
    serve.add_argument("--scores-topic", help="also publish every reading's score to this topic (debugging)")
    serve.set_defaults(func=_cmd_serve)

    sim = sub.add_parser("simulate", help="produce a simulated sensor fleet to Kafka",
                         description="A fleet of simulated sensors (daily cycles, noise, injected anomalies whose "
                                     "times are printed) producing readings to the readings topic.")
    sim.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers host:port[,...]")
    sim.add_argument("--topic", default="sensor.readings", help="readings topic (default: sensor.readings)")
    sim.add_argument("--devices", type=core_cli._positive_int, default=100, help="fleet size (default: 100)")
    sim.add_argument("--rate", type=float, default=1000.0, help="readings per second (default: 1000)")
    sim.add_argument("--anomaly-rate", type=_nonneg_float, default=0.5,
                     help="injected anomalies per device-hour of simulated time (default: 0.5)")
    sim.add_argument("--window", type=core_cli._positive_int, default=1,
                     help="readings per message (default: 1, single readings)")
    sim.add_argument("--duration", type=float, help="stop after this many seconds")
    sim.add_argument("--max-readings", type=core_cli._positive_int, help="stop after this many readings")
    sim.add_argument("--interval-ms", type=core_cli._positive_int, default=1000,
                     help="event-time step between a device's readings (default: 1000)")
    sim.add_argument("--clean-steps", type=int, default=600, help="readings before any anomaly (default: 600)")
    sim.add_argument("--start-ms", type=int, help="event time of the first reading (default: now)")
    sim.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    sim.set_defaults(func=_cmd_simulate)

    demo = sub.add_parser("demo", help="the whole pipeline on this machine: broker, fleet, detector, events",
                          description="Starts a local Kafka broker, trains a model on simulated normal data (reused "
                                      "when present), starts the service and the simulator, prints anomaly events, "
                                      "and a summary on Ctrl-C or after --seconds (or DEMO_SECONDS).")
    demo.add_argument("--seconds", type=float, help="stop after this many seconds (default: $DEMO_SECONDS or never)")
    demo.add_argument("--devices", type=core_cli._positive_int, default=50, help="fleet size (default: 50)")
    demo.add_argument("--rate", type=float, default=500.0, help="readings per second (default: 500)")
    demo.add_argument("--anomaly-rate", type=_nonneg_float, default=1.0,
                      help="injected anomalies per device-hour of simulated time (default: 1.0)")
    demo.add_argument("--workdir", type=Path, default=Path("demo-run"),
                      help="where the model and broker data live (default: ./demo-run)")
    demo.add_argument("--metrics-port", type=_port, default=9400, help="metrics port (default: 9400; 0 = any)")
    demo.set_defaults(func=_cmd_demo)

    core_cli.add_lazy_command(
        sub, "export", "streams.export:add_export_arguments",
        help="export a time range of a topic to a Parquet/CSV table (for notebooks)",
        description="Read the records of a topic whose Kafka timestamps lie in [since, until) (found with "
                    "offsets_for_times) into one tidy table: device_id, ts (epoch ms), one column per feature. "
                    "Bad messages are skipped and counted. Exit code 1 if a partition could not be read to its end.")


def main(argv: Sequence[str] | None = None) -> int:
    parser, sub = core_cli.build_parser()
    add_service_commands(sub)
    try:
        return core_cli.run(parser, argv)
    except StreamsError as exc:  # settings and broker problems found while starting
        print(f"{core_cli.PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
