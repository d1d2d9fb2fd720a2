"""ModelBundle: save/load round trips, loading never runs code, corrupt or mismatched bundles fail by name."""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from anomaly.bundle import METADATA_FILE, WEIGHTS_FILE, DetectorConfig, ModelBundle, Scaler
from anomaly.detector import StreamingDetector
from anomaly.errors import BundleError
from anomaly.readings import ReadingBatch
from anomaly.scoring import NormalErrorModel

FEATURES = ("temp", "vibration", "current")


@pytest.fixture
def bundle() -> ModelBundle:
    """A small bundle whose every part differs from the defaults, so a round trip can't pass by accident."""
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    scorer = NormalErrorModel.fit(rng.normal(scale=[0.1, 0.2, 0.3], size=(500, 3)))
    b = ModelBundle.untrained(FEATURES, hidden_size=8, num_layers=2, scorer=scorer, name="pumps", version="3.1")
    with torch.no_grad():
        for p in b.model.parameters():
            p.normal_(0, 0.2)
    b.scaler = Scaler(np.array([50.0, 2.0, 12.0], np.float32), np.array([5.0, 0.5, 3.0], np.float32))
    b.training = {"rows": 1234, "devices": 3, "history": [{"epoch": 1, "val_loss": 0.5}]}
    return b.with_config(threshold=2.5, warmup_steps=4, cooldown=5, gap_policy="carry")


@pytest.fixture
def saved(bundle, tmp_path) -> Path:
    return bundle.save(tmp_path / "model")


def readings(seed: int = 0) -> ReadingBatch:
    rng = np.random.default_rng(seed)
    n = 60
    values = np.array([50.0, 2.0, 12.0]) + rng.normal(size=(n, 3)) * [1.0, 0.1, 0.5]
    return ReadingBatch.from_arrays(np.repeat(["a", "b"], n // 2), np.tile(np.arange(n // 2) * 1000, 2), values)


def edit_metadata(root: Path, change) -> None:
    meta = json.loads((root / METADATA_FILE).read_text())
    change(meta)
    (root / METADATA_FILE).write_text(json.dumps(meta))


def replace_weights(root: Path, data: bytes, update_digest: bool = True) -> None:
    """Overwrite the weights; with ``update_digest`` the metadata's SHA-256 follows, so the loader's
    parser (not only the checksum) must reject the file."""
    (root / WEIGHTS_FILE).write_bytes(data)
    if update_digest:
        edit_metadata(root, lambda m: m.update(weights_sha256=hashlib.sha256(data).hexdigest()))


# -------------------------------------------------------------------------------------------------- round trip


def test_round_trip_restores_every_part(bundle, saved):
    loaded = ModelBundle.load(saved)
    assert (loaded.name, loaded.version, loaded.features) == ("pumps", "3.1", FEATURES)
    assert loaded.config == bundle.config
    assert loaded.training == bundle.training
    assert loaded.created_at == bundle.created_at
    np.testing.assert_array_equal(loaded.scaler.mean, bundle.scaler.mean)
    np.testing.assert_array_equal(loaded.scaler.scale, bundle.scaler.scale)
    for name in ("centre", "precision", "body_d2", "body_cdf"):
        np.testing.assert_allclose(getattr(loaded.scorer, name), getattr(bundle.scorer, name), rtol=1e-6)
    original = bundle.model.state_dict()
    for key, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    assert loaded.model.num_layers == 2 and loaded.model.hidden_size == 8


def test_loaded_bundle_scores_exactly_like_the_original(bundle, saved):
    before = StreamingDetector(bundle).process(readings())
    after = StreamingDetector(ModelBundle.load(saved)).process(readings())
    np.testing.assert_array_equal(after.scores, before.scores)
    np.testing.assert_array_equal(after.expected, before.expected)
    assert [(e.device_id, e.kind, e.ts_ms) for e in after.events] == [
        (e.device_id, e.kind, e.ts_ms) for e in before.events]


def test_saving_again_replaces_the_files_and_leaves_no_temporaries(bundle, saved):
    bundle.with_version("4").save(saved)
    assert sorted(p.name for p in saved.iterdir()) == [METADATA_FILE, WEIGHTS_FILE]
    assert ModelBundle.load(saved).version == "4"


def test_metadata_is_plain_json_with_the_documented_fields(saved):
    meta = json.loads((saved / METADATA_FILE).read_text())
    for key in ("format_version", "name", "version", "features", "hyperparameters", "scaler", "scorer",
                "detector", "training", "weights_sha256"):
        assert key in meta, key
    assert meta["features"] == list(FEATURES)
    assert meta["weights_sha256"] == hashlib.sha256((saved / WEIGHTS_FILE).read_bytes()).hexdigest()


def test_a_bundle_that_cannot_be_written_fails_before_touching_the_directory(bundle, saved):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    broken = replace(bundle.with_version("5"), scorer=replace(bundle.scorer, tail_scale=float("inf")))
    with pytest.raises(BundleError, match=r"scorer.tail_scale \(inf\) is not a finite number"):
        broken.save(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert ModelBundle.load(saved).version == "3.1"


def test_non_finite_numbers_in_the_training_summary_are_saved_as_null(bundle, tmp_path):
    bundle.training = {"best_val_loss": float("inf"), "history": [{"val_loss": float("nan")}]}
    loaded = ModelBundle.load(bundle.save(tmp_path / "m"))
    assert loaded.training == {"best_val_loss": None, "history": [{"val_loss": None}]}


# --------------------------------------------------------------------------------------- loading runs no code


class _Exploit:
    """Unpickling this creates a marker file: proof that the loader executed code from the bundle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("update_digest", [True, False], ids=["digest-updated", "digest-stale"])
def test_a_pickle_renamed_to_weights_fails_cleanly_without_running(saved, tmp_path, update_digest):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"lstm.weight_ih_l0": _Exploit(marker)})
    pickle.loads(pickle.dumps(_Exploit(tmp_path / "control")))  # the payload does work when unpickled ...
    assert (tmp_path / "control").exists()
    replace_weights(saved, payload, update_digest)
    with pytest.raises(BundleError, match=WEIGHTS_FILE):
        ModelBundle.load(saved)
    assert not marker.exists()  # ... but loading a bundle never unpickles


def test_a_torch_save_file_renamed_to_weights_is_rejected(bundle, saved, tmp_path):
    other = tmp_path / "model.pt"
    torch.save(bundle.model.state_dict(), other)
    replace_weights(saved, other.read_bytes())
    with pytest.raises(BundleError, match="cannot read safetensors"):
        ModelBundle.load(saved)


# ------------------------------------------------------------------------------------------- corrupt weights


def test_truncated_weights_fail_with_a_checksum_message(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=r"weights.safetensors: SHA-256 .* does not match"):
        ModelBundle.load(saved)


@pytest.mark.parametrize("keep", [0, 7, 100, -16])
def test_truncated_weights_with_a_matching_digest_fail_in_the_parser(saved, keep):
    data = (saved / WEIGHTS_FILE).read_bytes()
    replace_weights(saved, data[:keep])
    with pytest.raises(BundleError, match="cannot read safetensors"):
        ModelBundle.load(saved)


def _tensors(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in bundle.model.state_dict().items()}


def _write_tensors(root: Path, tensors: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file(tensors, str(path))
    replace_weights(root, path.read_bytes())


def test_weights_of_the_wrong_shape_name_the_tensor_and_both_shapes(bundle, saved, tmp_path):
    tensors = _tensors(bundle)
    tensors["head.weight"] = torch.zeros(3, 16)
    _write_tensors(saved, tensors, tmp_path)
    with pytest.raises(BundleError, match=r"tensor head.weight has shape \[3, 16\], expected \[3, 8\]"):
        ModelBundle.load(saved)


def test_metadata_that_disagrees_with_the_weights_names_the_mismatch(saved):
    edit_metadata(saved, lambda m: m["hyperparameters"].update(hidden_size=16))
    with pytest.raises(BundleError, match=r"has shape .* expected .* hidden 16"):
        ModelBundle.load(saved)


def test_missing_or_extra_tensors_are_listed(bundle, saved, tmp_path):
    tensors = _tensors(bundle)
    del tensors["head.bias"]
    tensors["extra"] = torch.zeros(1)
    _write_tensors(saved, tensors, tmp_path)
    with pytest.raises(BundleError, match="do not match the model's"):
        ModelBundle.load(saved)


def test_non_finite_weights_are_rejected(bundle, saved, tmp_path):
    tensors = _tensors(bundle)
    tensors["head.bias"][1] = float("nan")
    _write_tensors(saved, tensors, tmp_path)
    with pytest.raises(BundleError, match=r"tensor head\.bias has non-finite values"):
        ModelBundle.load(saved)


# -------------------------------------------------------------------------------------------- bad metadata


def test_missing_directory_and_files_are_named(saved, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        ModelBundle.load(tmp_path / "nowhere")
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(BundleError, match=f"has no {WEIGHTS_FILE}"):
        ModelBundle.load(saved)
    (saved / METADATA_FILE).unlink()
    with pytest.raises(BundleError, match=f"has no {METADATA_FILE}"):
        ModelBundle.load(saved)


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ("\xff\xfe", "not valid JSON"),
])
def test_unreadable_metadata_is_named(saved, text, message):
    (saved / METADATA_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(BundleError, match=message):
        ModelBundle.load(saved)


def _set(path: str, value):
    def change(meta):
        *parents, leaf = path.split(".")
        node = meta
        for p in parents:
            node = node[p]
        node[leaf] = value
    return change


def _delete(key: str):
    return lambda meta: meta.pop(key)


@pytest.mark.parametrize(("change", "message"), [
    (_set("format_version", 3), "unsupported format_version 3"),
    (_set("format_version", "1"), "unsupported format_version '1'"),
    (_set("format_version", True), "unsupported format_version True"),
    (_delete("format_version"), "unsupported format_version None"),
    (_set("features", "temp,vibration,current"), "'features' must be a list of strings"),
    (_set("features", ["temp", 1, "current"]), "'features' must be a list of strings"),
    (_set("features", ["temp", "vibration"]), r"scaler has .* expected 2"),
    (_set("features", ["temp", "temp", "current"]), "features must be distinct"),
    (_set("hyperparameters.hidden_size", "8"), "hyperparameters out of range"),
    (_set("hyperparameters.hidden_size", 0), "hyperparameters out of range"),
    (_set("hyperparameters.num_layers", 10**6), "hyperparameters out of range"),
    (_delete("hyperparameters"), "invalid field: 'hyperparameters'"),
    (_set("scaler.scale", [1.0, -1.0, 1.0]), "scale > 0"),
    (_set("scaler.mean", [1.0, 2.0]), r"scaler has \(2,\)"),
    (_set("scaler.mean", ["a", "b", "c"]), "invalid field"),
    (_set("scorer.centre", [0.0, 0.0]), r"scorer.centre: expected 3 values"),
    (_set("scorer.precision", [[1.0]]), r"scorer.precision: expected \[3, 3\]"),
    (_set("scorer.tail_scale", -1.0), "tail_scale > 0"),
    (_set("scorer.body_d2", [3.0, 2.0, 1.0]), "body_d2/body_cdf"),
    (_delete("scorer"), "invalid field: 'scorer'"),
    (_set("detector.threshold", -1.0), "detector setting threshold=-1.0"),
    (_set("detector.warmup_steps", "10"), "detector setting warmup_steps='10'"),
    (_set("detector.gap_policy", "explode"), "detector setting gap_policy='explode'"),
    (_set("detector.surprise", 1), "surprise"),
])
def test_bad_metadata_fields_fail_with_a_message_naming_them(saved, change, message):
    edit_metadata(saved, change)
    with pytest.raises(BundleError, match=message) as info:
        ModelBundle.load(saved)
    assert "\n" not in str(info.value)


def test_nan_in_metadata_is_rejected(saved):
    text = (saved / METADATA_FILE).read_text()
    meta = json.loads(text)
    meta["scaler"]["mean"][0] = float("nan")  # json.dumps writes the non-standard NaN literal
    (saved / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="scaler values must be finite"):
        ModelBundle.load(saved)


# ----------------------------------------------------------------------------------------- construction


def test_parts_that_disagree_on_the_features_cannot_make_a_bundle(bundle):
    with pytest.raises(BundleError, match="scaler expects 2 features"):
        ModelBundle(name="x", version="1", features=FEATURES,
                    scaler=Scaler(np.zeros(2, np.float32), np.ones(2, np.float32)),
                    model=bundle.model, scorer=bundle.scorer)
    with pytest.raises(BundleError, match="distinct non-empty strings"):
        ModelBundle.untrained(["a", ""])


def test_detector_settings_are_validated_by_name():
    with pytest.raises(ValueError, match=r"detector setting exit_ratio=0\.0"):
        DetectorConfig(exit_ratio=0.0)
    with pytest.raises(ValueError, match="detector setting smoothing_alpha=2"):
        DetectorConfig(smoothing_alpha=2)


@pytest.mark.parametrize(("setting", "value"), [
    ("episode_rule", "magic"), ("novelty_alphas", ()), ("novelty_alphas", (0.3, 0.0)), ("novelty_tolerance", 0.0),
    ("novelty_half_life", -1.0), ("novelty_refractory", -1), ("novelty_learn_readings", 1.5),
    ("novelty_value_range", "yes")])
def test_novelty_settings_are_validated_by_name(setting, value):
    with pytest.raises(ValueError, match=f"detector setting {setting}="):
        DetectorConfig(**{setting: value})


def test_novelty_settings_round_trip_through_json_and_score_the_same(bundle, tmp_path):
    novelty = bundle.with_config(episode_rule="novelty", novelty_alphas=[0.5, 0.2, 0.05], novelty_refractory=7,
                                 novelty_learn_readings=4)
    assert novelty.config.novelty_alphas == (0.5, 0.2, 0.05)  # a JSON list becomes a tuple
    loaded = ModelBundle.load(novelty.save(tmp_path / "novelty"))
    assert loaded.config == novelty.config and loaded.config.novelty.alphas == (0.5, 0.2, 0.05)
    rng = np.random.default_rng(3)
    batch = ReadingBatch.from_arrays(["d"] * 60, np.arange(60) * 1000, rng.normal(size=(60, len(FEATURES))))
    a, b = StreamingDetector(novelty).process(batch), StreamingDetector(loaded).process(batch)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.alerts, b.alerts)


def test_a_bundle_without_novelty_settings_loads_with_the_threshold_rule(saved):
    def drop(meta):
        for key in [k for k in meta["detector"] if k.startswith("novelty_") or k == "episode_rule"]:
            del meta["detector"][key]
    edit_metadata(saved, drop)
    assert ModelBundle.load(saved).config.episode_rule == "threshold"


@pytest.mark.parametrize(("setting", "value"), [
    ("seasonal_period", 1), ("seasonal_period", 10**6), ("seasonal_period", 24.0), ("seasonal_alpha", 0.0),
    ("seasonal_alpha", 1.5), ("seasonal_explains", 1), ("seasonal_explains", "false")])
def test_seasonal_settings_are_validated_by_name(setting, value):
    with pytest.raises(ValueError, match=f"detector setting {setting}="):
        DetectorConfig(**{setting: value})


def seasonal(bundle: ModelBundle) -> ModelBundle:
    scorer = NormalErrorModel.fit(np.random.default_rng(4).normal(scale=[0.2, 0.3, 0.4], size=(500, 3)))
    return replace(bundle, seasonal_scorer=scorer).with_config(episode_rule="novelty", seasonal_period=6)


def test_seasonal_scorer_round_trips_and_scores_the_same(bundle, tmp_path):
    with_season = seasonal(bundle)
    loaded = ModelBundle.load(with_season.save(tmp_path / "seasonal"))
    assert loaded.config == with_season.config and loaded.config.seasonal_period == 6
    assert loaded.seasonal_scorer is not None
    np.testing.assert_array_equal(loaded.seasonal_scorer.precision, with_season.seasonal_scorer.precision)
    a, b = StreamingDetector(with_season).process(readings()), StreamingDetector(loaded).process(readings())
    np.testing.assert_array_equal(a.novelty, b.novelty)
    assert ModelBundle.load(bundle.save(tmp_path / "plain")).seasonal_scorer is None


def test_a_seasonal_period_needs_a_seasonal_scorer_of_the_bundles_features(bundle, tmp_path):
    with pytest.raises(BundleError, match="seasonal_period=6 needs a seasonal_scorer"):
        bundle.with_config(seasonal_period=6)
    with pytest.raises(BundleError, match="seasonal_scorer expects 2 features"):
        replace(bundle, seasonal_scorer=NormalErrorModel.fit(np.random.default_rng(0).normal(size=(100, 2))))
    saved = seasonal(bundle).save(tmp_path / "seasonal")
    edit_metadata(saved, lambda m: m.update(seasonal_scorer=None))
    with pytest.raises(BundleError, match="needs a seasonal_scorer"):
        ModelBundle.load(saved)
    edit_metadata(saved, lambda m: m.update(seasonal_scorer={"centre": [0.0]}))
    with pytest.raises(BundleError, match="invalid seasonal_scorer"):
        ModelBundle.load(saved)


# ------------------------------------------------------------------------------------ context inputs


def test_a_bundle_with_context_survives_save_and_load_and_scores_the_same(tmp_path):
    torch.manual_seed(4)
    b = ModelBundle.untrained(("temp",), hidden_size=8, context=("valve", "mode"), name="pumps", version="2")
    with torch.no_grad():
        for p in b.model.parameters():
            p.normal_(0, 0.2)
    b = replace(b, context_scaler=Scaler(np.array([0.5, 2.0], np.float32), np.array([0.5, 1.0], np.float32)))
    loaded = ModelBundle.load(b.save(tmp_path / "m"))
    meta = json.loads((tmp_path / "m" / METADATA_FILE).read_text())
    assert meta["format_version"] == 2 and meta["context"] == ["valve", "mode"]
    assert loaded.context == ("valve", "mode") and loaded.inputs == ("temp", "valve", "mode")
    np.testing.assert_array_equal(loaded.context_scaler.mean, [0.5, 2.0])
    rng = np.random.default_rng(0)
    batch = ReadingBatch.from_arrays(["a"] * 30, np.arange(30) * 1000, rng.normal(size=(30, 3)))
    np.testing.assert_array_equal(StreamingDetector(b).process(batch).scores,
                                  StreamingDetector(loaded).process(batch).scores)


def test_a_bundle_without_context_is_still_written_as_format_1(saved):
    meta = json.loads((saved / METADATA_FILE).read_text())
    assert meta["format_version"] == 1 and "context" not in meta and ModelBundle.load(saved).context == ()


def test_context_fields_are_checked(saved, tmp_path):
    edit_metadata(saved, lambda m: m.update(context=["valve"], context_scaler={"mean": [0.0], "scale": [1.0]}))
    with pytest.raises(BundleError, match="format_version 1 cannot carry context"):
        ModelBundle.load(saved)
    with_context = ModelBundle.untrained(("temp",), hidden_size=4, context=("valve",)).save(tmp_path / "c")
    edit_metadata(with_context, lambda m: m.update(context_scaler={"mean": [0.0, 1.0], "scale": [1.0, 1.0]}))
    with pytest.raises(BundleError, match="context_scaler has"):
        ModelBundle.load(with_context)
    with pytest.raises(BundleError, match="not features"):
        ModelBundle.untrained(("temp",), hidden_size=4, context=("temp",))
