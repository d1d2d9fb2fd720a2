"""The byte format of device state: many devices' memory in one checksummed, column-wise blob.

Why it exists: state must leave the process (the service's changelog, a checkpoint, a test) and come
back bit-exact, and the service writes thousands of devices at every commit. This format stores each
field of :data:`anomaly.state.FIELDS` as one little-endian array over the devices, in that table's
order, so encoding and decoding are a handful of numpy copies whatever the count. A blob holds any number of devices
(one for :func:`snapshot`, a changelog bucket's worth for the service).

Layout (little-endian)::

    header    b"SABS" | u8 format | u16 L | u32 H | u16 F | u8 A | u8 K | u32 P | u32 n | u16 len(model version)
              | u16 Fc (format 3 on)
    model version (UTF-8)
    u16[n] id lengths, then the ids (UTF-8, concatenated)
    one array per row of anomaly.state.FIELDS of the blob's format, in its order: [n], [n, F], [n, Fc] or
    [n, L, H] values (format 2: i64 last_ts | i64 steps | f32 smoothed | u8 in_episode | i32 run_length |
    i64 episode_start | f32 h | f32 c | f32 last_pred | f32 last_input | f32 residual_ratio | i16 repeat_run;
    format 3 adds Fc to the header and f32 last_context after them)
    if A > 0: f64[n, 2KA + 2F + K] and i64[n, K + 1]: the novelty records, K error channels (anomaly.adaptation)
    if P > 0: f32[n, P, F] the seasonal profile (anomaly.scoring.seasonal_residuals)
    u32 CRC-32 of everything before it

Format 2 added K and P (format 1 blobs are refused as unknown: none was ever persisted); format 3 the
context inputs. Format 2 blobs still decode (no context: ``Fc = 0``, fields of format 3 at their fill value),
so a changelog written before context restores.

Decoding never executes anything from the bytes; garbage, a wrong length or a bad checksum raise
:class:`~anomaly.errors.StateFormatError` naming the problem, and loading state of another model
version or shape raises :class:`~anomaly.errors.StateModelMismatchError`. What this module must not
do: decide which devices to write or where the bytes go (the caller does).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from anomaly.adaptation import NoveltyRecords
from anomaly.errors import StateFormatError, StateModelMismatchError
from anomaly.state import FIELDS, DeviceStateStore, StateField

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "StateBatch", "check_compatible", "decode_states", "encode_groups",
           "encode_states", "load_states", "restore", "snapshot"]

MAGIC = b"SABS"
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
_HEADERS = {2: struct.Struct("<4sBHIHBBIIH"), 3: struct.Struct("<4sBHIHBBIIHH")}
_HEADER = _HEADERS[FORMAT_VERSION]
_CRC = struct.Struct("<I")


@dataclass(frozen=True)
class StateBatch:
    """Decoded state of ``n`` devices: one array per field of :data:`anomaly.state.FIELDS` (row i is
    ``device_ids[i]``), read as attributes (``batch.steps`` ``[n]``, ``batch.h`` ``[n, L, H]``,
    ``batch.last_pred`` ``[n, F]``)."""

    model_version: str
    device_ids: list[str]
    num_layers: int
    hidden_size: int
    n_features: int
    n_context: int
    fields: dict[str, np.ndarray]  # name -> [n, *shape per slot], native byte order
    novelty: NoveltyRecords | None = None  # n rows; None: written by a store without novelty records
    season: np.ndarray | None = None  # [n, P, F] float32; None: written by a store without a seasonal period

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(f"StateBatch has no field {name!r}") from None

    def __len__(self) -> int:
        return len(self.device_ids)

    def select(self, rows: np.ndarray) -> StateBatch:
        """The devices at ``rows`` (a boolean mask or indices)."""
        idx = np.flatnonzero(rows) if rows.dtype == bool else rows
        return StateBatch(model_version=self.model_version, device_ids=[self.device_ids[i] for i in idx.tolist()],
                          num_layers=self.num_layers, hidden_size=self.hidden_size, n_features=self.n_features,
                          n_context=self.n_context, fields={name: array[idx] for name, array in self.fields.items()},
                          novelty=None if self.novelty is None else self.novelty.take(idx),
                          season=None if self.season is None else self.season[idx])


def _gather(store: DeviceStateStore, spec: StateField, slots: np.ndarray) -> np.ndarray:
    """``spec``'s values of ``slots`` as ``[n, *shape per slot]`` in the snapshot's dtype."""
    if spec.width == "hidden":
        slab = getattr(store, spec.name).index_select(1, torch.as_tensor(slots, dtype=torch.long))
        return slab.permute(1, 0, 2).contiguous().numpy().astype(spec.wire_dtype, copy=False)
    return np.ascontiguousarray(getattr(store, spec.name)[slots], dtype=spec.wire_dtype)


def snapshot(store: DeviceStateStore, device_id: str) -> bytes:
    """One device's state as bytes: versioned, checksummed, carrying the model version.

    >>> store = DeviceStateStore(num_layers=1, hidden_size=4, n_features=2, model_version="v1")
    >>> store.steps[store.slots_for(np.array(["a", "b"], dtype=object))[1]] = 7
    >>> other = DeviceStateStore(num_layers=1, hidden_size=4, n_features=2, model_version="v1")
    >>> restore(other, snapshot(store, "b")), int(other.steps[other.slot_of("b")])
    ('b', 7)
    """
    return encode_states(store, [device_id])


def restore(store: DeviceStateStore, data: bytes) -> str:
    """Load the state of one device into ``store`` (overwriting it); returns the device id.

    Raises :class:`StateFormatError` for garbage or a blob of several devices and
    :class:`StateModelMismatchError` for state of another model version or shape.
    """
    batch = decode_states(data)
    if len(batch) != 1:
        raise StateFormatError(f"expected the state of one device, got {len(batch)}")
    load_states(store, batch)
    return batch.device_ids[0]


def encode_states(store: DeviceStateStore, device_ids: Sequence[str]) -> bytes:
    """The state of ``device_ids`` (all in ``store``) as one blob; ``KeyError`` for an unknown device.

    >>> store = DeviceStateStore(num_layers=1, hidden_size=2, n_features=1, model_version="v1")
    >>> _ = store.slots_for(np.array(["a", "b"], dtype=object))
    >>> decode_states(encode_states(store, ["b", "a"])).device_ids
    ['b', 'a']
    """
    return encode_groups(store, [device_ids])[0]


def encode_groups(store: DeviceStateStore, groups: Sequence[Sequence[str]]) -> list[bytes]:
    """One blob per group of devices (e.g. per changelog bucket), gathering every field once for all groups.

    Each field is gathered for all devices of all groups in one indexing operation, then every blob
    is contiguous slices of those arrays: the cost per group is a few dozen small copies, not a
    gather per field.
    """
    everyone = [d for group in groups for d in group]
    slots = np.fromiter((store.slot_of(d) for d in everyone), dtype=np.int64, count=len(everyone))
    layers, hidden, feats = store.num_layers, store.hidden_size, store.n_features
    version = store.model_version.encode()
    alphas = store.novelty.n_alphas if store.novelty is not None else 0
    channels = store.novelty.n_channels if store.novelty is not None else 0
    period = store.season.shape[1] if store.season is not None else 0
    columns = [_gather(store, spec, slots) for spec in FIELDS]
    if store.novelty is not None:
        floats, ints = store.novelty.take(slots).to_arrays()
        columns += [floats.astype("<f8"), ints.astype("<i8")]
    if store.season is not None:
        columns.append(np.ascontiguousarray(store.season[slots], dtype="<f4"))
    out: list[bytes] = []
    start = 0
    for group in groups:
        end = start + len(group)
        ids = [d.encode() for d in group]
        parts = [_HEADER.pack(MAGIC, FORMAT_VERSION, layers, hidden, feats, alphas, channels, period, len(group),
                              len(version), store.n_context),
                 version, np.fromiter((len(i) for i in ids), dtype="<u2", count=len(ids)).tobytes(), b"".join(ids)]
        parts += [column[start:end].tobytes() for column in columns]
        body = b"".join(parts)
        out.append(body + _CRC.pack(zlib.crc32(body)))
        start = end
    return out


def decode_states(data: bytes | bytearray | memoryview) -> StateBatch:
    """Parse a blob of :func:`encode_states`; raises :class:`StateFormatError` naming what is wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateFormatError(f"state must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 5 + _CRC.size:
        raise StateFormatError(f"state blob too short ({len(data)} bytes)")
    if data[:4] != MAGIC:
        raise StateFormatError("not a device-state blob (bad magic bytes)")
    if data[4] not in READABLE_VERSIONS:
        raise StateFormatError(f"unknown state format version {data[4]} "
                               f"(supported: {', '.join(map(str, READABLE_VERSIONS))})")
    form = data[4]
    header = _HEADERS[form]
    if len(data) < header.size + _CRC.size:
        raise StateFormatError(f"state blob too short ({len(data)} bytes)")
    body, (crc,) = memoryview(data)[:-_CRC.size], _CRC.unpack(data[-_CRC.size:])
    if zlib.crc32(body) != crc:
        raise StateFormatError("state checksum mismatch (corrupt or truncated)")
    layers, hidden, feats, alphas, channels, period, n, n_version, *rest = header.unpack_from(data)[2:]
    n_context = rest[0] if rest else 0
    if (alphas == 0) != (channels == 0):
        raise StateFormatError(f"state blob header has {alphas} novelty time scales but {channels} error channels")
    pos = header.size

    def take(count: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        nonlocal pos
        size = count * np.dtype(dtype).itemsize
        if pos + size > len(body):
            raise StateFormatError("state blob length does not match its header")
        out = np.frombuffer(data, dtype=dtype, count=count, offset=pos).reshape(shape)
        pos += size
        return out.astype(np.dtype(dtype).newbyteorder("="))

    if pos + n_version > len(body):
        raise StateFormatError("state blob length does not match its header")
    raw_version = data[pos:pos + n_version]
    pos += n_version
    lengths = take(n, "<u2", (n,))
    ends = np.cumsum(lengths)
    if pos + (int(ends[-1]) if n else 0) > len(body):
        raise StateFormatError("state blob length does not match its header")
    raw_ids = data[pos:pos + (int(ends[-1]) if n else 0)]
    pos += len(raw_ids)
    try:
        version = raw_version.decode()
        starts = ends - lengths
        device_ids = [raw_ids[s:e].decode() for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
    except UnicodeDecodeError as exc:
        raise StateFormatError(f"state blob has a non-UTF-8 id: {exc}") from exc
    if any(not d for d in device_ids):
        raise StateFormatError("state blob has an empty device id")
    shapes = {"one": (), "features": (feats,), "context": (n_context,), "hidden": (layers, hidden)}
    fields = {}
    for spec in FIELDS:
        shape = (n, *shapes[spec.width])
        if spec.since > form:  # the blob predates the field
            fields[spec.name] = np.full(shape, spec.fill, dtype=spec.dtype)
        else:
            fields[spec.name] = take(int(np.prod(shape)), spec.wire_dtype, shape).astype(spec.dtype, copy=False)
    novelty = None
    if alphas:
        k = 2 * channels * alphas + 2 * feats + channels
        novelty = NoveltyRecords.from_arrays(take(n * k, "<f8", (n, k)),
                                             take(n * (channels + 1), "<i8", (n, channels + 1)), alphas, channels)
    season = take(n * period * feats, "<f4", (n, period, feats)) if period else None
    if pos != len(body):
        raise StateFormatError("state blob length does not match its header")
    return StateBatch(model_version=version, device_ids=device_ids, num_layers=layers, hidden_size=hidden,
                      n_features=feats, n_context=n_context, fields=fields, novelty=novelty, season=season)


def check_compatible(store: DeviceStateStore, batch: StateBatch) -> None:
    """Raise :class:`StateModelMismatchError` unless ``batch`` was written for ``store``'s model version and shape."""
    if batch.model_version != store.model_version:
        raise StateModelMismatchError(
            f"state of {len(batch)} device(s) (e.g. {batch.device_ids[0] if len(batch) else '-'!r}) is from model "
            f"version {batch.model_version!r}, expected {store.model_version!r}")
    if (batch.num_layers, batch.hidden_size, batch.n_features, batch.n_context) != (
            store.num_layers, store.hidden_size, store.n_features, store.n_context):
        raise StateModelMismatchError(
            f"state has shape L={batch.num_layers} H={batch.hidden_size} F={batch.n_features} Fc={batch.n_context}, "
            f"expected L={store.num_layers} H={store.hidden_size} F={store.n_features} Fc={store.n_context}")


def load_states(store: DeviceStateStore, batch: StateBatch) -> None:
    """Write ``batch`` into ``store`` (overwriting those devices) in one vectorised pass.

    Raises :class:`StateModelMismatchError` for state of another model version or shape. Novelty
    records or a seasonal profile of another shape (or none) start empty; a store without them ignores them.
    """
    check_compatible(store, batch)
    if not len(batch):
        return
    slots = store.slots_for(np.array(batch.device_ids, dtype=object))
    idx = torch.as_tensor(slots, dtype=torch.long)
    for spec in FIELDS:
        values = batch.fields[spec.name]
        if spec.width == "hidden":
            getattr(store, spec.name)[:, idx] = torch.from_numpy(np.ascontiguousarray(values.transpose(1, 0, 2)))
        else:
            getattr(store, spec.name)[slots] = values
    if store.novelty is not None:
        rec = batch.novelty
        if rec is not None and (rec.n_alphas, rec.n_channels) == (store.novelty.n_alphas, store.novelty.n_channels):
            store.novelty.put(slots, rec)
        else:
            store.novelty.reset(slots)
    if store.season is not None:
        fits = batch.season is not None and batch.season.shape[1:] == store.season.shape[1:]
        store.season[slots] = batch.season if fits else np.nan
