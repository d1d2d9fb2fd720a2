"""Per-device memory: device id → slot, LSTM state slabs and per-device scalars.

Why it exists: every device keeps its own (h, c) across calls, and the hot path must never loop
per device in Python. State lives in preallocated slabs addressed by slot: ``h`` and ``c`` are
``[L, C, H]`` tensors (L layers, C slab capacity, H hidden size — note the slot axis is the
*second* one, as in :class:`torch.nn.LSTM` state), and per-device scalars are ``[C]`` numpy arrays.
The detector gathers the slots of a batch with one index tensor, runs one forward pass and
scatters the result back.

Every per-slot field is one row of :data:`FIELDS` (name, dtype, shape per slot, value of a fresh slot,
what a reset does): the store allocates, grows, resets and measures from it, and :mod:`anomaly.snapshots`
encodes and decodes from it, so a new field is one new row.

What it must not do: know about Kafka or partitions (``streams.state.changelog`` maps snapshots to
topics), encode bytes (:mod:`anomaly.snapshots` imports this module, never the reverse), or score
readings (``anomaly.detector`` does).

Memory: ``2·L·H·4`` bytes of h/c plus ``14·F + 4·Fc + 33`` bytes of scalars per slot (Fc context inputs), plus the id
dictionary; a store made for the novelty episode rule (``novelty_alphas`` > 0) adds the novelty records,
``16·K·A + 16·F + 16·K + 8`` bytes per slot (:class:`anomaly.adaptation.NoveltyRecords`), and one with a
seasonal period P adds the seasonal profile, ``4·P·F`` bytes per slot (only then allocated).
Capacity grows to the next power of two, so growth copies are amortised, never per step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from anomaly.adaptation import NoveltyRecords

__all__ = ["FIELDS", "NO_TIMESTAMP", "DeviceStateStore", "StateField"]

logger = logging.getLogger(__name__)

NO_TIMESTAMP = np.iinfo(np.int64).min
"""``last_ts`` of a slot that has seen no reading yet."""


@dataclass(frozen=True)
class StateField:
    """One per-slot field of :class:`DeviceStateStore` (and one column of a snapshot).

    Attributes
    ----------
    name : the store's attribute.
    dtype : the dtype in memory; a snapshot writes it little-endian (:attr:`wire_dtype`).
    width : the shape per slot: ``"one"`` (a scalar), ``"features"`` (``[F]``), ``"context"`` (``[Fc]``, the
        context inputs) or ``"hidden"`` (``[L, H]``: the LSTM state, a torch slab ``[L, C, H]`` in the store).
    fill : the value of a new (or removed) slot.
    on_reset : what :meth:`DeviceStateStore.reset` (a gap) does: ``"fill"`` refills it, ``"episode"`` refills
        it unless the reset keeps the episode (a gap under the novelty rule), ``"keep"`` leaves it.
    since : the snapshot format that added the field; decoding an older blob gives every device ``fill``.
    """

    name: str
    dtype: str
    width: Literal["one", "features", "context", "hidden"]
    fill: float | int | bool
    on_reset: Literal["fill", "episode", "keep"] = "fill"
    since: int = 2

    @property
    def wire_dtype(self) -> str:
        """The dtype in a snapshot: little-endian, a bool as one byte."""
        return "u1" if self.dtype == "bool" else np.dtype(self.dtype).newbyteorder("<").str


FIELDS: tuple[StateField, ...] = (
    StateField("last_ts", "int64", "one", NO_TIMESTAMP, "keep"),
    StateField("steps", "int64", "one", 0),
    StateField("smoothed", "float32", "one", 0.0),
    StateField("in_episode", "bool", "one", False, "episode"),
    StateField("run_length", "int32", "one", 0, "episode"),
    StateField("episode_start", "int64", "one", 0, "episode"),
    StateField("h", "float32", "hidden", 0.0),
    StateField("c", "float32", "hidden", 0.0),
    StateField("last_pred", "float32", "features", 0.0),
    StateField("last_input", "float32", "features", 0.0),
    StateField("residual_ratio", "float32", "features", 1.0),
    StateField("repeat_run", "int16", "features", 0),
    # the last known value of each context input (scaled; NaN: none yet). A gap keeps it: a commanded mode
    # or setpoint holds until changed, whatever the network's state
    StateField("last_context", "float32", "context", float("nan"), "keep", since=3),
)
"""Every per-slot field, in snapshot order (the novelty records and seasonal profile, optional, follow)."""


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
    last_context : ``[C, Fc]`` float32, the last known (scaled) value of each context input, NaN if none
    yet; kept across a gap reset
    novelty : :class:`~anomaly.adaptation.NoveltyRecords` of C slots, or ``None`` unless the store was
    made with ``novelty_alphas`` > 0 (the novelty episode rule); two error channels when
    ``seasonal_period`` > 0, one otherwise. A gap reset keeps them (they are what the device has done,
    not its network state) with the episode flag they decide; a new, removed or evicted device starts empty.
    season : ``[C, P, F]`` float32 seasonal profile (NaN: phase not seen yet; see
    :func:`anomaly.scoring.seasonal_residuals`), or ``None`` unless ``seasonal_period`` > 0. Indexed by
    time phase, so a gap reset keeps it, like the novelty records.

    Snapshots (bytes) are :mod:`anomaly.snapshots`'s job.

    Examples
    --------
    >>> store = DeviceStateStore(num_layers=1, hidden_size=4, n_features=2, model_version="v1")
    >>> store.slots_for(np.array(["a", "b"], dtype=object)).tolist()
    [0, 1]
    >>> store.steps[1] = 7
    >>> int(store.steps[store.slot_of("b")]), int(store.steps[store.slots_for(np.array(["c"], dtype=object))[0]])
    (7, 0)
    """

    def __init__(self, num_layers: int, hidden_size: int, n_features: int, model_version: str = "",
                 capacity: int = 1024, novelty_alphas: int = 0, seasonal_period: int = 0, n_context: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.n_features = n_features
        self.n_context = n_context
        self.model_version = model_version
        self._slots: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free: list[int] = []
        self._last_lookup: tuple[np.ndarray, np.ndarray] | None = None  # (device ids, their slots); see slots_for
        self.capacity = 0
        self.h = self.c = torch.zeros(num_layers, 0, hidden_size)  # typed here; allocated from FIELDS below
        for spec in FIELDS:
            setattr(self, spec.name, self._allocate(spec, 0))
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
            self._clear(slots[new])
        if isinstance(device_ids, np.ndarray):  # copies: the caller may reuse its arrays
            self._last_lookup = (device_ids.copy(), slots.copy())
        return slots

    def width_shape(self, spec: StateField) -> tuple[int, ...]:
        """The shape of ``spec`` per slot: ``()``, ``(F,)``, ``(Fc,)`` or ``(L, H)``."""
        return {"one": (), "features": (self.n_features,), "context": (self.n_context,),
                "hidden": (self.num_layers, self.hidden_size)}[spec.width]

    def _allocate(self, spec: StateField, capacity: int) -> np.ndarray | torch.Tensor:
        """``spec``'s slab for ``capacity`` slots, every slot at its fill value."""
        if spec.width == "hidden":
            return torch.full((self.num_layers, capacity, self.hidden_size), float(spec.fill))
        return np.full((capacity, *self.width_shape(spec)), spec.fill, dtype=spec.dtype)

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        logger.debug("growing state slabs from %d to %d slots", old, capacity)
        for spec in FIELDS:
            out = self._allocate(spec, capacity)
            if spec.width == "hidden":
                out[:, :old] = getattr(self, spec.name)
            else:
                out[:old] = getattr(self, spec.name)
            setattr(self, spec.name, out)
        if self.season is not None:
            season = np.full((capacity, *self.season.shape[1:]), np.nan, dtype=np.float32)
            season[:old] = self.season
            self.season = season
        if self.novelty is not None:
            self.novelty = self.novelty.grown(capacity)
        self.capacity = capacity

    def reset(self, slots: np.ndarray, keep_novelty: bool = False) -> None:
        """Restart the state of ``slots`` after a gap: refill the fields whose ``on_reset`` says so (``last_ts``
        and ``last_context`` stay).

        ``keep_novelty``: keep the novelty records, the episode they decide (``in_episode``,
        ``run_length``, ``episode_start``) and the seasonal profile: a gap reset under the novelty rule
        restarts the network, not the device's history.
        """
        self._fill(slots, tuple(spec for spec in FIELDS if spec.on_reset == "fill"
                                or (spec.on_reset == "episode" and not keep_novelty)))
        if self.novelty is not None and not keep_novelty:
            self.novelty.reset(slots)
        if self.season is not None and not keep_novelty:
            self.season[slots] = np.nan

    def _clear(self, slots: np.ndarray) -> None:
        """Every field of ``slots`` at its fill value: a new device, or a removed one."""
        self._fill(slots, FIELDS)
        if self.novelty is not None:
            self.novelty.reset(slots)
        if self.season is not None:
            self.season[slots] = np.nan

    def _fill(self, slots: np.ndarray, specs: Sequence[StateField]) -> None:
        idx = torch.as_tensor(slots, dtype=torch.long)
        for spec in specs:
            if spec.width == "hidden":
                getattr(self, spec.name)[:, idx] = float(spec.fill)
            else:
                getattr(self, spec.name)[slots] = spec.fill

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
            self._clear(np.asarray(removed, dtype=np.int64))
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
        fields = 0
        for spec in FIELDS:
            slab = getattr(self, spec.name)
            fields += slab.element_size() * slab.nelement() if spec.width == "hidden" else slab.nbytes
        novelty = self.novelty.nbytes() if self.novelty is not None else 0
        season = self.season.nbytes if self.season is not None else 0
        return fields + novelty + season
