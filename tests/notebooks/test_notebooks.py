"""The notebooks run headless (nbclient) on a small simulated fleet, without Kafka, and do their job.

Parameters are injected papermill-style: a cell tagged ``injected-parameters`` right after the cell
tagged ``parameters``. Each notebook's last cell (tagged ``summary``) prints ``RESULT <json>``, which
the tests read back. retrain.ipynb must leave a newer, loadable version in the registry;
explore_events.ipynb must name the devices and features that the injected anomalies hit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from anomaly.detector import StreamingDetector
from anomaly.readings import ReadingBatch
from anomaly.registry import ModelRegistry, version_key
from anomaly.synthetic import FleetSpec, InjectedAnomaly, simulate_fleet
from anomaly.training import fit
from streams.codec import decode_event, encode_event
from streams.export import events_frame

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
FLEET = FleetSpec(n_devices=4, seed=3, cycle_period_steps=300, clean_steps=100)
STEPS = 1500
ANOMALIES = [
    InjectedAnomaly("dev-00000", "level_shift", start_step=400, duration=60, features="current", magnitude=30.0),
    InjectedAnomaly("dev-00001", "level_shift", start_step=1200, duration=60, features="current", magnitude=30.0),
    InjectedAnomaly("dev-00002", "spike", start_step=1300, duration=3, features="vibration", magnitude=30.0),
    InjectedAnomaly("dev-00003", "level_shift", start_step=1350, duration=60, features="temp", magnitude=40.0),
]


def execute(name: str, parameters: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """Run notebook ``name`` with ``parameters`` in ``cwd``; returns its RESULT json."""
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = next(i for i, cell in enumerate(book.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{key} = {value!r}" for key, value in parameters.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    book.cells.insert(index + 1, injected)
    NotebookClient(book, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    (summary,) = [c for c in book.cells if "summary" in c.metadata.get("tags", [])]
    text = "".join(o.get("text", "") for o in summary.outputs if o.get("output_type") == "stream")
    (line,) = [s for s in text.splitlines() if s.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def fleet():
    return simulate_fleet(FLEET, STEPS, anomalies=ANOMALIES)


@pytest.fixture(scope="module")
def live_model(fleet):
    clean = fleet.readings[fleet.readings["ts"] < FLEET.ts_of(350)]
    return fit(clean, list(FLEET.features), time_col="ts", device_col="device_id", epochs=2, hidden_size=8,
               progress=False, name="fleet", version="1")


@pytest.mark.parametrize("name", ["retrain.ipynb", "explore_events.ipynb"])
def test_notebooks_are_committed_without_outputs(name):
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: clear outputs before committing"
    assert "parameters" in code[0].metadata.get("tags", []), f"{name}: the first code cell holds the parameters"


def test_retrain_publishes_a_newer_loadable_version(fleet, live_model, tmp_path):
    fleet.readings.to_parquet(tmp_path / "history.parquet", index=False)
    labels = fleet.anomalies.assign(start=fleet.anomalies["start_ms"], end=fleet.anomalies["end_ms"])
    labels[["device_id", "start", "end"]].to_csv(tmp_path / "labels.csv", index=False)
    registry = ModelRegistry(tmp_path / "models", create=True)
    registry.publish(live_model, "1", live=True)

    result = execute("retrain.ipynb", {"history_path": "history.parquet", "registry_dir": "models",
                                       "labels_path": "labels.csv", "epochs": 4, "hidden_size": 12,
                                       "exclude_margin_s": 30.0, "max_plot_devices": 2}, tmp_path)

    assert registry.versions() == ["1", "2"]
    assert result["published_version"] == "2" and version_key("2") > version_key("1")
    bundle = registry.load("2")
    assert bundle.features == live_model.features and bundle.name == "sensor-anomaly"
    registry.validate("2")
    assert registry.live_version() == "1" == result["live"], "make_live is off by default"
    evaluation = bundle.training["evaluation"]
    assert set(evaluation) == {"new", "live"}, "the live model is compared on the same data"
    assert evaluation["new"]["incidents_in_holdout"] == 3
    assert evaluation["new"]["incidents_detected"] >= 2
    assert evaluation["new"]["false_alarm_rate"] < 0.05
    assert bundle.training["incidents_excluded"] == len(ANOMALIES)


def test_retrain_keeps_the_live_models_context_inputs(fleet, tmp_path):
    history = fleet.readings.assign(mode=(fleet.readings["ts"] // 60_000 % 2).astype(float))  # a commanded mode
    history.to_parquet(tmp_path / "history.parquet", index=False)
    clean = history[history["ts"] < FLEET.ts_of(350)]
    live = fit(clean, list(FLEET.features), time_col="ts", device_col="device_id", context=["mode"], epochs=2,
               hidden_size=8, progress=False, name="fleet", version="1")
    registry = ModelRegistry(tmp_path / "models", create=True)
    registry.publish(live, "1", live=True)

    result = execute("retrain.ipynb", {"history_path": "history.parquet", "registry_dir": "models", "epochs": 2,
                                       "hidden_size": 8, "max_plot_devices": 1}, tmp_path)

    assert result["context"] == ["mode"] and result["features"] == list(FLEET.features)
    bundle = registry.load("2")
    assert bundle.context == ("mode",) and bundle.features == live.features
    registry.validate("2")  # the same context schema: a hot reload would take it


def test_explore_events_names_the_devices_and_features_behind_the_anomalies(fleet, live_model, tmp_path):
    detector = StreamingDetector(live_model)
    frame = fleet.readings
    events = []
    for start in range(0, len(frame), 1000):
        part = frame.iloc[start:start + 1000]
        result = detector.process(ReadingBatch.from_frame(part, list(FLEET.features), "ts", "device_id"))
        for event in result.events:
            events.append(decode_event(encode_event(event, "sensor.readings", 0, start + event.row)[1]))
    events_frame(events).to_parquet(tmp_path / "events.parquet", index=False)
    anomalous = {a.device_id for a in ANOMALIES}

    result = execute("explore_events.ipynb", {"events_path": "events.parquet", "top_n": 4}, tmp_path)

    assert result["events"] == len(events) and result["episodes"] == sum(e["kind"] == "start" for e in events)
    assert set(result["top_devices"]) == anomalous
    assert result["device_top_feature"] == {a.device_id: a.features[0] for a in ANOMALIES}, \
        "each device's anomalies are driven by the feature the fault was injected into"
    assert set(result["drivers"]) == set(FLEET.features)
    assert sum(result["drivers"].values()) == pytest.approx(1.0, abs=1e-3)
    assert result["top_feature"] == "current"  # two of the four faults
