"""Per-device memory: device id → slot, LSTM state slabs and per-device scalars.

Why it exists: every device keeps its own (h, c) across calls, and the hot path must never loop
per device in Python. State lives in preallocated slabs addressed by slot: ``h`` and ``c`` are
``[L, C, H]`` tensors (L layers, C slab capacity, H hidden size — note the slot axis is the
*second* one, as in :class:`torch.nn.LSTM` state), and per-device scalars are ``[C]`` numpy arrays.
The detector gathers the slots of a batch with one index tensor, runs one forward pass and
scatters the result back.

What it must not do: know about Kafka or partitions (``streams.state.changelog`` maps snapshots to
topics), or score readings (``anomaly.detector`` does).

Memory: ``2·L·H·4`` bytes of h/c plus ``14·F + 33`` bytes of scalars per slot, plus the id
dictionary; a store made for the novelty episode rule (``novelty_alphas`` > 0) adds the novelty records,
``16·K·A + 16·F + 16·K + 8`` bytes per slot (:class:`anomaly.adaptation.NoveltyRecords`), and one with a
seasonal period P adds the seasonal profile, ``4·P·F`` bytes per slot (only then allocated).
Capacity grows to the next power of two, so growth copies are amortised, never per step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from anomaly.adaptation import NoveltyRecords
from anomaly.errors import StateFormatError
from anomaly.snapshots import decode_states, encode_states, load_states

__all__ = ["NO_TIMESTAMP", "DeviceStateStore"]

logger = logging.getLogger(__name__)

NO_TIMESTAMP = np.iinfo(np.int64).min
"""``last_ts`` of a slot that has seen no reading yet."""


class DeviceStateStore:
    """Slot-addressed state of a fleet of devices for one model.

    Parameters
    ----------
    num_layers, hidden_size, n_features : int
        L, H and F of the model whose state this holds.
    model_version : str
        Written into every snapshot; :meth:`restore` rejects snapshots of another version.
    capacity : int
        Initial slab capacity C (grows by doubling).

    Attributes (all indexed by slot)
    --------------------------------
    h, c : torch.Tensor ``[L, C, H]`` float32
    last_ts : ``[C]`` int64, epoch ms of the last accepted reading (``NO_TIMESTAMP`` if none)
    steps : ``[C]`` int64, readings advanced since the device's state was (re)started
    smoothed : ``[C]`` float32, smoothed surprise (see :mod:`anomaly.scoring`)
    in_episode : ``[C]`` bool; run_length : ``[C]`` int32 readings counted towards entering or
    leaving an episode; episode_start : ``[C]`` int64 epoch ms
    last_pred : ``[C, F]`` float32, the scaled forecast of the next reading
    last_input : ``[C, F]`` float32, the last scaled input, used to fill missing features
    residual_ratio : ``[C, F]`` float32, the device's residual variance relative to the fleet's
    (see :func:`anomaly.scoring.normalize_residuals`); 1 for a new device
    repeat_run : ``[C, F]`` int16, consecutive readings in which each feature repeated its previous
    value exactly (a stuck sensor, see :func:`anomaly.scoring.repeat_runs`)
    novelty : :class:`~anomaly.adaptation.NoveltyRecords` of C slots, or ``None`` unless the store was
    made with ``novelty_alphas`` > 0 (the novelty episode rule); two error channels when
    ``seasonal_period`` > 0, one otherwise. A gap reset keeps them (they are what the device has done,
    not its network state) with the episode flag they decide; a new, removed or evicted device starts empty.
    season : ``[C, P, F]`` float32 seasonal profile (NaN: phase not seen yet; see
    :func:`anomaly.scoring.seasonal_residuals`), or ``None`` unless ``seasonal_period`` > 0. Indexed by
    time phase, so a gap reset keeps it, like the novelty records.

    Examples
    --------
    >>> store = DeviceStateStore(num_layers=1, hidden_size=4, n_features=2, model_version="v1")
    >>> store.slots_for(np.array(["a", "b"], dtype=object)).tolist()
    [0, 1]
    >>> store.steps[1] = 7
    >>> blob = store.snapshot("b")
    >>> other = DeviceStateStore(num_layers=1, hidden_size=4, n_features=2, model_version="v1")
    >>> other.restore(blob), int(other.steps[other.slot_of("b")])
    ('b', 7)
    """

    def __init__(self, num_layers: int, hidden_size: int, n_features: int, model_version: str = "",
                 capacity: int = 1024, novelty_alphas: int = 0, seasonal_period: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.n_features = n_features
        self.model_version = model_version
        self._slots: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free: list[int] = []
        self._last_lookup: tuple[np.ndarray, np.ndarray] | None = None  # (device ids, their slots); see slots_for
        self.capacity = 0
        self.h = torch.zeros(num_layers, 0, hidden_size)
        self.c = torch.zeros(num_layers, 0, hidden_size)
        self.last_ts = np.empty(0, dtype=np.int64)
        self.steps = np.empty(0, dtype=np.int64)
        self.smoothed = np.empty(0, dtype=np.float32)
        self.in_episode = np.empty(0, dtype=bool)
        self.run_length = np.empty(0, dtype=np.int32)
        self.episode_start = np.empty(0, dtype=np.int64)
        self.last_pred = np.empty((0, n_features), dtype=np.float32)
        self.last_input = np.empty((0, n_features), dtype=np.float32)
        self.residual_ratio = np.empty((0, n_features), dtype=np.float32)
        self.repeat_run = np.empty((0, n_features), dtype=np.int16)
        if not 0 <= novelty_alphas <= 255:
            raise ValueError(f"novelty_alphas must be in [0, 255], got {novelty_alphas}")
        if seasonal_period < 0 or (seasonal_period and not novelty_alphas):
            raise ValueError(f"seasonal_period must be >= 0 and needs novelty_alphas > 0, got {seasonal_period}")
        channels = 2 if seasonal_period else 1
        self.novelty = NoveltyRecords.empty(0, novelty_alphas, n_features, channels) if novelty_alphas else None
        self.season = np.empty((0, seasonal_period, n_features), dtype=np.float32) if seasonal_period else None
        self._grow(capacity)

    # ------------------------------------------------------------------ slots
    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._slots

    def devices(self) -> list[str]:
        return list(self._slots)

    def slot_of(self, device_id: str) -> int:
        try:
            return self._slots[device_id]
        except KeyError:
            raise KeyError(f"device {device_id!r} has no state") from None

    def slots_for(self, device_ids: np.ndarray | Sequence[str]) -> np.ndarray:
        """Slots ``[U]`` of distinct ``device_ids``, allocating zeroed slots for new devices.

        Cost: one dict lookup per device id (Python), the rest vectorised; none when ``device_ids`` is an
        array equal to the previous call's (a fleet whose every device reports once per poll), whose
        slots are remembered until a device is removed.

        >>> store = DeviceStateStore(num_layers=1, hidden_size=4, n_features=2)
        >>> ids = np.array(["a", "b"], dtype=object)
        >>> store.slots_for(ids).tolist(), store.slots_for(ids.copy()).tolist()
        ([0, 1], [0, 1])
        >>> store.remove(["a"]), "a" in store
        (1, False)
        >>> store.slots_for(ids).tolist(), "a" in store  # "a" is new again, not remembered
        ([0, 1], True)
        """
        last = self._last_lookup
        if (last is not None and isinstance(device_ids, np.ndarray) and device_ids.shape == last[0].shape
                and np.array_equal(device_ids, last[0])):
            return last[1].copy()
        get = self._slots.get
        slots = np.array([get(d, -1) for d in device_ids], dtype=np.int64).reshape(len(device_ids))
        new = np.flatnonzero(slots < 0)
        if len(new):
            need = len(new) - len(self._free) + len(self._ids) - self.capacity
            if need > 0:  # next power of two: amortised copies, at most 2x unused capacity
                self._grow(1 << int(self.capacity + need - 1).bit_length())
            for i in new:
                device = str(device_ids[i])
                if self._free:
                    slot = self._free.pop()
                    self._ids[slot] = device
                else:
                    slot = len(self._ids)
                    self._ids.append(device)
                self._slots[device] = slot
                slots[i] = slot
            self.reset(slots[new])
        if isinstance(device_ids, np.ndarray):  # copies: the caller may reuse its arrays
            self._last_lookup = (device_ids.copy(), slots.copy())
        return slots

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        logger.debug("growing state slabs from %d to %d slots", old, capacity)

        def grow_np(a: np.ndarray, fill: object) -> np.ndarray:
            out = np.empty((capacity, *a.shape[1:]), dtype=a.dtype)
            out[:old] = a
            out[old:] = fill
            return out

        fills: tuple[tuple[str, object], ...] = (
            ("last_ts", NO_TIMESTAMP), ("steps", 0), ("smoothed", 0.0), ("in_episode", False), ("run_length", 0),
            ("episode_start", 0), ("last_pred", 0.0), ("last_input", 0.0), ("residual_ratio", 1.0), ("repeat_run", 0))
        if self.season is not None:
            fills += (("season", np.nan),)
        for name, fill in fills:
            setattr(self, name, grow_np(getattr(self, name), fill))
        for name in ("h", "c"):
            t = getattr(self, name)
            out = torch.zeros(self.num_layers, capacity, self.hidden_size)
            out[:, :old] = t
            setattr(self, name, out)
        if self.novelty is not None:
            self.novelty = self.novelty.grown(capacity)
        self.capacity = capacity

    def reset(self, slots: np.ndarray, keep_novelty: bool = False) -> None:
        """Zero the state of ``slots`` (a new device, or one restarting after a gap); keeps ``last_ts``.

        ``keep_novelty``: keep the novelty records, the episode they decide (``in_episode``,
        ``run_length``, ``episode_start``) and the seasonal profile: a gap reset under the novelty rule
        restarts the network, not the device's history.
        """
        idx = torch.as_tensor(slots, dtype=torch.long)
        self.h[:, idx] = 0.0
        self.c[:, idx] = 0.0
        self.steps[slots] = 0
        self.smoothed[slots] = 0.0
        if not keep_novelty:
            self.in_episode[slots] = False
            self.run_length[slots] = 0
            self.episode_start[slots] = 0
        self.last_pred[slots] = 0.0
        self.last_input[slots] = 0.0
        self.residual_ratio[slots] = 1.0
        self.repeat_run[slots] = 0
        if self.novelty is not None and not keep_novelty:
            self.novelty.reset(slots)
        if self.season is not None and not keep_novelty:
            self.season[slots] = np.nan

    def remove(self, device_ids: Iterable[str]) -> int:
        """Drop devices' state (e.g. their partition was revoked); returns how many were held."""
        removed = []
        self._last_lookup = None  # a removed device's slot may go to another device
        for device in device_ids:
            slot = self._slots.pop(device, None)
            if slot is not None:
                self._ids[slot] = None
                self._free.append(slot)
                removed.append(slot)
        if removed:
            slots = np.asarray(removed, dtype=np.int64)
            self.reset(slots)
            self.last_ts[slots] = NO_TIMESTAMP
        return len(removed)

    def evict_idle(self, now_ms: int, ttl_ms: int) -> list[str]:
        """Drop devices whose last reading is older than ``now_ms - ttl_ms`` (event time); returns their ids.

        Event time rather than wall time keeps a replay of the same input deterministic.
        """
        occupied = np.fromiter(self._slots.values(), dtype=np.int64, count=len(self._slots))
        if not len(occupied):
            return []
        stale = occupied[self.last_ts[occupied] < now_ms - ttl_ms]
        devices = [self._ids[s] for s in stale.tolist()]
        evicted = [d for d in devices if d is not None]
        self.remove(evicted)
        if evicted:
            logger.info("evicted %d idle devices (no reading for %d ms)", len(evicted), ttl_ms)
        return evicted

    def nbytes(self) -> int:
        """Bytes held by the slabs (not counting the id dictionary)."""
        arrays = (self.last_ts, self.steps, self.smoothed, self.in_episode, self.run_length,
                  self.episode_start, self.last_pred, self.last_input, self.residual_ratio, self.repeat_run)
        novelty = self.novelty.nbytes() if self.novelty is not None else 0
        season = self.season.nbytes if self.season is not None else 0
        return (self.h.element_size() * self.h.nelement() * 2) + sum(a.nbytes for a in arrays) + novelty + season

    # -------------------------------------------------------------- snapshots
    def snapshot(self, device_id: str) -> bytes:
        """The device's state as bytes: versioned, checksummed, carrying the model version.

        The format is :mod:`anomaly.snapshots` (any number of devices per blob; the service's
        changelog writes many at once with :func:`anomaly.snapshots.encode_groups`).
        """
        return encode_states(self, [device_id])

    def restore(self, data: bytes) -> str:
        """Load the state of one device (overwriting it); returns the device id.

        Raises :class:`StateFormatError` for garbage and :class:`StateModelMismatchError` for state
        of another model version or shape.
        """
        batch = decode_states(data)
        if len(batch) != 1:
            raise StateFormatError(f"expected the state of one device, got {len(batch)}")
        load_states(self, batch)
        return batch.device_ids[0]
