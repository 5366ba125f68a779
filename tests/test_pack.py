"""Packs and detector specs are validated at load, with errors that name the file and field."""

import json
from pathlib import Path

import pytest

from conftest import make_pack
from featurewatch.detector import DetectorSpec
from featurewatch.errors import ConfigError, FeatureOutOfRange
from featurewatch.pack import list_packs, load_pack, load_spec


def spec(**kw: object) -> dict:
    base = {"name": "demo", "description": "d", "kind": "sae", "hookpoint": "layers.3",
            "features": [{"id": 1, "weight": 1.0}], "threshold": 0.5}
    base.update(kw)
    return base


def test_a_valid_pack_loads_with_its_detectors(tmp_path: Path) -> None:
    pack = load_pack(make_pack(tmp_path / "p"))
    assert pack.name == "test-pack"
    assert list(pack.saes) == ["layers.3"] and pack.saes["layers.3"].d_sae == 64
    assert [d.name for d in pack.select(None)] == ["demo"]
    with pytest.raises(ConfigError, match="valid: demo"):
        pack.select(["nope"])


@pytest.mark.parametrize("override, message", [
    ({"features": [{"id": 64, "weight": 1.0}]}, "feature 64 is out of range.*0 … 63"),
    ({"hookpoint": "layers.9"}, "layers.9.*no SAE.*valid: layers.3"),
    ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
    ({"threshold": float("nan")}, "threshold"),
    ({"features": []}, "at least one entry"),
    ({"kind": "probe"}, "probe_weights"),
    ({"name": "Bad Name"}, "name"),
    ({"phases": ["prompt", "prompt"]}, "repeat"),
])
def test_bad_specs_fail_at_load_naming_file_and_field(tmp_path: Path, override: dict, message: str) -> None:
    root = make_pack(tmp_path / "p", detectors=[spec(**override)])
    with pytest.raises((ConfigError, FeatureOutOfRange), match=message) as info:
        load_pack(root)
    assert ".json" in str(info.value)


def test_invalid_json_in_a_spec_names_the_file(tmp_path: Path) -> None:
    root = make_pack(tmp_path / "p")
    (root / "demo.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"demo\.json: invalid JSON"):
        load_spec(root / "demo.json")


def test_unknown_pack_lists_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shipped packs"):
        load_pack(tmp_path / "nowhere")


def test_spec_round_trips_through_json(tmp_path: Path) -> None:
    root = make_pack(tmp_path / "p")
    s = load_spec(root / "demo.json")
    s.save(tmp_path / "copy.json")
    assert load_spec(tmp_path / "copy.json") == s
    assert json.loads((tmp_path / "copy.json").read_text())["name"] == "demo"


def test_the_default_pack_ships_as_package_data() -> None:
    assert "smollm2-135m-instruct" in list_packs()
    pack = load_pack()
    assert pack.manifest.model == "SmolLM2-135M-Instruct"
    assert pack.select(None) and all(d.calibration is not None for d in pack.select(None))


# --- confinement (issue 7): a pack names files inside itself only, and only regular files are opened ---

def _probe_spec(probe_weights: str) -> dict:
    return spec(kind="probe", features=[], probe_weights=probe_weights)


@pytest.mark.parametrize("where", ["../../outside.safetensors", "/etc/passwd"])
def test_probe_paths_outside_the_pack_are_refused(tmp_path: Path, where: str) -> None:
    root = make_pack(tmp_path / "p", detectors=[_probe_spec(where)])
    with pytest.raises(ConfigError, match="outside the pack|absolute path") as info:
        load_pack(root)
    assert where in str(info.value) and "copy the file into the pack" in str(info.value)


def test_a_hookpoint_directory_outside_the_pack_is_refused(tmp_path: Path) -> None:
    root = make_pack(tmp_path / "p")
    other = make_pack(tmp_path / "other")
    manifest = json.loads((root / "pack.json").read_text())
    manifest["hookpoints"] = {"layers.3": "../other/sae/layers.3"}
    (root / "pack.json").write_text(json.dumps(manifest))
    assert (other / "sae" / "layers.3").is_dir()
    with pytest.raises(ConfigError, match=r"hookpoints\['layers.3'\].*outside the pack"):
        load_pack(root)


def test_a_symlink_leaving_the_pack_is_refused(tmp_path: Path) -> None:
    root = make_pack(tmp_path / "p")
    (tmp_path / "elsewhere.json").write_text(json.dumps(spec(name="sneaky")))
    (root / "sneaky.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ConfigError, match="sneaky.json is a link to .*outside the pack"):
        load_pack(root)


def test_a_fifo_in_the_pack_is_refused_instead_of_hanging(tmp_path: Path) -> None:
    import os

    root = make_pack(tmp_path / "p", detectors=[_probe_spec("probes/demo.safetensors")])
    (root / "probes").mkdir()
    os.mkfifo(root / "probes" / "demo.safetensors")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_pack(root)  # reading the FIFO would block forever
    os.unlink(root / "probes" / "demo.safetensors")
    os.mkfifo(root / "extra.json")
    with pytest.raises(ConfigError, match="extra.json is not a regular file"):
        load_pack(root)


def test_the_shipped_pack_still_loads() -> None:
    assert "scam-email" in load_pack().detectors


def test_the_default_pack_ships_a_16k_safety_dense_sae_within_its_quality_targets_and_size() -> None:
    """The safety-dense SAE (issue 16) is the default pack's, whole, with its report and calibrated detectors."""
    pack = load_pack()
    sae = pack.saes["layers.15"]
    assert (sae.d_in, sae.d_sae) == (576, 16384)
    report = json.loads((pack.path / "sae" / "layers.15" / "report.json").read_text())
    chat = report["per_corpus"]["chat_train"]  # held-out ordinary chat: the targets the 4,608-feature SAE met
    assert chat["fvu"] <= 0.20 and chat["ce_increase"] <= 0.30 and chat["dead_fraction"] <= 0.05
    assert 20 <= chat["l0"] <= 80 and report["trained_tokens"] >= 4_000_000
    assert set(report["per_corpus"]) == {"safety_mix", "chat_train"}
    assert all(d.calibration is not None and d.hookpoint == "layers.15" for d in pack.select(None))
    size = sum(f.stat().st_size for f in pack.path.rglob("*") if f.is_file())
    sae_size = sum(f.stat().st_size for f in (pack.path / "sae").rglob("*") if f.is_file())
    assert size <= 50e6 and sae_size <= 40e6, (size, sae_size)
    used = {f.id for d in pack.detectors.values() if d.kind == "sae" for f in d.features}
    cited = {f.id for d in pack.detectors.values() for f in d.evidence_features}  # a dense detector's evidence
    contexts = {i: len(info.top_contexts) for i, info in pack.features["layers.15"].items()}
    assert max(contexts[i] for i in set(contexts) - used - cited) <= 2  # fewer contexts for the rest
    assert min(contexts[i] for i in used) >= 3  # the detector features keep what a person checks labels against
    assert all(pack.features["layers.15"][i].label for i in used)  # every feature a detector reads is labelled


def test_an_sae_detector_reads_at_most_128_features() -> None:
    ok = spec(features=[{"id": i, "weight": 1.0} for i in range(128)])
    DetectorSpec.model_validate(ok)
    with pytest.raises(ValueError, match="at most 128 features, got 129"):
        DetectorSpec.model_validate(spec(features=[{"id": i, "weight": 1.0} for i in range(129)]))
