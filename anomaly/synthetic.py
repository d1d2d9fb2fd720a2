"""Simulated sensor fleets with injected, recorded anomalies.

Why this module exists: unit tests, the demo, the benchmarks and the Kafka load simulator
(``streams/dev/simulator.py``) all need a fleet of sensors whose readings look like real machines
(per-device levels, correlated features, a daily cycle, autocorrelated noise) and whose anomalies
are known exactly. One generator serves them all, in two forms that share one vectorised core:

* :func:`simulate_fleet` returns a whole run as a DataFrame plus the truth table of anomalies;
* :class:`FleetStream` yields one reading per device per :meth:`~FleetStream.next_tick`, so the
  simulator can produce to Kafka without ever holding the run in memory.

:func:`simulate_fleet` *is* a loop over :meth:`FleetStream.next_tick`, so both forms give identical
numbers for the same :class:`FleetSpec`. What this module must not do: import Kafka (it is part of
the core), loop over devices in Python inside a tick (the simulator needs tens of thousands of
readings per second from one core), or share random streams between the process and the anomalies
(a run with anomalies must equal the same run without them outside the anomaly windows).

The process, per device ``d``, feature ``f`` and step ``t``::

    load[d, t]   = A[d] * sin(2π t / P + phase[d]) + slow[d, t] + fast[d, t]      (latent machine load)
    lagged[d,f,t] = lagged[d,f,t-1] + alpha[d,f] * (load[d,t] - lagged[d,f,t-1])  (first-order lag)
    x[d, f, t]   = base[d, f] + gain[d, f] * lagged[d, f, t] + e[d, f, t]
    e[d, f, t]   = phi[f] * e[d, f, t-1] + sqrt(1 - phi[f]²) * sd[d, f] * N(0, 1)     (AR(1) noise)

``slow`` and ``fast`` are AR(1) load fluctuations. Known feature names get a physical role:
``current`` follows the load at once, ``vibration`` with a 2-step lag (so it correlates with current),
``temp`` with a ~40-step thermal lag, ``pressure`` weakly with a 10-step lag; any other name gets a
generic role. ``sd[d, f]`` (the stationary noise standard deviation) is the unit of anomaly
magnitudes: it is the scale of a good forecaster's one-step error, so "6 sigma" means what a
detector sees.

Anomalies are *sensor faults applied to the observed value*: the underlying machine keeps running,
so a fault on ``current`` does not leak into ``temp`` and the series returns to the clean process when
the window ends. Windows are half-open, ``[start_step, start_step + duration)``, in steps and in ms.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

__all__ = [
    "ANOMALY_KINDS",
    "DEFAULT_FEATURES",
    "AnomalyRecord",
    "FleetSpec",
    "FleetStream",
    "InjectedAnomaly",
    "SimulatedFleet",
    "records_frame",
    "simulate_fleet",
]

logger = logging.getLogger(__name__)

ANOMALY_KINDS: tuple[str, ...] = ("spike", "level_shift", "stuck", "drift", "noise")
DEFAULT_FEATURES: tuple[str, ...] = ("temp", "vibration", "current", "pressure")

DEFAULT_START_MS = 1_704_067_200_000
"""2024-01-01T00:00:00Z: a fixed origin (not "now") keeps batch output reproducible."""
MS_PER_DAY = 86_400_000
MS_PER_HOUR = 3_600_000

DEFAULT_MAGNITUDE: dict[str, float] = {
    "spike": 6.0,        # offset in noise sds, for the few steps of the spike
    "level_shift": 4.0,  # persistent offset in noise sds
    "stuck": 0.0,        # unused: the sensor repeats its last value
    "drift": 6.0,        # offset in noise sds reached at the end of the window, growing linearly
    "noise": 5.0,        # factor on the noise sd (extra white noise: higher variance and frequency)
}
DURATION_RANGE_STEPS: dict[str, tuple[int, int]] = {
    "spike": (1, 5),
    "level_shift": (60, 600),
    "stuck": (60, 600),
    "drift": (300, 1200),
    "noise": (60, 600),
}
"""Inclusive range of durations drawn for rate-based anomalies, in steps."""

_KIND_CODE = {kind: i for i, kind in enumerate(ANOMALY_KINDS)}
_SPIKE, _SHIFT, _STUCK, _DRIFT, _NOISE = (_KIND_CODE[k] for k in ANOMALY_KINDS)
_NEVER = np.iinfo(np.int64).max


@dataclass(frozen=True)
class _Role:
    """How one feature responds to the device's latent load."""

    base: tuple[float, float]  # uniform range of a device's baseline level, in the sensor's units
    gain: float                # load sensitivity, as a fraction of the baseline
    lag_steps: float           # first-order lag of the load (thermal inertia), in steps
    noise: float               # stationary AR(1) noise sd, as a fraction of the baseline
    phi: float                 # AR(1) coefficient of the noise


_ROLES: dict[str, _Role] = {
    "current": _Role(base=(8.0, 16.0), gain=0.30, lag_steps=0.0, noise=0.015, phi=0.5),    # A
    "vibration": _Role(base=(1.0, 3.0), gain=0.25, lag_steps=2.0, noise=0.04, phi=0.3),    # mm/s RMS
    "temp": _Role(base=(45.0, 70.0), gain=0.18, lag_steps=40.0, noise=0.004, phi=0.85),    # °C
    "pressure": _Role(base=(95.0, 105.0), gain=0.04, lag_steps=10.0, noise=0.003, phi=0.7),  # kPa
}
_GENERIC_ROLE = _Role(base=(10.0, 100.0), gain=0.10, lag_steps=5.0, noise=0.01, phi=0.6)


@dataclass(frozen=True)
class FleetSpec:
    """Everything that determines a simulated fleet; equal specs give identical readings.

    Parameters
    ----------
    n_devices : int
        Number of devices, named ``f"{device_prefix}{i:05d}"`` (zero-padded, so string order is
        index order).
    features : tuple of str
        Feature names, in output column order. ``temp``, ``vibration``, ``current`` and ``pressure``
        get physical roles (see the module docstring); other names a generic one.
    interval_ms : int
        Event-time distance between a device's consecutive readings.
    start_ms : int or None
        Epoch ms of the first reading; ``None`` means 2024-01-01T00:00Z here (the Kafka simulator
        replaces ``None`` with the wall clock).
    seed : int
        Seed of every random stream (device parameters, process noise, anomaly schedule).
    cycle_period_steps : int or None
        Period of the daily cycle in steps; ``None`` means one day at ``interval_ms``. Use a short
        period (e.g. 600) so small tests see whole cycles.
    anomaly_rate : float
        Rate-based anomalies per device-hour of event time (0 disables them).
    anomaly_kinds : tuple of str
        Kinds that rate-based injection draws from, uniformly.
    clean_steps : int
        Rate-based anomalies never start before this step, so a model can warm up.
    device_prefix : str
        Prefix of device ids.

    Examples
    --------
    >>> spec = FleetSpec(n_devices=3, seed=7, cycle_period_steps=600)
    >>> spec.device_ids()
    ['dev-00000', 'dev-00001', 'dev-00002']
    >>> spec.period_steps, spec.ts_of(2)
    (600, 1704067202000)
    """

    n_devices: int
    features: tuple[str, ...] = DEFAULT_FEATURES
    interval_ms: int = 1000
    start_ms: int | None = None
    seed: int = 0
    cycle_period_steps: int | None = None
    anomaly_rate: float = 0.0
    anomaly_kinds: tuple[str, ...] = ANOMALY_KINDS
    clean_steps: int = 600
    device_prefix: str = "dev-"

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "anomaly_kinds", tuple(self.anomaly_kinds))
        if int(self.n_devices) < 1:
            raise ValueError(f"FleetSpec.n_devices must be >= 1, got {self.n_devices}")
        if not self.features or any(not isinstance(f, str) or not f for f in self.features):
            raise ValueError(f"FleetSpec.features must be non-empty strings, got {self.features!r}")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"FleetSpec.features has duplicates: {self.features!r}")
        if int(self.interval_ms) < 1:
            raise ValueError(f"FleetSpec.interval_ms must be >= 1, got {self.interval_ms}")
        if self.cycle_period_steps is not None and int(self.cycle_period_steps) < 2:
            raise ValueError(f"FleetSpec.cycle_period_steps must be >= 2 or None, "
                             f"got {self.cycle_period_steps}")
        if not (math.isfinite(self.anomaly_rate) and self.anomaly_rate >= 0):
            raise ValueError(f"FleetSpec.anomaly_rate must be a finite rate >= 0 per device-hour, "
                             f"got {self.anomaly_rate}")
        unknown = [k for k in self.anomaly_kinds if k not in _KIND_CODE]
        if unknown or not self.anomaly_kinds:
            raise ValueError(f"FleetSpec.anomaly_kinds must be a non-empty subset of {ANOMALY_KINDS}, "
                             f"got {self.anomaly_kinds!r}")
        if int(self.clean_steps) < 0:
            raise ValueError(f"FleetSpec.clean_steps must be >= 0, got {self.clean_steps}")

    @property
    def period_steps(self) -> int:
        """Period of the daily cycle, in steps."""
        if self.cycle_period_steps is not None:
            return int(self.cycle_period_steps)
        return max(2, MS_PER_DAY // int(self.interval_ms))

    @property
    def origin_ms(self) -> int:
        """Epoch ms of step 0 (``start_ms``, or 2024-01-01T00:00Z when that is ``None``)."""
        return DEFAULT_START_MS if self.start_ms is None else int(self.start_ms)

    def ts_of(self, step: int) -> int:
        """Epoch ms of ``step``."""
        return self.origin_ms + int(step) * int(self.interval_ms)

    def device_ids(self) -> list[str]:
        """Device ids in index order."""
        width = max(5, len(str(self.n_devices - 1)))
        return [f"{self.device_prefix}{i:0{width}d}" for i in range(self.n_devices)]


@dataclass(frozen=True)
class InjectedAnomaly:
    """An anomaly to inject at a fixed place.

    Parameters
    ----------
    device_id : str
        One of :meth:`FleetSpec.device_ids`.
    kind : str
        One of ``spike``, ``level_shift``, ``stuck``, ``drift``, ``noise``.
    start_step : int
        First affected step (0-based).
    duration : int
        Number of affected steps; the window is ``[start_step, start_step + duration)``.
    features : str or tuple of str
        Affected feature(s).
    magnitude : float or None
        In noise sds for ``spike``/``level_shift``/``drift`` (sign gives the direction), a factor
        >= 1 on the noise sd for ``noise``, ignored for ``stuck``. ``None`` takes the kind's default
        (6, 4, 6, 5).

    Examples
    --------
    >>> InjectedAnomaly("dev-00001", "spike", start_step=100, duration=3, features="temp")
    InjectedAnomaly(device_id='dev-00001', kind='spike', start_step=100, duration=3, features=('temp',),
    magnitude=6.0)
    """

    device_id: str
    kind: str
    start_step: int
    duration: int
    features: tuple[str, ...]
    magnitude: float | None = None

    def __post_init__(self) -> None:
        feats = (self.features,) if isinstance(self.features, str) else tuple(self.features)
        object.__setattr__(self, "features", feats)
        if self.kind not in _KIND_CODE:
            raise ValueError(f"InjectedAnomaly.kind must be one of {ANOMALY_KINDS}, got {self.kind!r}")
        if int(self.start_step) < 0:
            raise ValueError(f"InjectedAnomaly.start_step must be >= 0, got {self.start_step}")
        if int(self.duration) < 1:
            raise ValueError(f"InjectedAnomaly.duration must be >= 1 step, got {self.duration}")
        if not feats:
            raise ValueError("InjectedAnomaly.features must name at least one feature")
        magnitude = DEFAULT_MAGNITUDE[self.kind] if self.magnitude is None else float(self.magnitude)
        if not math.isfinite(magnitude):
            raise ValueError(f"InjectedAnomaly.magnitude must be finite, got {self.magnitude}")
        if self.kind == "noise" and abs(magnitude) < 1:
            raise ValueError(f"InjectedAnomaly.magnitude of a 'noise' anomaly is a factor >= 1 on the "
                             f"noise sd, got {magnitude}")
        object.__setattr__(self, "magnitude", magnitude)

    @property
    def end_step(self) -> int:
        """First step after the window."""
        return int(self.start_step) + int(self.duration)


@dataclass(frozen=True)
class AnomalyRecord:
    """The truth about one anomaly that was injected (explicitly or drawn at a rate).

    ``end_step`` / ``end_ms`` are exclusive: the last affected reading is at ``end_step - 1``, i.e.
    ``end_ms - interval_ms``.
    """

    device_id: str
    kind: str
    start_ms: int
    end_ms: int
    features: tuple[str, ...]
    magnitude: float
    start_step: int
    end_step: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


_RECORD_COLUMNS = ["device_id", "kind", "start_ms", "end_ms", "features", "magnitude",
                   "start_step", "end_step"]


def records_frame(records: Iterable[AnomalyRecord]) -> pd.DataFrame:
    """Truth table of ``records``, columns as :attr:`SimulatedFleet.anomalies` (also when empty)."""
    rows = [r.to_dict() for r in records]
    frame = pd.DataFrame(rows, columns=_RECORD_COLUMNS)
    for col in ("start_ms", "end_ms", "start_step", "end_step"):
        frame[col] = frame[col].astype(np.int64)
    frame["magnitude"] = frame["magnitude"].astype(np.float64)
    return frame


class FleetStream:
    """A simulated fleet, one reading per device per :meth:`next_tick`.

    Each tick costs a handful of numpy operations on ``[D, F]`` arrays (D devices, F features)
    plus one normal draw of ``D * (F + 2)`` values; there is no per-device Python work, and the
    anomaly bookkeeping is vectorised over the (few) live anomalies.

    Parameters
    ----------
    spec : FleetSpec
        The fleet.
    anomaly_rate : float or None
        Rate-based anomalies per device-hour; ``None`` takes ``spec.anomaly_rate``. A drawn anomaly
        that would overlap one already running (or an explicit one) on its device is dropped, so the
        realised rate is slightly lower than nominal.
    anomalies : sequence of InjectedAnomaly, optional
        Explicit anomalies. They may start inside ``clean_steps`` (that is the caller's choice), but
        two on the same device may not overlap.

    Examples
    --------
    >>> stream = FleetStream(FleetSpec(n_devices=4, seed=1, cycle_period_steps=600),
    ...                      anomalies=[InjectedAnomaly("dev-00002", "stuck", 1, 5, ("temp",))])
    >>> ids, ts, values = stream.next_tick()
    >>> ids.tolist(), ts.dtype, values.shape, values.dtype
    (['dev-00000', 'dev-00001', 'dev-00002', 'dev-00003'], dtype('int64'), (4, 4), dtype('float32'))
    >>> _, _, second = stream.next_tick()
    >>> bool(second[2, 0] == values[2, 0])  # stuck: repeats its last value
    True
    >>> [(r.device_id, r.kind, r.start_step) for r in stream.pop_started()]
    [('dev-00002', 'stuck', 1)]
    """

    def __init__(self, spec: FleetSpec, anomaly_rate: float | None = None,
                 anomalies: Sequence[InjectedAnomaly] | None = None) -> None:
        self.spec = spec
        rate = spec.anomaly_rate if anomaly_rate is None else float(anomaly_rate)
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"anomaly_rate must be a finite rate >= 0 per device-hour, got {anomaly_rate}")
        self._p_start = rate * spec.interval_ms / MS_PER_HOUR
        if self._p_start > 1:
            raise ValueError(f"anomaly_rate {rate}/device-hour exceeds one anomaly per reading at "
                             f"interval_ms={spec.interval_ms}")
        self.anomaly_rate = rate
        ids = np.asarray(spec.device_ids(), dtype=object)
        ids.flags.writeable = False
        self.device_ids = ids
        self._index = {d: i for i, d in enumerate(spec.device_ids())}
        self._fidx = {f: i for i, f in enumerate(spec.features)}
        self._kinds_allowed = np.asarray([_KIND_CODE[k] for k in spec.anomaly_kinds], dtype=np.int8)
        params, process, schedule, fault_noise = np.random.SeedSequence(spec.seed).spawn(4)
        self._rng = np.random.default_rng(process)
        self._sched = np.random.default_rng(schedule)
        self._fault_rng = np.random.default_rng(fault_noise)
        self._init_params(np.random.default_rng(params))
        self.step = 0
        """Number of ticks generated so far (the step of the next tick)."""
        self._last: np.ndarray | None = None
        self._records: list[AnomalyRecord] = []
        self._unpopped = 0
        self._busy_until = np.zeros(spec.n_devices, dtype=np.int64)
        self._next_explicit = np.full(spec.n_devices, _NEVER, dtype=np.int64)
        self._explicit_starts: dict[int, list[int]] = {}
        self._init_rows()
        if anomalies:
            self._add_explicit(list(anomalies))

    # ---- parameters and process ------------------------------------------------------------------

    def _init_params(self, rng: np.random.Generator) -> None:
        spec = self.spec
        d, f = spec.n_devices, len(spec.features)
        roles = [_ROLES.get(name, _GENERIC_ROLE) for name in spec.features]
        lo = np.array([r.base[0] for r in roles])
        hi = np.array([r.base[1] for r in roles])
        self._base = lo + (hi - lo) * rng.random((d, f))
        self._gain = np.array([r.gain for r in roles]) * self._base * rng.uniform(0.8, 1.2, (d, f))
        lag = np.array([r.lag_steps for r in roles]) * rng.uniform(0.8, 1.2, (d, f))
        self._alpha = 1.0 / (1.0 + lag)
        self.noise_sd = np.array([r.noise for r in roles]) * self._base * rng.uniform(0.7, 1.3, (d, f))
        """[D, F] stationary noise sd per device and feature: the unit of anomaly magnitudes."""
        self._phi = np.array([r.phi for r in roles])
        self._innov = self.noise_sd * np.sqrt(1.0 - self._phi ** 2)
        self._amp = rng.uniform(0.5, 1.0, d)
        # Devices peak at about the same time of day, give or take a tenth of the period.
        self._phase = rng.uniform(-0.1, 0.1, d) * 2.0 * np.pi
        period = spec.period_steps
        self._omega = 2.0 * np.pi / period
        # Slow load wander on ~1/12 of the cycle; fast fluctuations over a few steps.
        self._phi_slow = math.exp(-1.0 / max(10.0, period / 12.0))
        self._phi_fast = 0.9
        self._sd_slow, self._sd_fast = 0.2, 0.1
        self._innov_slow = self._sd_slow * math.sqrt(1.0 - self._phi_slow ** 2)
        self._innov_fast = self._sd_fast * math.sqrt(1.0 - self._phi_fast ** 2)

    def _clean_step(self, t: int) -> np.ndarray:
        """Advance the machine process to step ``t`` and return clean values [D, F] (float64)."""
        f = len(self.spec.features)
        eps = self._rng.standard_normal((self.spec.n_devices, f + 2))
        if t == 0:
            self._slow = self._sd_slow * eps[:, 0]
            self._fast = self._sd_fast * eps[:, 1]
            self._e = self.noise_sd * eps[:, 2:]
        else:
            self._slow = self._phi_slow * self._slow + self._innov_slow * eps[:, 0]
            self._fast = self._phi_fast * self._fast + self._innov_fast * eps[:, 1]
            self._e = self._phi * self._e + self._innov * eps[:, 2:]
        load = self._amp * np.sin(self._omega * t + self._phase) + self._slow + self._fast
        if t == 0:
            self._lagged = np.repeat(load[:, None], f, axis=1)
        else:
            self._lagged += self._alpha * (load[:, None] - self._lagged)
        return self._base + self._gain * self._lagged + self._e

    # ---- anomaly table ---------------------------------------------------------------------------
    # Scheduled (explicit, not yet started) and running anomalies live in parallel arrays ("rows"),
    # so each tick selects and applies them with array operations. Finished rows are pruned.

    def _init_rows(self) -> None:
        f = len(self.spec.features)
        self._r_dev = np.empty(0, dtype=np.int64)
        self._r_kind = np.empty(0, dtype=np.int8)
        self._r_start = np.empty(0, dtype=np.int64)
        self._r_end = np.empty(0, dtype=np.int64)
        self._r_feat = np.empty((0, f), dtype=bool)
        self._r_mag = np.empty(0, dtype=np.float64)
        self._r_stuck = np.empty((0, f), dtype=np.float64)

    def _append_rows(self, dev: np.ndarray, kind: np.ndarray, start: np.ndarray, end: np.ndarray,
                     feat: np.ndarray, mag: np.ndarray) -> None:
        self._r_dev = np.concatenate([self._r_dev, dev.astype(np.int64)])
        self._r_kind = np.concatenate([self._r_kind, kind.astype(np.int8)])
        self._r_start = np.concatenate([self._r_start, start.astype(np.int64)])
        self._r_end = np.concatenate([self._r_end, end.astype(np.int64)])
        self._r_feat = np.concatenate([self._r_feat, feat.astype(bool)])
        self._r_mag = np.concatenate([self._r_mag, mag.astype(np.float64)])
        self._r_stuck = np.concatenate([self._r_stuck, np.zeros(feat.shape, dtype=np.float64)])

    def _add_explicit(self, anomalies: list[InjectedAnomaly]) -> None:
        f = len(self.spec.features)
        dev, kind, start, end, mag = [], [], [], [], []
        feat = np.zeros((len(anomalies), f), dtype=bool)
        for i, a in enumerate(anomalies):
            if a.device_id not in self._index:
                raise ValueError(f"InjectedAnomaly #{i}: unknown device_id {a.device_id!r} "
                                 f"(the fleet has {self.spec.n_devices} devices, "
                                 f"e.g. {self.device_ids[0]!r})")
            for name in a.features:
                if name not in self._fidx:
                    raise ValueError(f"InjectedAnomaly #{i}: unknown feature {name!r}; "
                                     f"features are {self.spec.features!r}")
                feat[i, self._fidx[name]] = True
            dev.append(self._index[a.device_id])
            kind.append(_KIND_CODE[a.kind])
            start.append(a.start_step)
            end.append(a.end_step)
            mag.append(a.magnitude)
        by_device: dict[int, list[tuple[int, int, int]]] = {}
        for i, (d, s, e) in enumerate(zip(dev, start, end, strict=True)):
            by_device.setdefault(d, []).append((s, e, i))
        for d, spans in by_device.items():
            spans.sort()
            for (s0, e0, i0), (s1, _, i1) in itertools.pairwise(spans):
                if s1 < e0:
                    raise ValueError(f"InjectedAnomaly #{i0} (steps {s0}..{e0 - 1}) and #{i1} "
                                     f"(from step {s1}) overlap on device {self.device_ids[d]!r}")
            self._explicit_starts[d] = [s for s, _, _ in spans]
            self._next_explicit[d] = spans[0][0]
        self._append_rows(np.asarray(dev), np.asarray(kind), np.asarray(start), np.asarray(end), feat,
                          np.asarray(mag, dtype=np.float64))

    def _draw_rate_based(self, t: int) -> None:
        """Start rate-based anomalies at step ``t``: O(new anomalies), not O(devices)."""
        n_dev, f = self.spec.n_devices, len(self.spec.features)
        k = int(self._sched.binomial(n_dev, self._p_start))
        if k == 0:
            return
        dev = self._sched.choice(n_dev, size=k, replace=False)
        kind = self._sched.choice(self._kinds_allowed, size=k)
        lo = np.array([DURATION_RANGE_STEPS[k_][0] for k_ in ANOMALY_KINDS])[kind]
        hi = np.array([DURATION_RANGE_STEPS[k_][1] for k_ in ANOMALY_KINDS])[kind]
        duration = self._sched.integers(lo, hi + 1)
        n_feat = self._sched.integers(1, min(2, f) + 1, size=k)
        rank = np.argsort(self._sched.random((k, f)), axis=1).argsort(axis=1)
        feat = rank < n_feat[:, None]
        sign = self._sched.choice(np.array([-1.0, 1.0]), size=k)
        mag = np.array([DEFAULT_MAGNITUDE[k_] for k_ in ANOMALY_KINDS])[kind]
        mag = np.where((kind == _NOISE) | (kind == _STUCK), mag, mag * sign)
        end = t + duration
        ok = (self._busy_until[dev] <= t) & (end <= self._next_explicit[dev])
        if not ok.any():
            return
        self._busy_until[dev[ok]] = end[ok]
        self._append_rows(dev[ok], kind[ok], np.full(int(ok.sum()), t), end[ok], feat[ok], mag[ok])

    def _start_rows(self, rows: np.ndarray, t: int, prev: np.ndarray) -> None:
        """Activate anomalies whose window opens at ``t``: capture stuck values, record the truth."""
        stuck = rows[self._r_kind[rows] == _STUCK]
        if stuck.size:
            self._r_stuck[stuck] = prev[self._r_dev[stuck]]
        spec = self.spec
        for r in rows.tolist():  # per started anomaly, not per device: a handful per tick at most
            d = int(self._r_dev[r])
            if d in self._explicit_starts and self._explicit_starts[d] and self._explicit_starts[d][0] == t:
                self._explicit_starts[d].pop(0)
                self._next_explicit[d] = self._explicit_starts[d][0] if self._explicit_starts[d] else _NEVER
                self._busy_until[d] = max(self._busy_until[d], self._r_end[r])
            rec = AnomalyRecord(
                device_id=str(self.device_ids[d]), kind=ANOMALY_KINDS[int(self._r_kind[r])],
                start_ms=spec.ts_of(t), end_ms=spec.ts_of(int(self._r_end[r])),
                features=tuple(n for n, on in zip(spec.features, self._r_feat[r], strict=True) if on),
                magnitude=float(self._r_mag[r]), start_step=t, end_step=int(self._r_end[r]),
            )
            self._records.append(rec)
            self._unpopped += 1
            logger.debug("anomaly %s starts on device %s at step %d (%d ms), features %s, until step %d",
                         rec.kind, rec.device_id, t, rec.start_ms, rec.features, rec.end_step)

    def _apply_anomalies(self, t: int, values: np.ndarray, prev: np.ndarray) -> None:
        """Apply running anomalies to ``values`` [D, F] (float64) in place."""
        if self._p_start > 0 and t >= self.spec.clean_steps:
            self._draw_rate_based(t)
        if self._r_dev.size == 0:
            return
        live = np.flatnonzero((self._r_start <= t) & (t < self._r_end))
        if live.size == 0:
            return
        opening = live[self._r_start[live] == t]
        if opening.size:
            self._start_rows(opening, t, prev)
        dev, kind, feat = self._r_dev[live], self._r_kind[live], self._r_feat[live]
        mag = self._r_mag[live]
        sd = self.noise_sd[dev]
        progress = (t - self._r_start[live] + 1) / (self._r_end[live] - self._r_start[live])
        offset = (np.where((kind == _SPIKE) | (kind == _SHIFT), mag, 0.0)
                  + np.where(kind == _DRIFT, mag * progress, 0.0))
        add = offset[:, None] * sd
        noisy = np.flatnonzero(kind == _NOISE)
        if noisy.size:
            extra = np.sqrt(mag[noisy] ** 2 - 1.0)[:, None] * sd[noisy]
            add[noisy] += extra * self._fault_rng.standard_normal((noisy.size, add.shape[1]))
        # Each device has at most one live anomaly, so fancy-index assignment has no duplicate rows.
        current = values[dev]
        values[dev] = np.where(feat, current + add, current)
        stuck = np.flatnonzero(kind == _STUCK)
        if stuck.size:
            d_s = dev[stuck]
            values[d_s] = np.where(feat[stuck], self._r_stuck[live[stuck]], values[d_s])

    def _prune(self, t: int) -> None:
        keep = self._r_end > t + 1
        if not keep.all():
            self._r_dev, self._r_kind = self._r_dev[keep], self._r_kind[keep]
            self._r_start, self._r_end = self._r_start[keep], self._r_end[keep]
            self._r_feat, self._r_mag = self._r_feat[keep], self._r_mag[keep]
            self._r_stuck = self._r_stuck[keep]

    # ---- public API ------------------------------------------------------------------------------

    def next_tick_into(self, out: np.ndarray) -> int:
        """Like :meth:`next_tick`, writing the values into ``out`` [D, F] (float32); returns the step.

        For callers that fill a preallocated block (:func:`simulate_fleet`, the Kafka simulator).
        """
        t = self.step
        values = self._clean_step(t)
        prev = values if self._last is None else self._last
        self._apply_anomalies(t, values, prev)
        out[...] = values
        self._last = out.astype(np.float64)  # float32-rounded, so a stuck sensor repeats bit-for-bit
        if self._r_dev.size:
            self._prune(t)
        self.step = t + 1
        return t

    def next_tick(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Generate the next reading of every device.

        Returns
        -------
        device_ids : numpy.ndarray
            [D] object array of str, always the same (read-only) array, in index order.
        ts : numpy.ndarray
            [D] int64 epoch ms, all equal to ``spec.ts_of(step)``.
        values : numpy.ndarray
            [D, F] float32 in ``spec.features`` order, anomalies applied.
        """
        out = np.empty((self.spec.n_devices, len(self.spec.features)), dtype=np.float32)
        ts = np.full(self.spec.n_devices, self.spec.ts_of(self.step), dtype=np.int64)
        self.next_tick_into(out)
        return self.device_ids, ts, out

    def pop_started(self) -> list[AnomalyRecord]:
        """Anomalies that started since the previous call (in start order), for logging/callbacks."""
        if self._unpopped == 0:
            return []
        started = self._records[-self._unpopped:]
        self._unpopped = 0
        return started

    @property
    def records(self) -> list[AnomalyRecord]:
        """Every anomaly started so far (a copy), including ones still running."""
        return list(self._records)

    @property
    def anomalies(self) -> pd.DataFrame:
        """Truth table of the anomalies started so far; see :attr:`SimulatedFleet.anomalies`."""
        return records_frame(self._records)


@dataclass(frozen=True)
class SimulatedFleet:
    """A simulated run.

    Attributes
    ----------
    spec : FleetSpec
    readings : pandas.DataFrame
        Columns ``device_id``, ``ts`` (int64 epoch ms), then ``spec.features`` (float32); sorted by
        ``ts`` then ``device_id``; ``n_steps * n_devices`` rows.
    anomalies : pandas.DataFrame
        Truth table, one row per injected anomaly in start order: ``device_id``, ``kind``,
        ``start_ms``, ``end_ms`` (exclusive), ``features`` (tuple of names), ``magnitude``,
        ``start_step``, ``end_step`` (exclusive; clipped to the simulated range).
    """

    spec: FleetSpec
    readings: pd.DataFrame
    anomalies: pd.DataFrame

    def anomaly_mask(self) -> np.ndarray:
        """[rows of ``readings``] bool: the reading lies inside an anomaly window of its device.

        Loops over anomalies (few), not readings.
        """
        n_dev = self.spec.n_devices
        mask = np.zeros(len(self.readings), dtype=bool)
        index = {d: i for i, d in enumerate(self.spec.device_ids())}
        for dev, start, end in zip(self.anomalies["device_id"], self.anomalies["start_step"],
                                   self.anomalies["end_step"], strict=True):
            mask[np.arange(int(start), int(end)) * n_dev + index[dev]] = True
        return mask


def simulate_fleet(spec: FleetSpec, n_steps: int, anomalies: Sequence[InjectedAnomaly] | None = None,
                   anomaly_rate: float | None = None) -> SimulatedFleet:
    """Simulate ``n_steps`` readings of every device of ``spec``.

    Parameters
    ----------
    spec : FleetSpec
        The fleet; same spec (and same arguments) → identical output.
    n_steps : int
        Readings per device.
    anomalies : sequence of InjectedAnomaly, optional
        Explicit anomalies; those starting at or after ``n_steps`` are skipped with a warning.
    anomaly_rate : float or None
        Rate-based anomalies per device-hour (``None``: ``spec.anomaly_rate``); they never start before
        ``spec.clean_steps``. May be combined with explicit anomalies.

    Returns
    -------
    SimulatedFleet
        ``readings`` [n_steps * D rows] and the ``anomalies`` truth table.

    Examples
    --------
    >>> spec = FleetSpec(n_devices=2, seed=3, cycle_period_steps=600, clean_steps=100)
    >>> shift = InjectedAnomaly("dev-00001", "level_shift", start_step=500, duration=50, features="current")
    >>> run = simulate_fleet(spec, 1_000, anomalies=[shift])
    >>> run.readings.shape, list(run.readings.columns)
    ((2000, 6), ['device_id', 'ts', 'temp', 'vibration', 'current', 'pressure'])
    >>> run.anomalies[["device_id", "kind", "start_step", "end_step"]].to_dict("records")
    [{'device_id': 'dev-00001', 'kind': 'level_shift', 'start_step': 500, 'end_step': 550}]
    >>> int(run.anomaly_mask().sum())
    50
    """
    n_steps = int(n_steps)
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    explicit = list(anomalies or [])
    late = [a for a in explicit if a.start_step >= n_steps]
    if late:
        logger.warning("%d explicit anomaly(ies) start at or after n_steps=%d and are not injected: %s",
                       len(late), n_steps, late[:3])
        explicit = [a for a in explicit if a.start_step < n_steps]
    stream = FleetStream(spec, anomaly_rate=anomaly_rate, anomalies=explicit)
    n_dev, n_feat = spec.n_devices, len(spec.features)
    block = np.empty((n_steps, n_dev, n_feat), dtype=np.float32)
    for t in range(n_steps):
        stream.next_tick_into(block[t])
    ts = spec.origin_ms + np.arange(n_steps, dtype=np.int64) * int(spec.interval_ms)
    readings = pd.DataFrame({"device_id": np.tile(stream.device_ids, n_steps), "ts": np.repeat(ts, n_dev)})
    flat = block.reshape(n_steps * n_dev, n_feat)
    for j, name in enumerate(spec.features):
        readings[name] = flat[:, j]
    records = [
        r if r.end_step <= n_steps
        else AnomalyRecord(**{**r.to_dict(), "end_step": n_steps, "end_ms": spec.ts_of(n_steps)})
        for r in stream.records
    ]
    return SimulatedFleet(spec=spec, readings=readings, anomalies=records_frame(records))
