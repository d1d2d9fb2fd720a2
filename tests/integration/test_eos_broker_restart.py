"""Exactly-once across a broker restart: the service rides out the outage and the results are unchanged.

The broker is a dedicated LocalKafka (``local_kafka`` fixture) that is stopped in the middle of the
stream and started again on the same data directory and ports. The processor keeps running
throughout: its sends, commits and restores fail or block while the broker is away, it discards
what it had not committed, backs off, reconnects and goes on. Afterwards the events topic and the
score stream (read_committed) must equal the uninterrupted run exactly (state_support.compare_exactly_once).
"""

from __future__ import annotations

import time
import uuid

import pytest

from anomaly.bundle import ModelBundle
from tests.integration.helpers import ProcessorThread, produce
from tests.integration.state_support import (
    baseline_for,
    compare_exactly_once,
    config,
    input_messages,
    model_dir,
    new_topic,
    read_output,
    wait_until_committed,
)

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize(("outage_s", "hooks"), [
    pytest.param(2.0, {}, id="ride-out"),  # the commit in flight waits for the broker and completes
    # the commit gives up: the transaction is dropped, the producer re-initialised, the partitions restored
    pytest.param(6.0, {"commit_timeout_s": 2.0}, id="give-up-and-redo"),
])
def test_exactly_once_run_survives_a_broker_restart_with_identical_results(kafka_bootstrap, local_kafka, outage_s,
                                                                            hooks):
    base = baseline_for(kafka_bootstrap)  # the uninterrupted run (session broker, same input and partitions)
    bootstrap = local_kafka.bootstrap
    topic = new_topic(bootstrap, "broker-restart")
    group = f"g-{uuid.uuid4().hex[:8]}"
    messages = input_messages()
    before = 2 * len(messages) // 3
    produce(bootstrap, topic, messages[:before])
    # short client reconnect backoff, so the test does not wait out kafka-python's 30 s default
    worker = ProcessorThread(config(bootstrap, topic, group, reconnect_backoff_max_s=1.0, extra=hooks,
                                    max_poll_records=50 if hooks else 200),
                             ModelBundle.load(model_dir()))
    if hooks:  # slow scoring, so that work is still uncommitted whenever the broker goes away
        score = worker.processor.detector.process

        def slow(batch):  # type: ignore[no-untyped-def]
            time.sleep(0.4)
            return score(batch)

        worker.processor.detector.process = slow  # type: ignore[method-assign]
    worker.wait_for(lambda s: s.records >= before // 4, timeout_s=60)
    local_kafka.stop()
    processed_at_stop = worker.processor.stats.records
    time.sleep(outage_s)  # the service works on what it had fetched, then finds the broker gone
    assert worker.thread.is_alive() and worker.error is None
    local_kafka.start()
    produce(bootstrap, topic, messages[before:])
    wait_until_committed(bootstrap, topic, group, timeout_s=120, check=lambda: worker.error)
    stats = worker.stop()
    assert processed_at_stop < len(messages), "the broker stopped after the stream: the test proves nothing"
    print(f"processed {processed_at_stop} of {len(messages)} before the broker stopped; recoveries "
          f"{stats.recoveries}, discarded windows {stats.rewinds}, restores {stats.restores}, commits {stats.commits}")
    if hooks:
        assert stats.rewinds >= 1 and stats.restores >= 2, "the outage did not make the processor redo its work"
    compare_exactly_once(read_output(bootstrap, topic, read_committed=True), base)
