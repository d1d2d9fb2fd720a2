"""Per-device state across crashes, rebalances and fencing, against the real broker (issue 4).

Every test runs the same fleet input (tests/integration/state_support.py) and compares with one
uninterrupted exactly-once run of it: every reading's status and score (score stream, by input
partition and offset) and every event. Instances are ``sensor-anomaly serve`` processes, so a
SIGKILL is a real kill: no commit, no LeaveGroup, an open transaction left hanging.

The kill point and pause are random; the seed is printed in every assertion message
(set ``STATE_TEST_SEED`` to replay one).
"""

from __future__ import annotations

import os
import random
import struct
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest
from kafka import KafkaProducer

from anomaly.bundle import ModelBundle
from anomaly.snapshots import decode_states, encode_states
from anomaly.state import DeviceStateStore
from streams.state.changelog import decode_bucket, encode_bucket, parse_bucket_key
from tests.integration.helpers import ProcessorThread, consume_all, produce, scores_of
from tests.integration.state_support import (
    Instance,
    assert_scores_match,
    baseline_for,
    committed_offsets,
    compare_exactly_once,
    config,
    input_messages,
    model_dir,
    new_topic,
    read_output,
    trickle,
    wait_group_settled,
    wait_until_committed,
)

pytestmark = pytest.mark.kafka


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("STATE_TEST_SEED", time.time_ns() % 1_000_000))
    print(f"STATE_TEST_SEED={value}")
    return value


def scored_so_far(bootstrap: str, topic: str) -> int:
    """Readings scored up to now (read_uncommitted: progress only, may include aborted rows)."""
    return len(scores_of(consume_all(bootstrap, f"{topic}.scores", idle_s=0.3, timeout_s=10)))


def wait_scored(bootstrap: str, topic: str, at_least: int, instances: list[Instance], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while scored_so_far(bootstrap, topic) < at_least:
        for inst in instances:
            assert inst.alive(), f"{inst.name} died\n{inst.output()}"
        assert time.monotonic() < deadline, f"fewer than {at_least} readings scored in {timeout_s} s"
        time.sleep(0.3)


def check_alive(instances: list[Instance]) -> str | None:
    dead = [i for i in instances if not i.alive()]
    return f"{dead[0].name} exited with {dead[0].proc.returncode}\n{dead[0].output()}" if dead else None


def group_instance(name: str, bootstrap: str, topic: str, group: str, guarantee: str, log_dir: Path) -> Instance:
    """A ``serve`` process of ``group`` (not started); under exactly-once with a transactional id of its own."""
    transactional_id = f"{group}-{name}" if guarantee == "exactly_once" else None
    return Instance(name, bootstrap, topic, group, guarantee, log_dir, transactional_id=transactional_id)


def kill_survivors(instances: list[Instance]) -> None:
    """SIGKILL every instance still running (a failed test must not leave servers behind)."""
    for inst in instances:
        if inst.alive():
            inst.proc.kill()


def check_guarantee(bootstrap: str, topic: str, base, guarantee: str, committed_before: dict[int, int],
                    context: str) -> None:
    """The run's output against the uninterrupted baseline, by the rules of ``guarantee``."""
    if guarantee == "exactly_once":
        compare_exactly_once(read_output(bootstrap, topic, read_committed=True), base)
    else:
        check_at_least_once(read_output(bootstrap, topic, read_committed=False), base, committed_before, context)


def check_at_least_once(run, base, committed_before: dict[int, int], context: str) -> int:
    """No reading or event missing; repeats only at or after ``committed_before``; returns the repeats."""
    missing = set(base.output.scores) - set(run.scores)
    assert not missing, f"{context}: {len(missing)} readings never scored, e.g. {sorted(missing)[:5]}"
    repeats = {key: len(rows) - 1 for key, rows in run.scores.items() if len(rows) > 1}
    early = [key for key in repeats if key[1] < committed_before[key[0]]]
    assert not early, (f"{context}: readings before the committed offsets {committed_before} were scored again, "
                       f"e.g. {early[:5]}")
    for key, rows in run.scores.items():
        (base_row,) = base.output.scores[key]
        assert any(r["status"] == base_row["status"] for r in rows), f"{context}: {key} {rows} vs {base_row}"
    assert_scores_match(run, base)
    events, base_events = run.event_keys(), base.output.event_keys()
    lost = base_events - events
    assert not lost, f"{context}: events lost {lost}"
    extra = events - base_events
    unexpected = [k for k in extra if k not in base_events or k[4] < committed_before[k[3]]]
    assert not unexpected, f"{context}: events that are not repeats of the last uncommitted work: {unexpected}"
    print(f"{context}: {sum(repeats.values())} readings and {sum(extra.values())} events repeated "
          f"(all at or after the offsets committed before the disruption, {committed_before})")
    return sum(repeats.values())


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_sigkill_and_restart_scores_every_reading_like_the_uninterrupted_run(kafka_bootstrap, tmp_path, seed,
                                                                             guarantee):
    base = baseline_for(kafka_bootstrap)
    rng = random.Random(seed)
    topic = new_topic(kafka_bootstrap, f"crash-{guarantee}")
    group = f"g-{uuid.uuid4().hex[:8]}"
    a = group_instance("a", kafka_bootstrap, topic, group, guarantee, tmp_path).start()
    b = group_instance("b", kafka_bootstrap, topic, group, guarantee, tmp_path).start()
    instances = [a, b]
    try:
        wait_group_settled([a, b])
        feeder = trickle(kafka_bootstrap, topic, input_messages())
        kill_at = int(rng.uniform(0.2, 0.6) * base.sent)
        wait_scored(kafka_bootstrap, topic, kill_at, instances)
        a.kill()
        committed_at_kill = committed_offsets(kafka_bootstrap, topic, group, stable=False)
        time.sleep(rng.uniform(0.5, 3.0))
        a.start()
        feeder.join(timeout=60)
        # the restarted process must be running (not still importing torch) before it is asked to stop
        a.wait_for_log("partitions assigned", timeout_s=90, current=True)
        wait_until_committed(kafka_bootstrap, topic, group, timeout_s=90, check=lambda: check_alive(instances))
        codes = [a.terminate(), b.terminate()]
    finally:
        kill_survivors(instances)
    assert codes == [0, 0], f"seed {seed}: exit codes {codes}\n{a.output()}\n{b.output()}"
    context = f"seed {seed}, killed at ~{kill_at} of {base.sent} readings, committed then {committed_at_kill}"
    assert sum(committed_at_kill.values()) < base.sent, f"{context}: the kill came after the stream: proves nothing"
    check_guarantee(kafka_bootstrap, topic, base, guarantee, committed_at_kill, context)


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_a_third_instance_joining_mid_stream_changes_nothing_in_the_results(kafka_bootstrap, tmp_path, seed,
                                                                            guarantee):
    base = baseline_for(kafka_bootstrap)
    rng = random.Random(seed)
    topic = new_topic(kafka_bootstrap, f"rebalance-{guarantee}")
    group = f"g-{uuid.uuid4().hex[:8]}"
    a = group_instance("a", kafka_bootstrap, topic, group, guarantee, tmp_path).start()
    b = group_instance("b", kafka_bootstrap, topic, group, guarantee, tmp_path).start()
    c = group_instance("c", kafka_bootstrap, topic, group, guarantee, tmp_path)
    instances = [a, b]
    try:
        wait_group_settled([a, b])
        feeder = trickle(kafka_bootstrap, topic, input_messages(), chunks=16)
        wait_scored(kafka_bootstrap, topic, int(rng.uniform(0.15, 0.4) * base.sent), instances)
        committed_before = committed_offsets(kafka_bootstrap, topic, group)
        c.start()
        instances.append(c)
        c.wait_for_log("partitions assigned")
        feeder.join(timeout=60)
        wait_until_committed(kafka_bootstrap, topic, group, timeout_s=90, check=lambda: check_alive(instances))
        codes = [inst.terminate() for inst in instances]
    finally:
        kill_survivors([a, b, c])
    context = f"seed {seed}, third instance joined with {committed_before} committed"
    assert codes == [0, 0, 0], f"{context}: exit codes {codes}\n{a.output()}\n{b.output()}\n{c.output()}"
    assert sum(committed_before.values()) < base.sent, f"{context}: joined after the stream: proves nothing"
    check_guarantee(kafka_bootstrap, topic, base, guarantee, committed_before, context)


def test_a_second_instance_with_the_same_transactional_id_fences_the_first_without_duplicates(kafka_bootstrap,
                                                                                               tmp_path):
    base = baseline_for(kafka_bootstrap)
    topic = new_topic(kafka_bootstrap, "fencing")
    group = f"g-{uuid.uuid4().hex[:8]}"
    shared_id = f"{group}-same-host"  # as two instances on one host get by default (<group>-<hostname>)
    old = Instance("old", kafka_bootstrap, topic, group, "exactly_once", tmp_path, transactional_id=shared_id).start()
    new = Instance("new", kafka_bootstrap, topic, group, "exactly_once", tmp_path, transactional_id=shared_id)
    messages = input_messages()
    third = len(messages) // 3
    try:
        old.wait_for_log("partitions assigned")
        produce(kafka_bootstrap, topic, messages[:third])
        wait_scored(kafka_bootstrap, topic, third // 2, [old])
        new.start()
        new.wait_for_log("partitions assigned")  # its init_transactions came first: the old epoch is fenced
        feeder = trickle(kafka_bootstrap, topic, messages[third:])  # every partition gets more to do
        deadline = time.monotonic() + 60
        while old.alive():
            assert new.alive(), f"the new instance died\n{new.output()}"
            assert time.monotonic() < deadline, f"the old instance was not fenced\n{old.output()}"
            time.sleep(0.2)
        feeder.join(timeout=60)
        wait_until_committed(kafka_bootstrap, topic, group, timeout_s=90, check=lambda: check_alive([new]))
        new_code = new.terminate()
    finally:
        kill_survivors([old, new])
    assert old.proc.returncode == 2 and "fenced" in old.log_text(), old.output()
    assert new_code == 0, new.output()
    compare_exactly_once(read_output(kafka_bootstrap, topic, read_committed=True), base)


def test_corrupt_unknown_format_and_other_model_snapshots_are_counted_and_those_devices_warm_up(kafka_bootstrap):
    bundle = ModelBundle.load(model_dir())
    warmup = bundle.config.warmup_steps
    topic = new_topic(kafka_bootstrap, "tampered")
    group = f"g-{uuid.uuid4().hex[:8]}"
    cfg = config(kafka_bootstrap, topic, group, "exactly_once")
    messages = input_messages()
    half = len(messages) // 2
    produce(kafka_bootstrap, topic, messages[:half])
    first = ProcessorThread(cfg, bundle)
    wait_until_committed(kafka_bootstrap, topic, group, check=lambda: first.error)
    first.stop()

    changelog = consume_all(kafka_bootstrap, cfg.changelog_topic, read_committed=True)
    home: dict[str, tuple[int, bytes, int]] = {}  # device → (partition, bucket key, devices in that bucket)
    for r in changelog:
        if r.key and parse_bucket_key(r.key) and r.value is not None:
            ids = decode_states(decode_bucket(r.value)[1]).device_ids
            for device in ids:
                home[device] = (r.partition, r.key, len(ids))
    stranger = DeviceStateStore(1, 4, len(bundle.features), model_version="other-model")
    stranger.slots_for(np.array(["dev-00006"], dtype=object))
    tampered = {
        "dev-00003": encode_bucket(b"\x00garbage that is no state", half),  # corrupt
        "dev-00004": struct.pack("<4sBq", b"SACB", 99, half) + b"from a future version",  # unknown format
        "dev-00006": encode_bucket(encode_states(stranger, ["dev-00006"]), half),  # another model version
    }
    assert all(home[device][2] == 1 for device in tampered), "each tampered device must be alone in its bucket"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for device, value in tampered.items():
        partition, key, _ = home[device]
        producer.send(cfg.changelog_topic, key=key, value=value, partition=partition)
    producer.flush()
    producer.close()

    second = ProcessorThread(cfg, bundle)
    produce(kafka_bootstrap, topic, messages[half:])
    wait_until_committed(kafka_bootstrap, topic, group, check=lambda: second.error)
    stats = second.stop()
    assert stats.discarded_snapshots == Counter({"corrupt": 1, "format": 1, "model_version": 1})
    registry = second.processor.metrics.registry
    discarded = {reason: registry.get_sample_value("sensor_anomaly_state_snapshots_discarded_total",
                                                   {"reason": reason}) for reason in ("corrupt", "model_version")}
    assert discarded == {"corrupt": 2.0, "model_version": 1.0}  # an unknown format counts as corrupt
    assert stats.restored_devices == 8 - 3

    rows = scores_of(consume_all(kafka_bootstrap, f"{topic}.scores", read_committed=True))
    assert len(rows) == len(messages), "every reading is processed once, tampered snapshots or not"
    cut: dict[str, int] = {}
    for key, value in messages[:half]:
        cut[key.decode()] = max(cut.get(key.decode(), 0), int(orjson.loads(value)["ts"]))
    for device in sorted(cut):
        after = [r["status"] for r in sorted(rows, key=lambda r: r["ts_ms"])
                 if r["device_id"] == device and r["ts_ms"] > cut[device]]
        assert after, f"{device}: nothing processed after the restart"
        if device in tampered:
            assert after[:warmup] == ["warmup"] * warmup and after[warmup] == "scored", (device, after[:warmup + 2])
        else:
            assert "warmup" not in after, f"{device} warmed up again though its snapshot was fine: {after[:12]}"
