"""DeviceStateStore: slots, growth, eviction, the FIELDS table; snapshot/restore round trips and garbage rejection."""

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly.errors import StateFormatError, StateModelMismatchError
from anomaly.snapshots import decode_states, encode_states, load_states, restore, snapshot
from anomaly.state import NO_TIMESTAMP, DeviceStateStore


def make_store(**kw):
    args = {"num_layers": 2, "hidden_size": 3, "n_features": 2, "model_version": "v1", "capacity": 2} | kw
    return DeviceStateStore(**args)


def test_slots_are_stable_and_growth_keeps_state():
    store = make_store()
    first = store.slots_for(np.array(["a", "b"], dtype=object))
    store.h[:, torch.as_tensor(first)] = 7.0
    store.steps[first] = [3, 4]
    more = store.slots_for(np.array(["c", "d", "e", "a"], dtype=object))
    assert store.capacity >= 5
    assert more[-1] == first[0]
    assert torch.all(store.h[:, torch.as_tensor(first)] == 7.0)
    assert store.steps[first].tolist() == [3, 4]
    assert store.last_ts[more[0]] == NO_TIMESTAMP and store.steps[more[0]] == 0


def test_removed_slots_are_reused_zeroed():
    store = make_store()
    slot = store.slots_for(np.array(["a"], dtype=object))[0]
    store.h[:, slot] = 1.0
    store.steps[slot] = 9
    assert store.remove(["a", "missing"]) == 1
    assert "a" not in store
    again = store.slots_for(np.array(["z"], dtype=object))[0]
    assert again == slot and store.steps[slot] == 0 and float(store.h[:, slot].abs().sum()) == 0.0


def test_evict_idle_uses_event_time():
    store = make_store()
    slots = store.slots_for(np.array(["old", "new"], dtype=object))
    store.last_ts[slots] = [1_000, 50_000]
    assert store.evict_idle(now_ms=60_000, ttl_ms=30_000) == ["old"]
    assert store.devices() == ["new"]


@settings(max_examples=50, deadline=None)
@given(device=st.text(min_size=1, max_size=40), steps=st.integers(0, 2**40), ts=st.integers(-2**62, 2**62),
       smoothed=st.floats(0, 12, width=32), in_ep=st.booleans(), run=st.integers(0, 1000),
       seed=st.integers(0, 2**31))
def test_snapshot_restore_round_trip(device, steps, ts, smoothed, in_ep, run, seed):
    store = make_store()
    slot = store.slots_for(np.array([device], dtype=object))[0]
    gen = torch.Generator().manual_seed(seed)
    store.h[:, slot] = torch.randn(2, 3, generator=gen)
    store.c[:, slot] = torch.randn(2, 3, generator=gen)
    store.last_pred[slot] = [1.5, -2.5]
    store.last_input[slot] = [0.25, 4.0]
    store.steps[slot], store.last_ts[slot], store.smoothed[slot] = steps, ts, smoothed
    store.in_episode[slot], store.run_length[slot], store.episode_start[slot] = in_ep, run, ts
    other = make_store(capacity=1)
    assert restore(other, snapshot(store, device)) == device
    o = other.slot_of(device)
    assert torch.equal(other.h[:, o], store.h[:, slot]) and torch.equal(other.c[:, o], store.c[:, slot])
    for name in ("last_ts", "steps", "smoothed", "in_episode", "run_length", "episode_start", "last_pred",
                 "last_input"):
        np.testing.assert_array_equal(getattr(other, name)[o], getattr(store, name)[slot])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_rejected_with_state_format_error(data):
    with pytest.raises(StateFormatError):
        restore(make_store(), data)


def test_corruption_and_mismatch_are_named():
    store = make_store()
    store.slots_for(np.array(["a"], dtype=object))
    blob = bytearray(snapshot(store, "a"))
    flipped = bytes(blob[:30]) + bytes([blob[30] ^ 0xFF]) + bytes(blob[31:])
    with pytest.raises(StateFormatError, match="checksum"):
        restore(make_store(), flipped)
    with pytest.raises(StateFormatError, match="format version"):
        restore(make_store(), bytes(blob[:4]) + b"\x09" + bytes(blob[5:]))
    with pytest.raises(StateModelMismatchError, match="model version 'v1'"):
        restore(make_store(model_version="v2"), bytes(blob))
    with pytest.raises(StateModelMismatchError, match="H=3"):
        restore(make_store(hidden_size=4), bytes(blob))


def test_memory_per_device_is_close_to_the_tensors():
    store = DeviceStateStore(num_layers=1, hidden_size=64, n_features=4, capacity=1000)
    per_slot = store.nbytes() / store.capacity
    assert per_slot == 2 * 64 * 4 + 14 * 4 + 33  # h, c + per-device scalars (see the state.py docstring)
    with_context = DeviceStateStore(num_layers=1, hidden_size=64, n_features=4, capacity=1000, n_context=3)
    assert with_context.nbytes() / with_context.capacity == per_slot + 4 * 3


def novelty_store(**kw):
    return make_store(novelty_alphas=2, **kw)


def fill_novelty(store, device, seed):
    slot = store.slot_of(device)
    rng = np.random.default_rng(seed)
    rec = store.novelty
    rec.ema[slot], rec.err_record[slot] = rng.random(2), rng.random(2) + 0.5
    rec.val_hi[slot], rec.val_lo[slot] = rng.random(2) + 1, rng.random(2) - 1
    rec.entry_level[slot], rec.seen[slot], rec.since_alert[slot] = 0.7, 1234, 56


def test_novelty_records_round_trip_through_snapshots_and_growth():
    store = novelty_store()
    store.slots_for(np.array(["a", "b"], dtype=object))
    fill_novelty(store, "a", 0)
    fill_novelty(store, "b", 1)
    store.slots_for(np.array([f"x{i}" for i in range(5)], dtype=object))  # grows
    other = novelty_store()
    load_states(other, decode_states(encode_states(store, ["b", "a"])))
    for device in ("a", "b"):
        s, o = store.slot_of(device), other.slot_of(device)
        for name in ("ema", "err_record", "val_hi", "val_lo", "entry_level", "seen", "since_alert"):
            np.testing.assert_array_equal(getattr(other.novelty, name)[o], getattr(store.novelty, name)[s])
    assert np.isnan(store.novelty.val_hi[store.slot_of("x0")]).all()  # new slots start empty


def test_snapshots_without_novelty_records_start_them_empty_and_a_plain_store_ignores_them():
    plain = make_store()
    plain.slots_for(np.array(["a"], dtype=object))
    plain.steps[0] = 9
    blob = snapshot(plain, "a")
    store = novelty_store()
    store.slots_for(np.array(["a"], dtype=object))
    fill_novelty(store, "a", 0)
    restore(store, blob)
    assert store.novelty.seen[store.slot_of("a")] == 0 and store.steps[store.slot_of("a")] == 9
    # a snapshot with records restores into a plain store, which ignores them
    assert restore(plain, novelty_store_snapshot()) == "z"


def novelty_store_snapshot():
    store = novelty_store()
    store.slots_for(np.array(["z"], dtype=object))
    fill_novelty(store, "z", 2)
    return snapshot(store, "z")


def test_novelty_records_that_are_cut_short_are_rejected():
    blob = novelty_store_snapshot()
    body = bytearray(blob[:-12])  # drop the last 8 bytes of the records and the checksum
    with pytest.raises(StateFormatError, match="length"):
        restore(make_store(), bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))


def test_restore_takes_the_state_of_exactly_one_device():
    store = make_store()
    store.slots_for(np.array(["a", "b"], dtype=object))
    with pytest.raises(StateFormatError, match="one device, got 2"):
        restore(make_store(), encode_states(store, ["a", "b"]))


def test_slot_lookup_memo_is_forgotten_when_a_device_is_removed():
    store = make_store()
    ids = np.array(["a", "b", "c"], dtype=object)
    first = store.slots_for(ids).tolist()
    assert store.slots_for(ids.copy()).tolist() == first  # an equal array: the remembered slots
    store.remove(["b"])
    store.slots_for(np.array(["d"], dtype=object))  # may reuse b's slot
    again = store.slots_for(ids).tolist()
    assert "b" in store and len(set(again)) == 3 and store.slot_of("d") not in again
    assert [store.slot_of(x) for x in ("a", "b", "c")] == again


def test_novelty_records_cost_120_bytes_per_device_for_two_time_scales_and_four_features():
    plain = DeviceStateStore(num_layers=1, hidden_size=64, n_features=4, capacity=1000)
    store = DeviceStateStore(num_layers=1, hidden_size=64, n_features=4, capacity=1000, novelty_alphas=2)
    assert (store.nbytes() - plain.nbytes()) / store.capacity == 16 * 2 + 16 * 4 + 24 == 120


def test_seasonal_profile_is_allocated_only_with_a_period_and_survives_growth():
    plain = novelty_store()
    store = make_store(novelty_alphas=2, seasonal_period=5, capacity=2)
    assert plain.season is None and store.season.shape == (2, 5, store.n_features)
    # per slot: the [P, F] float32 profile, and the second channel's records (2 averages, 2 records, entry, count)
    assert store.nbytes() - plain.nbytes() == 2 * (4 * 5 * store.n_features + 16 * 2 + 16)
    store.slots_for(np.array(["a"], dtype=object))
    store.season[store.slot_of("a")] = 1.5
    store.slots_for(np.array([f"x{i}" for i in range(5)], dtype=object))  # grows
    assert store.capacity >= 6 and (store.season[store.slot_of("a")] == 1.5).all()
    assert np.isnan(store.season[store.slot_of("x4")]).all()
    with pytest.raises(ValueError, match="seasonal_period"):
        make_store(seasonal_period=5)  # the profile feeds the novelty records' second channel
