"""fit(): scaling, split by time, early stopping, determinism, progress, calibration, and clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from anomaly.bundle import DetectorConfig
from anomaly.detector import StreamingDetector
from anomaly.errors import DataError, TrainingError
from anomaly.events import ReadingStatus
from anomaly.readings import ReadingBatch
from anomaly.training import TrainingConfig, dominant_period, fit, prepare_series

FAST = {"epochs": 2, "hidden_size": 8, "progress": False}


def fleet(devices: int = 2, steps: int = 300, seed: int = 0) -> pd.DataFrame:
    """Devices with their own level and phase, a sine cycle and noise; one row per reading."""
    rng = np.random.default_rng(seed)
    parts = []
    for d in range(devices):
        t = np.arange(steps)
        parts.append(pd.DataFrame({
            "device": f"dev-{d}",
            "ts": 1_700_000_000_000 + t * 1000,
            "x": 10 * d + np.sin(t / 15 + d) + rng.normal(0, 0.05, steps),
            "y": -5 * d + np.cos(t / 9 + d) + rng.normal(0, 0.05, steps),
        }))
    return pd.concat(parts, ignore_index=True)


def weights(bundle) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bundle.model.state_dict().items()}


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def trained():
    return fit(fleet(), ["x", "y"], time_col="ts", device_col="device", **FAST)


# --------------------------------------------------------------------------------------------------- happy path


def test_fit_returns_a_complete_calibrated_bundle(trained):
    assert trained.features == ("x", "y")
    assert trained.model.hidden_size == 8
    assert trained.config.nominal_interval_ms == 1000
    assert np.isfinite(trained.config.threshold) and trained.config.threshold > 0
    summary = trained.training
    assert summary["rows"] == 600 and summary["devices"] == 2 and summary["devices_used"] == 2
    assert summary["epochs"] == len(summary["history"]) <= 2
    assert summary["time_range"] == [1_700_000_000_000, 1_700_000_000_000 + 299_000]
    # calibration residuals: each device's held-out quarter (75 readings), all past warm-up
    assert trained.scorer.n_fit == summary["calibration_residuals"] == 2 * 75
    assert all(torch.isfinite(v).all() for v in trained.model.state_dict().values())


def test_same_seed_same_bundle_other_seed_other_weights():
    frame = fleet()
    a = fit(frame, ["x", "y"], time_col="ts", device_col="device", seed=7, **FAST)
    b = fit(frame, ["x", "y"], time_col="ts", device_col="device", seed=7, **FAST)
    c = fit(frame, ["x", "y"], time_col="ts", device_col="device", seed=8, **FAST)
    assert same_weights(a, b)
    assert a.config == b.config
    np.testing.assert_array_equal(a.scorer.precision, b.scorer.precision)
    assert not same_weights(a, c)


def test_row_order_does_not_change_the_result(trained):
    shuffled = fleet().sample(frac=1.0, random_state=3)
    again = fit(shuffled, ["x", "y"], time_col="ts", device_col="device", **FAST)
    assert same_weights(again, trained)
    assert again.config.threshold == trained.config.threshold


def test_the_training_part_is_the_earliest_part_of_each_device():
    # level 0 for the first 80% of each device, 100 afterwards: only a split by time fits the
    # scaler (on the training part) to a mean near 0
    frame = fleet(devices=2, steps=400)
    late = frame.groupby("device").cumcount() >= 320
    frame.loc[late, "x"] += 100.0
    bundle = fit(frame, ["x", "y"], time_col="ts", device_col="device", val_fraction=0.2, **FAST)
    assert abs(bundle.scaler.mean[0] - frame.loc[~late, "x"].mean()) < 1e-3
    assert bundle.scorer.n_fit == 2 * 80


def test_threshold_is_the_false_alarm_quantile_of_held_out_normal_readings():
    """Streaming the training data through the detector reproduces the calibration: about the
    configured share of held-out readings score at or above the threshold."""
    frame = fleet(devices=4, steps=1000, seed=1)
    far = 0.02
    bundle = fit(frame, ["x", "y"], time_col="ts", device_col="device", val_fraction=0.5,
                 detector=DetectorConfig(false_alarm_rate=far), **FAST)
    result = StreamingDetector(bundle).process(ReadingBatch.from_frame(frame, ["x", "y"], "ts", "device"))
    held_out = (frame.groupby("device").cumcount() >= 500).to_numpy() & (result.status == ReadingStatus.SCORED)
    above = result.scores[held_out] >= StreamingDetector(bundle).score_threshold
    assert held_out.sum() == 2000
    # 40 expected; the detector's smoothing carries history into the first held-out readings,
    # which calibration starts from zero, so allow a little slack
    assert 0.5 * far <= above.mean() <= 1.5 * far


def test_missing_cells_are_filled_and_duplicate_timestamps_keep_the_first_row():
    frame = fleet(devices=1, steps=200)
    holes = frame.copy()
    holes.loc[[5, 6, 50], "x"] = np.nan
    holes.loc[0, "y"] = np.nan
    duplicated = pd.concat([holes, holes.iloc[[10, 20]].assign(x=99.0)], ignore_index=True)
    series = prepare_series(duplicated, ["x", "y"], time_col="ts", device_col="device")
    ts, values = series["dev-0"]
    assert len(ts) == 200 and np.all(np.diff(ts) > 0)
    assert values[5, 0] == values[6, 0] == values[4, 0]  # forward-filled
    assert values[0, 1] == values[1, 1]  # back-filled at the start
    assert values[10, 0] == np.float32(frame.loc[10, "x"])  # the first of two rows with one timestamp
    assert np.isfinite(values).all()


def test_single_device_iso_timestamps_and_a_constant_feature():
    frame = fleet(devices=1, steps=300)
    frame["ts"] = pd.to_datetime(frame["ts"], unit="ms").dt.strftime("%Y-%m-%dT%H:%M:%S")
    frame["y"] = 3.0
    bundle = fit(frame.drop(columns="device"), ["x", "y"], time_col="ts", **FAST)
    assert bundle.scaler.scale[1] == 1.0  # a constant keeps unit scale: any change from it is visible
    assert bundle.training["devices"] == 1 and bundle.config.nominal_interval_ms == 1000


def test_huge_but_finite_values_train_to_finite_weights():
    frame = fleet(devices=1, steps=300)
    frame["x"] *= 1e30
    bundle = fit(frame, ["x", "y"], time_col="ts", device_col="device", **FAST)
    assert np.isfinite(bundle.scaler.scale).all() and bundle.scaler.scale[0] > 1e29
    assert all(torch.isfinite(v).all() for v in bundle.model.state_dict().values())
    assert np.isfinite(bundle.config.threshold)


# ---------------------------------------------------------------------------------------- loop and progress


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    # a learning rate this small cannot improve the held-out loss by the 1e-6 that counts
    bundle = fit(fleet(), ["x", "y"], time_col="ts", device_col="device", epochs=20, patience=2,
                 learning_rate=1e-12, hidden_size=8, progress=False)
    assert bundle.training["epochs"] == 3
    losses = [h["val_loss"] for h in bundle.training["history"]]
    assert bundle.training["best_val_loss"] == min(losses)


def test_max_seconds_bounds_the_training_time():
    bundle = fit(fleet(), ["x", "y"], time_col="ts", device_col="device", epochs=50, max_seconds=0.0,
                 hidden_size=8, progress=False)
    assert bundle.training["epochs"] == 1


def test_progress_bar_only_when_asked(capsys):
    fit(fleet(), ["x", "y"], time_col="ts", device_col="device", epochs=1, hidden_size=8, progress=True)
    assert "training" in capsys.readouterr().err
    fit(fleet(), ["x", "y"], time_col="ts", device_col="device", epochs=1, hidden_size=8, progress=False)
    assert capsys.readouterr().err == ""


def test_torch_thread_setting_is_restored():
    before = torch.get_num_threads()
    fit(fleet(), ["x", "y"], time_col="ts", device_col="device", threads=1, **FAST)
    assert torch.get_num_threads() == before


# --------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("table", "features", "error", "message"), [
    (fleet().drop(columns="y"), ["x", "y"], DataError, r"missing column\(s\) \['y'\]"),
    (fleet().assign(x="high"), ["x", "y"], DataError, r"column 'x' has a non-numeric value 'high' at row 0"),
    (fleet().assign(y=np.inf), ["x", "y"], DataError, r"column 'y' has an infinite value"),
    (fleet().assign(x=1e39), ["x", "y"], DataError, r"column 'x' has a value 1e\+39 at row 0 outside the float32"),
    (fleet().iloc[:0], ["x", "y"], DataError, "the table has no rows"),
    (fleet(), [], DataError, "no features given"),
    (fleet(), "x", DataError, "features must be a list of column names"),
    (fleet(), ["x", "y", "x"], DataError, r"feature\(s\) \['x'\] listed more than once"),
    (fleet().assign(x=np.nan, y=np.nan), ["x", "y"], DataError, "every row has all features"),
    (fleet().assign(y=np.where(fleet()["device"] == "dev-1", np.nan, 0.0)), ["x", "y"], DataError,
     "column 'y' has no value at all for device 'dev-1'"),
    (fleet().assign(ts=["soon"] * 600), ["x", "y"], DataError, "column 'ts'"),
    (fleet(steps=40), ["x", "y"], TrainingError, r"too little data: 80 rows .* need at least 128"),
    (fleet(devices=100, steps=3), ["x", "y"], TrainingError, "100 device.s. too short for val_fraction"),
])
def test_unusable_tables_fail_with_a_clear_error(table, features, error, message):
    with pytest.raises(error, match=message):
        fit(table, features, time_col="ts", device_col="device", **FAST)


def test_a_small_table_gets_a_larger_held_out_share_for_calibration():
    bundle = fit(fleet(devices=1, steps=150), ["x", "y"], time_col="ts", device_col="device", val_fraction=0.1,
                 **FAST)
    assert bundle.scorer.n_fit >= 50


def test_too_little_held_out_data_to_calibrate():
    with pytest.raises(TrainingError, match="too little held-out data to calibrate"):
        fit(fleet(devices=1, steps=70), ["x", "y"], time_col="ts", device_col="device", val_fraction=0.1, window=16,
            **FAST)


@pytest.mark.parametrize(("settings", "message"), [
    ({"hidden_size": 0}, "hidden_size=0 must be an integer >= 1"),
    ({"epochs": 2.5}, "epochs=2.5 must be an integer >= 1"),
    ({"val_fraction": 0.95}, "val_fraction=0.95 must be in"),
    ({"learning_rate": float("nan")}, "learning_rate=nan must be > 0"),
    ({"window": 64, "piece_length": 32}, r"piece_length \(32\) must be >= window \(64\)"),
])
def test_bad_training_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**settings)


def test_an_unknown_override_is_named():
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['epochz'\]"):
        fit(fleet(), ["x", "y"], time_col="ts", device_col="device", epochz=3)


def test_the_optimizer_steps_exactly_like_torch_adam():
    """training.Adam exists only to avoid torch.optim's 3 s import; it must not change a single weight."""
    from anomaly.model import LSTMForecaster
    from anomaly.training import Adam

    torch.manual_seed(0)
    ours, theirs = LSTMForecaster(3, 8), LSTMForecaster(3, 8)
    theirs.load_state_dict(ours.state_dict())
    opt_ours = Adam(ours.parameters(), lr=3e-3)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=3e-3)
    x = torch.randn(4, 12, 3)
    for _ in range(25):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            pred, _ = model(x[:, :-1])
            ((pred - x[:, 1:]) ** 2).mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs.state_dict()[key]), key


# ------------------------------------------------------------------------------------------------------ seasonal


def cycles(period: int = 40, steps: int = 300, devices: int = 2, seed: int = 0) -> pd.DataFrame:
    """Devices repeating a skewed cycle of ``period`` readings (a sine and its harmonic) with noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    shape = np.sin(2 * np.pi * t / period) + 0.5 * np.sin(4 * np.pi * t / period)
    return pd.concat([pd.DataFrame({"device": f"dev-{d}", "ts": 1_700_000_000_000 + t * 60_000,
                                    "x": 3 * d + shape + rng.normal(0, 0.1, steps)}) for d in range(devices)],
                     ignore_index=True)


def test_seasonal_training_finds_the_cycle_and_calibrates_its_residuals():
    bundle = fit(cycles(), ["x"], time_col="ts", device_col="device", seasonal=True, **FAST)
    assert bundle.config.seasonal_period == 40 and bundle.seasonal_scorer is not None
    assert bundle.training["seasonal"]["period"] == 40 and bundle.training["seasonal"]["autocorrelation"] > 0.9
    # every reading after each device's first cycle: 2 * (300 - 40)
    assert bundle.seasonal_scorer.n_fit == bundle.training["seasonal"]["residuals"] == 2 * 260
    # the residual of a reading and a 0.5-weighted profile of its noisy past cycles: about sqrt(4/3) noise sds
    assert 0.1 < float(np.sqrt(bundle.seasonal_scorer.reference_var[0])) * bundle.scaler.scale[0] < 0.2
    det = StreamingDetector(bundle.with_config(episode_rule="novelty"))
    assert det.store.season is not None and det.store.season.shape[1:] == (40, 1)


def test_seasonal_training_without_a_cycle_leaves_the_channel_off():
    rng = np.random.default_rng(1)
    walk = pd.DataFrame({"ts": np.arange(400) * 1000, "x": np.cumsum(rng.normal(size=400))})
    bundle = fit(walk, ["x"], time_col="ts", seasonal=True, **FAST)
    assert bundle.config.seasonal_period is None and bundle.seasonal_scorer is None
    assert bundle.training["seasonal"]["period"] is None
    assert fit(cycles(), ["x"], time_col="ts", device_col="device", **FAST).config.seasonal_period is None


@pytest.mark.parametrize(("period", "steps", "expected"), [(40, 300, 40), (40, 59, None), (40, 61, 40), (5, 300, 10)])
def test_dominant_period_needs_one_and_a_half_cycles_and_takes_a_short_one_at_a_multiple(period, steps, expected):
    x = cycles(period=period, steps=steps, devices=1)["x"].to_numpy()[:, None]
    assert dominant_period([x])[0] == expected


def test_dominant_period_prefers_a_longer_cycle_only_when_it_is_clearly_stronger():
    t = np.arange(2000)
    rng = np.random.default_rng(2)
    daily = np.sin(2 * np.pi * t / 24)
    weekend = np.where((t // 24) % 7 >= 5, -1.5, 0.0)  # every 7th and 8th "day" lower: a weekly cycle on top
    assert dominant_period([(daily + rng.normal(0, 0.3, 2000))[:, None]])[0] == 24
    assert dominant_period([(daily + weekend + rng.normal(0, 0.3, 2000))[:, None]])[0] == 168


# ----------------------------------------------------------------------------------------------- context inputs


def test_context_columns_are_model_inputs_that_are_never_forecast_or_scored():
    table = fleet()
    table["mode"] = (np.arange(len(table)) // 50 % 2).astype(float)  # a commanded mode, switching every 50 steps
    bundle = fit(table, ["x"], time_col="ts", device_col="device", context=["mode"], **FAST)
    assert bundle.features == ("x",) and bundle.context == ("mode",) and bundle.inputs == ("x", "mode")
    assert bundle.model.n_inputs == 2 and bundle.scorer.n_features == 1 and len(bundle.scaler.mean) == 1
    assert bundle.context_scaler.mean[0] == pytest.approx(table["mode"].iloc[:225].mean(), abs=0.1)
    assert len(bundle.config.stuck_after) == 1 and bundle.training["context"] == ["mode"]
    res = StreamingDetector(bundle).process(ReadingBatch.from_frame(table, ["x", "mode"], "ts", "device"))
    assert res.counts()["scored"] > 500 and res.expected.shape == (len(table), 1)
    with pytest.raises(DataError, match=r"\['x'\] cannot be both a feature and a context input"):
        fit(table, ["x"], time_col="ts", device_col="device", context=["x"], **FAST)
    with pytest.raises(DataError, match="context must be a list of column names"):
        fit(table, ["x"], time_col="ts", device_col="device", context="mode", **FAST)
