"""A small trained model and a simulated stream with known anomalies, for the hot-reload and shadow unit tests.

Why a module: both test files need the same model (trained once per session, about two seconds) and
the same stream cut into poll-sized batches of decoded records, as the processor would see them,
without a broker.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pandas as pd

from anomaly.bundle import ModelBundle
from anomaly.synthetic import FleetSpec, InjectedAnomaly, simulate_fleet
from anomaly.training import fit
from streams.codec import DecodedBatch, decode_records, encode_reading

__all__ = ["ANOMALIES", "FLEET", "PARTITIONS", "TRAIN_STEPS", "decoded_batches", "stream_frame", "trained"]

FLEET = FleetSpec(n_devices=4, seed=5, cycle_period_steps=300, clean_steps=50)
TRAIN_STEPS = 800
PARTITIONS = 3
ANOMALIES = (
    InjectedAnomaly("dev-00001", "level_shift", start_step=TRAIN_STEPS + 150, duration=80, features="current",
                    magnitude=30.0),
    InjectedAnomaly("dev-00002", "spike", start_step=TRAIN_STEPS + 250, duration=3, features="vibration",
                    magnitude=25.0),
    InjectedAnomaly("dev-00003", "level_shift", start_step=TRAIN_STEPS + 350, duration=40, features="temp",
                    magnitude=40.0),
)


@functools.cache
def trained() -> ModelBundle:
    """A model trained on the first TRAIN_STEPS clean steps of FLEET (version "1")."""
    history = simulate_fleet(FLEET, TRAIN_STEPS).readings
    return fit(history, list(FLEET.features), time_col="ts", device_col="device_id", epochs=4, hidden_size=12,
               progress=False, name="unit-fleet", version="1")


@functools.cache
def stream_frame(steps: int = 500) -> pd.DataFrame:
    """FLEET steps [TRAIN_STEPS, TRAIN_STEPS + steps) with ANOMALIES, time-ordered."""
    run = simulate_fleet(FLEET, TRAIN_STEPS + steps, anomalies=list(ANOMALIES))
    return run.readings[run.readings["ts"] >= FLEET.ts_of(TRAIN_STEPS)].reset_index(drop=True)


def decoded_batches(frame: pd.DataFrame, batch_rows: int = 200) -> list[DecodedBatch]:
    """The frame as consumed records (one reading each, partition by device, offsets per partition), decoded
    in polls of ``batch_rows`` records."""
    features = list(FLEET.features)
    offsets = [0] * PARTITIONS
    records = []
    for row in frame.itertuples(index=False):
        partition = int(row.device_id[-5:]) % PARTITIONS
        key, value = encode_reading(row.device_id, int(row.ts), {f: float(getattr(row, f)) for f in features})
        records.append(SimpleNamespace(topic="sensor.readings", partition=partition, offset=offsets[partition],
                                       key=key, value=value, timestamp=int(row.ts), headers=[]))
        offsets[partition] += 1
    return [decode_records(records[i:i + batch_rows], features) for i in range(0, len(records), batch_rows)]
