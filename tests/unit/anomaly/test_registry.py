"""Model registry: publish, list, atomic pointer switch, validation of candidates (load, version, schema, sanity)."""

from __future__ import annotations

import json
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly.bundle import METADATA_FILE, WEIGHTS_FILE, ModelBundle
from anomaly.readings import ReadingBatch
from anomaly.registry import (
    LIVE_FILE,
    ModelRegistry,
    ModelValidationError,
    RegistryError,
    load_model_dir,
    sanity_check,
    version_key,
)

FEATURES = ("temp", "vibration", "current")


def small(features=FEATURES, seed: int = 0, name: str = "pumps") -> ModelBundle:
    torch.manual_seed(seed)
    return ModelBundle.untrained(features, hidden_size=8, name=name).with_config(warmup_steps=3)


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models", create=True)


def test_publish_assigns_increasing_versions_and_writes_loadable_bundles(registry):
    assert registry.versions() == [] and registry.live_version() is None and registry.next_version() == "1"
    first = registry.publish(small(seed=1))
    second = registry.publish(small(seed=2))
    assert (first, second) == ("1", "2")
    assert registry.versions() == ["1", "2"]
    loaded = registry.load("2")
    assert loaded.version == "2" and loaded.name == "pumps" and loaded.features == FEATURES
    torch.testing.assert_close(loaded.model.state_dict()["lstm.weight_ih_l0"],
                               small(seed=2).model.state_dict()["lstm.weight_ih_l0"])
    assert registry.live_version() is None, "publishing alone must not change what is live"


def test_publish_does_not_change_the_callers_bundle_and_refuses_an_existing_version(registry):
    bundle = small()
    bundle.version = "0.9"
    registry.publish(bundle, "3")
    assert bundle.version == "0.9"
    with pytest.raises(RegistryError, match="version 3 is already published"):
        registry.publish(small(), "3")


@pytest.mark.parametrize("versions, expected", [(["9", "10"], "11"), (["1.9"], "1.10"), (["v2-rc"], "v2-rc.1")])
def test_next_version_bumps_the_highest(registry, versions, expected):
    for v in versions:
        registry.publish(small(), v)
    assert registry.next_version() == expected


def test_version_order_is_numeric_where_parts_are_numbers():
    assert sorted(["10", "2", "1.10", "1.2"], key=version_key) == ["1.2", "1.10", "2", "10"]


@pytest.mark.parametrize("bad", ["", "../x", "a b", ".hidden", "x" * 65])
def test_invalid_version_names_are_refused(registry, bad):
    with pytest.raises(RegistryError, match="is not valid"):
        registry.publish(small(), bad)


def test_set_live_switches_the_pointer_and_keeps_a_history(registry):
    registry.publish(small(seed=1), live=True)
    registry.publish(small(seed=2))
    assert registry.live_version() == "1"
    assert registry.set_live("2", reason="better FAR") == "1"
    assert registry.live_version() == "2"
    assert registry.load_live().version == "2"
    assert [(h["from"], h["to"], h["reason"]) for h in registry.history()] == [
        (None, "1", "published live"), ("1", "2", "better FAR")]
    assert (registry.root / LIVE_FILE).read_text() == "2\n"
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_pointer_is_never_torn_while_switching(registry):
    """Readers racing with many switches see a whole version every time (os.replace is atomic)."""
    for v in ("1", "2"):
        registry.publish(small(), v)
    registry.set_live("1", validate=False)
    seen: set[str | None] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(registry.live_version())

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(60):
        registry.set_live("2" if i % 2 else "1", validate=False)
    stop.set()
    reader.join()
    assert seen <= {"1", "2"} and seen


def test_staging_directories_are_not_versions(registry):
    registry.publish(small())
    (registry.root / "versions" / ".staging-abc").mkdir()
    assert registry.versions() == ["1"]


def test_set_live_refuses_a_model_over_other_features(registry):
    registry.publish(small(), live=True)
    registry.publish(small(features=("temp", "current", "vibration")))
    with pytest.raises(ModelValidationError, match=r"feature schema of version 2 .*same names in another order"):
        registry.set_live("2")
    assert registry.live_version() == "1"
    registry.publish(small(features=("temp", "vibration")))
    with pytest.raises(ModelValidationError, match=r"missing \['current'\], extra \[\]"):
        registry.validate("3")


def test_publish_live_validates_against_the_live_schema_before_switching(registry):
    registry.publish(small(), live=True)
    with pytest.raises(ModelValidationError, match="feature schema"):
        registry.publish(small(features=("a", "b", "c")), live=True)
    assert registry.live_version() == "1"
    assert registry.versions() == ["1", "2"], "the version is published, just not made live"


def test_validate_reports_what_it_checked(registry):
    registry.publish(small(), live=True)
    registry.publish(small(seed=4))
    report = registry.validate("2")
    assert report.version == "2" and report.features == FEATURES
    assert report.scored == 4 * 16 and 0.0 <= report.max_score <= 1.0


def test_a_bundle_with_non_finite_weights_fails_the_sanity_check(registry):
    bad = small()
    with torch.no_grad():
        bad.model.head.weight.fill_(float("nan"))
    with pytest.raises(ModelValidationError, match=r"forecasts non-finite values for 64 of 64 scored probe"):
        sanity_check(bad)
    with pytest.raises(ModelValidationError, match=r"cannot be published: .* non-finite values"):
        registry.publish(bad)  # ModelBundle.load refuses such weights already
    assert registry.versions() == [], "a bundle that fails validation is not published"
    assert not list((registry.root / "versions").iterdir()), "staging directory left behind"


def test_sanity_check_takes_real_probe_readings():
    bundle = small(features=("x",))
    probe = ReadingBatch.from_arrays(["a"] * 5, np.arange(5) * 1000 + 1_704_067_200_000, [[0.1]] * 5)
    assert sanity_check(bundle, probe) == (2, pytest.approx(sanity_check(bundle, probe)[1]))
    with pytest.raises(ModelValidationError, match="scored none of 2 probe readings"):
        sanity_check(bundle, ReadingBatch.from_arrays(["a", "b"], [1_704_067_200_000] * 2, [[0.0], [0.0]]))


def test_corrupt_bundle_is_rejected_by_name(registry):
    registry.publish(small(), live=True)
    registry.publish(small(seed=3))
    weights = registry.path_of("2") / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelValidationError, match=r"version 2 does not load: .*SHA-256"):
        registry.validate("2")
    with pytest.raises(ModelValidationError, match="does not load"):
        registry.set_live("2")
    assert registry.live_version() == "1"


def test_a_pickle_dropped_in_as_weights_is_never_executed(registry, tmp_path):
    registry.publish(small(), live=True)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    target = registry.root / "versions" / "2"
    target.mkdir()
    (target / WEIGHTS_FILE).write_bytes(pickle.dumps(Exploit()))
    meta = small().with_version("2").metadata()
    meta.pop("weights_sha256", None)
    (target / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelValidationError, match="version 2 does not load"):
        registry.validate("2")
    assert not marker.exists()


def test_a_copied_directory_with_another_version_inside_is_rejected(registry):
    registry.publish(small(), live=True)
    small().with_version("7").save(registry.root / "versions" / "2")
    with pytest.raises(ModelValidationError, match=r"says version '7' but lies in versions/2"):
        registry.load("2")


def test_unknown_version_and_missing_pointer_are_named(registry):
    with pytest.raises(RegistryError, match=r"version '4' is not in .* \(published: \[\]\)"):
        registry.load("4")
    with pytest.raises(RegistryError, match="has no live version"):
        registry.load_live()
    (registry.root / LIVE_FILE).write_text("not a version!\n")
    with pytest.raises(RegistryError, match="does not name a valid version"):
        registry.live_version()


def test_a_plain_directory_is_not_a_registry(tmp_path):
    with pytest.raises(RegistryError, match="is not a model registry"):
        ModelRegistry(tmp_path / "nothing")


def test_load_model_dir_takes_a_registry_or_a_single_bundle(registry, tmp_path):
    registry.publish(small(), live=True)
    registry.publish(small(seed=2), live=True)
    bundle, reg = load_model_dir(registry.root)
    assert bundle.version == "2" and isinstance(reg, ModelRegistry)
    single = small().with_version("5").save(tmp_path / "single")
    bundle, reg = load_model_dir(single)
    assert bundle.version == "5" and reg is None


def test_registry_layout_on_disk(registry):
    registry.publish(small(), live=True)
    names = sorted(str(p.relative_to(registry.root)) for p in registry.root.rglob("*"))
    assert names == ["LIVE", "history.jsonl", "versions", "versions/1", f"versions/1/{METADATA_FILE}",
                     f"versions/1/{WEIGHTS_FILE}"]
    assert Path(registry.root / "LIVE").read_text().strip() == "1"


def test_a_broken_live_version_does_not_block_switching_to_a_good_one(registry, caplog):
    registry.publish(small(), live=True)
    (registry.path_of("1") / METADATA_FILE).write_text("{}")
    registry.publish(small(seed=2), live=True)
    assert registry.live_version() == "2"
    assert "live model cannot be loaded, so version 2 is not compared with its schema" in caplog.text
