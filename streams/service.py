"""``sensor-anomaly serve``: wire settings, model, metrics endpoint and processor together, run until signalled.

Why it exists: start-up order matters and is written once here — validate settings, load and
check the model (before touching Kafka, so a bad bundle stops start-up with a clear message),
start the metrics endpoint (so liveness answers while the broker is still being waited for),
connect with retries, then process until SIGTERM/SIGINT, commit and leave the group.
"""

from __future__ import annotations

import gc
import logging
import time

import torch

from anomaly.bundle import ModelBundle
from anomaly.registry import load_model_dir
from streams.config import ServiceConfig
from streams.errors import BrokerUnavailableError
from streams.http import MetricsServer
from streams.metrics import ServiceMetrics
from streams.processor import StreamProcessor, run_until_signalled

__all__ = ["load_model", "run_service"]

logger = logging.getLogger(__name__)

CONNECT_ATTEMPT_S = 30.0


def load_model(config: ServiceConfig) -> tuple[ModelBundle, float]:
    """The live bundle of ``config.model_dir`` (a bundle, or a registry's live version) and the seconds it took."""
    started = time.perf_counter()
    bundle, _ = load_model_dir(config.model_dir)
    return bundle, time.perf_counter() - started


def run_service(config: ServiceConfig) -> int:
    """Run the service; returns the process exit code."""
    logging.getLogger().setLevel(config.log_level)
    torch.set_num_threads(config.torch_threads)
    logger.info("starting with settings %s", config.redacted())
    bundle, load_s = load_model(config)
    metrics = ServiceMetrics(topics=[config.input_topic], liveness_timeout_s=config.liveness_timeout_s,
                             process_metrics=True)
    processor = StreamProcessor(config, bundle, metrics)
    # after the processor: its constructor records the model with a load time of 0 s
    metrics.set_model(bundle.name, bundle.version, len(bundle.features), load_s)
    server = MetricsServer(metrics, host=config.metrics_host, port=config.metrics_port)
    server.start()
    logger.info("metrics on %s/metrics; model %s version %s (%d features) loaded in %.2f s", server.url,
                bundle.name, bundle.version, len(bundle.features), load_s)
    try:
        attempt = 0
        while True:
            try:
                processor.connect(timeout_s=CONNECT_ATTEMPT_S)
                break
            except BrokerUnavailableError as exc:
                attempt += 1
                wait = min(config.reconnect_backoff_max_s, 2.0 ** min(attempt, 5))
                logger.warning("broker not reachable (attempt %d): %s; retrying in %.0f s", attempt, exc, wait)
                metrics.mark_progress()  # waiting for the broker is not a hang
                time.sleep(wait)
        # everything allocated so far (torch, the model, the clients) lives as long as the process: keep it
        # out of the garbage collector's full passes, which otherwise walk it and pause the loop
        gc.freeze()
        stats = run_until_signalled(processor)
    finally:
        server.stop()
    logger.info("stopped: %d batches, readings %s, dead letters %s, events %s, %d commits", stats.batches,
                dict(stats.readings), dict(stats.dead_letters), dict(stats.events), stats.commits)
    return 0
