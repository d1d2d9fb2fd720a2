"""anomaly.snapshots: the column-wise state format round-trips bit-exact and rejects what is not it."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly.errors import StateFormatError, StateModelMismatchError
from anomaly.snapshots import decode_states, encode_groups, encode_states, load_states
from anomaly.state import DeviceStateStore

FIELDS = ("last_ts", "steps", "smoothed", "in_episode", "run_length", "episode_start", "last_pred", "last_input",
          "residual_ratio", "repeat_run", "last_context")
NOVELTY = ("ema", "err_record", "val_hi", "val_lo", "entry_level", "seen", "since_alert")


def make_store(novelty: int = 0, seasonal: int = 0, **kw) -> DeviceStateStore:
    args = {"num_layers": 2, "hidden_size": 3, "n_features": 2, "model_version": "v1", **kw}
    return DeviceStateStore(**args, novelty_alphas=novelty, seasonal_period=seasonal)


def fill(store: DeviceStateStore, devices: list[str], seed: int) -> None:
    """Random state in every field of ``devices``."""
    slots = store.slots_for(np.array(devices, dtype=object))
    rng = np.random.default_rng(seed)
    n, idx = len(slots), torch.as_tensor(slots, dtype=torch.long)
    store.h[:, idx] = torch.from_numpy(rng.standard_normal((store.num_layers, n, store.hidden_size)).astype(np.float32))
    store.c[:, idx] = torch.from_numpy(rng.standard_normal((store.num_layers, n, store.hidden_size)).astype(np.float32))
    store.last_ts[slots] = rng.integers(-2**62, 2**62, n)
    store.steps[slots] = rng.integers(0, 2**40, n)
    store.smoothed[slots] = rng.random(n)
    store.in_episode[slots] = rng.random(n) < 0.5
    store.run_length[slots] = rng.integers(0, 1000, n)
    store.episode_start[slots] = rng.integers(0, 2**50, n)
    for name in ("last_pred", "last_input", "residual_ratio"):
        getattr(store, name)[slots] = rng.standard_normal((n, store.n_features))
    store.repeat_run[slots] = rng.integers(0, 30000, (n, store.n_features))
    context = rng.standard_normal((n, store.n_context))
    context[rng.random(context.shape) < 0.3] = np.nan  # inputs never seen yet
    store.last_context[slots] = context
    if store.novelty is not None:
        rec = store.novelty
        cols, k = rec.ema.shape[1], rec.n_channels
        rec.ema[slots], rec.err_record[slots] = rng.random((n, cols)), rng.random((n, cols))
        rec.val_hi[slots], rec.val_lo[slots] = rng.random((n, store.n_features)), -rng.random((n, store.n_features))
        rec.entry_level[slots], rec.seen[slots] = rng.random((n, k)), rng.integers(0, 99, (n, k))
        rec.since_alert[slots] = 5
    if store.season is not None:
        season = rng.standard_normal((n, *store.season.shape[1:])).astype(np.float32)
        season[rng.random(season.shape) < 0.2] = np.nan  # phases not seen yet
        store.season[slots] = season


def assert_same_state(a: DeviceStateStore, b: DeviceStateStore, devices: list[str]) -> None:
    sa, sb = a.slots_for(np.array(devices, dtype=object)), b.slots_for(np.array(devices, dtype=object))
    ia, ib = torch.as_tensor(sa, dtype=torch.long), torch.as_tensor(sb, dtype=torch.long)
    assert torch.equal(a.h[:, ia], b.h[:, ib]) and torch.equal(a.c[:, ia], b.c[:, ib])
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name)[sa], getattr(b, name)[sb], err_msg=name)
    if a.novelty is not None and b.novelty is not None:
        for name in NOVELTY:
            np.testing.assert_array_equal(getattr(a.novelty, name)[sa], getattr(b.novelty, name)[sb], err_msg=name)
    if a.season is not None and b.season is not None:
        np.testing.assert_array_equal(a.season[sa], b.season[sb], err_msg="season")


@settings(max_examples=60, deadline=None)
@given(devices=st.lists(st.text(min_size=1, max_size=20), min_size=0, max_size=12, unique=True),
       seed=st.integers(0, 2**31), kind=st.sampled_from([(0, 0), (2, 0), (2, 5), (1, 2)]),
       n_context=st.sampled_from([0, 3]))
def test_any_devices_round_trip_bit_exact(devices, seed, kind, n_context):
    novelty, seasonal = kind
    store = make_store(novelty, seasonal, n_context=n_context)
    if devices:
        fill(store, devices, seed)
    blob = encode_states(store, devices)
    batch = decode_states(blob)
    assert batch.device_ids == devices and batch.model_version == "v1"
    other = make_store(novelty, seasonal, capacity=1, n_context=n_context)
    fill(other, ["stranger"], seed + 1)  # an unrelated device stays as it was
    load_states(other, batch)
    assert sorted(other.devices()) == sorted([*devices, "stranger"])
    assert_same_state(store, other, devices)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_is_rejected_with_state_format_error(data):
    with pytest.raises(StateFormatError):
        decode_states(data)


def test_corruption_truncation_and_versions_are_named():
    store = make_store()
    fill(store, ["a", "b"], 0)
    blob = encode_states(store, ["a", "b"])
    flipped = bytearray(blob)
    flipped[40] ^= 0xFF
    with pytest.raises(StateFormatError, match="checksum"):
        decode_states(bytes(flipped))
    with pytest.raises(StateFormatError, match="format version 9"):
        decode_states(blob[:4] + b"\x09" + blob[5:])
    with pytest.raises(StateFormatError, match="format version 1 "):  # before the seasonal profile: never persisted
        decode_states(blob[:4] + b"\x01" + blob[5:])
    body = blob[:-4 - 8]  # drop the last array's tail, re-checksum: a truncated but "valid" blob
    with pytest.raises(StateFormatError, match="length"):
        decode_states(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(StateFormatError, match="magic"):
        decode_states(b"SADS" + blob[4:])
    with pytest.raises(StateFormatError, match="bytes"):
        decode_states("not bytes")  # type: ignore[arg-type]


def test_state_of_another_model_version_or_shape_is_refused_and_nothing_is_written():
    store = make_store()
    fill(store, ["a"], 0)
    batch = decode_states(encode_states(store, ["a"]))
    other = make_store(model_version="v2")
    with pytest.raises(StateModelMismatchError, match="model version 'v1'"):
        load_states(other, batch)
    with pytest.raises(StateModelMismatchError, match="H=3"):
        load_states(make_store(hidden_size=4), batch)
    assert len(other) == 0


def test_novelty_records_of_another_shape_start_empty_and_a_plain_store_ignores_them():
    with_records = make_store(novelty=2)
    fill(with_records, ["a"], 0)
    plain = make_store()
    load_states(plain, decode_states(encode_states(with_records, ["a"])))
    assert plain.steps[plain.slot_of("a")] == with_records.steps[with_records.slot_of("a")]
    three = make_store(novelty=3)
    fill(three, ["a"], 1)
    load_states(three, decode_states(encode_states(plain, ["a"])))
    assert three.novelty is not None and np.isnan(three.novelty.err_record[three.slot_of("a")]).all()


def test_select_keeps_the_chosen_devices_with_all_their_fields():
    store = make_store(novelty=2)
    fill(store, ["a", "b", "c"], 3)
    batch = decode_states(encode_states(store, ["a", "b", "c"])).select(np.array([True, False, True]))
    assert batch.device_ids == ["a", "c"] and len(batch) == 2
    other = make_store(novelty=2)
    load_states(other, batch)
    assert sorted(other.devices()) == ["a", "c"]
    assert_same_state(store, other, ["a", "c"])


def test_groups_encode_exactly_like_one_blob_per_group():
    store = make_store(novelty=2)
    fill(store, [f"d{i}" for i in range(7)], 4)
    groups = [["d3", "d0"], [], ["d6"], ["d1", "d2", "d4", "d5"]]
    assert encode_groups(store, groups) == [encode_states(store, g) for g in groups]


def test_seasonal_profile_of_another_period_starts_empty_and_a_store_without_one_ignores_it():
    seasonal = make_store(novelty=2, seasonal=4)
    fill(seasonal, ["a"], 0)
    blob = encode_states(seasonal, ["a"])
    assert decode_states(blob).season.shape == (1, 4, 2)
    without = make_store(novelty=2)
    load_states(without, decode_states(blob))
    assert without.season is None
    assert np.isnan(without.novelty.val_hi[without.slot_of("a")]).all()  # records of two channels, not one
    other = make_store(novelty=2, seasonal=6)
    fill(other, ["a"], 1)
    load_states(other, decode_states(blob))
    assert np.isnan(other.season[other.slot_of("a")]).all()
    np.testing.assert_array_equal(other.novelty.ema[other.slot_of("a")], seasonal.novelty.ema[0])


def test_header_with_time_scales_but_no_error_channels_is_refused():
    store = make_store(novelty=2)
    fill(store, ["a"], 0)
    blob = bytearray(encode_states(store, ["a"]))
    blob[14] = 0  # K: after magic(4) format(1) L(2) H(4) F(2) A(1)
    body = bytes(blob[:-4])
    with pytest.raises(StateFormatError, match="error channels"):
        decode_states(body + struct.pack("<I", zlib.crc32(body)))


# a format 2 blob (before context inputs), as the code of that format wrote it: device "pump-7" of a store
# with L=1, H=2, F=2 and one novelty time scale
FORMAT_2_BLOB = bytes.fromhex(
    "534142530201000200000002000101000000000100000002007631060070756d702d370068e5cf8b0100002a00000000000000000040"
    "3f0103000000c025d6cf8b0100000000003f000080be0000c03f00000040cdcccc3dcdcc4c3e0000803f000080bf0000c03f0000003f"
    "020000000000000000000000000000000000f87f000000000000f87f000000000000f87f000000000000f87f000000000000f87f0000"
    "0000000000000000000000000000ffffffffffffff3f930a0958")


def test_a_format_2_blob_still_restores_with_no_context():
    batch = decode_states(FORMAT_2_BLOB)
    assert batch.device_ids == ["pump-7"] and batch.n_context == 0 and batch.last_context.shape == (1, 0)
    store = DeviceStateStore(num_layers=1, hidden_size=2, n_features=2, model_version="v1", novelty_alphas=1)
    load_states(store, batch)
    slot = store.slot_of("pump-7")
    assert store.last_ts[slot] == 1_700_000_000_000 and store.steps[slot] == 42 and store.in_episode[slot]
    assert store.h[0, slot].tolist() == [0.5, -0.25] and store.repeat_run[slot].tolist() == [2, 0]
    with pytest.raises(StateModelMismatchError, match="Fc=0"):  # a model with context is another model
        load_states(DeviceStateStore(num_layers=1, hidden_size=2, n_features=2, model_version="v1",
                                     novelty_alphas=1, n_context=1), batch)


def test_context_is_part_of_the_shape_and_survives_a_gap_reset_but_not_a_removal():
    store = make_store(n_context=2)
    fill(store, ["a", "b"], 0)
    store.last_context[store.slot_of("a")] = [0.5, -1.0]
    with pytest.raises(StateModelMismatchError, match="Fc=2"):
        load_states(make_store(n_context=1), decode_states(encode_states(store, ["a"])))
    store.reset(np.array([store.slot_of("a")]))
    assert store.last_context[store.slot_of("a")].tolist() == [0.5, -1.0] and store.steps[store.slot_of("a")] == 0
    slot = store.slot_of("a")
    store.remove(["a"])
    assert store.slots_for(np.array(["new"], dtype=object))[0] == slot
    assert np.isnan(store.last_context[slot]).all()
