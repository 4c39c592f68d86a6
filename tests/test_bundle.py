import json
import os

import numpy as np
import pytest

from csakd_qgis.synthetic import signature_mixture
from tests.helpers import randomise_head
import torch

from csakd_qgis import bundle as bundle_module
from csakd_qgis.bundle import BundleError, load_bundle, save_bundle
from csakd_qgis.degradation import blur_and_decimate
from csakd_qgis.model import FusionModelConfig, SceneStatistics, SubspaceFusionModel
from csakd_qgis.network import NetworkConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    network = NetworkConfig(4, 4, width=8, growth=4, blocks=(1, 1, 1, 1), attention_dim=8, heads=2, unshuffle=2)
    return randomise_head(SubspaceFusionModel(FusionModelConfig(network, subspace_dim=4)), seed).eval()


@pytest.fixture
def saved(tmp_path):
    model = tiny_model()
    card_path = save_bundle(tmp_path / "tiny.json", model, {"name": "tiny", "parameters": 123})
    return model, card_path


def _run(model, seed=0):
    rng = np.random.default_rng(seed)
    lr = signature_mixture(rng, 7, 4, 6, 6).astype(np.float32)
    hr = rng.random((3, 24, 24)).astype(np.float32)
    stats = SceneStatistics.estimate(lr, blur_and_decimate(hr, 4), 4).to_tensors()
    with torch.no_grad():
        return model(torch.from_numpy(lr)[None], torch.from_numpy(hr)[None], stats).image


def test_round_trip_gives_identical_outputs(saved):
    model, card_path = saved
    assert card_path.name == "tiny.json" and card_path.with_suffix(".pt").exists()
    loaded, card = load_bundle(card_path)
    assert not loaded.training
    assert card["name"] == "tiny" and card["parameters"] == 123
    assert loaded.config == model.config
    torch.testing.assert_close(_run(loaded), _run(model), rtol=0, atol=0)
    # The weights path finds the same bundle.
    again, _ = load_bundle(card_path.with_suffix(".pt"))
    torch.testing.assert_close(_run(again), _run(model), rtol=0, atol=0)


def test_a_differently_seeded_model_differs(saved):
    # Guards the round-trip test: two random models do not agree by accident.
    model, _ = saved
    assert not torch.equal(_run(model), _run(tiny_model(seed=1)))


def test_missing_card(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nothing.json")


def test_card_that_is_not_json(saved):
    _, card_path = saved
    card_path.write_text('{"format": "csakd-model-bundle", "config": ')
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(card_path)


def test_missing_weights(saved):
    _, card_path = saved
    card_path.with_suffix(".pt").unlink()
    with pytest.raises(BundleError, match=r"weights file .*tiny\.pt .*not found"):
        load_bundle(card_path)


def test_truncated_weights(saved):
    _, card_path = saved
    weights = card_path.with_suffix(".pt")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(card_path)


def test_card_config_that_does_not_fit_the_weights(saved):
    _, card_path = saved
    card = json.loads(card_path.read_text())
    card["config"]["network"]["width"] = 12
    card_path.write_text(json.dumps(card))
    with pytest.raises(BundleError, match="cannot be loaded into the model its card describes"):
        load_bundle(card_path)


def test_card_config_that_cannot_build_a_model(saved):
    _, card_path = saved
    card = json.loads(card_path.read_text())
    card["config"]["network"]["colour"] = "red"
    card_path.write_text(json.dumps(card))
    with pytest.raises(BundleError, match="unusable config.*colour"):
        load_bundle(card_path)


def test_json_that_is_not_a_csakd_card(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(BundleError, match="not a CSAKD model card"):
        load_bundle(path)


def test_card_from_a_newer_plugin(saved):
    _, card_path = saved
    card = json.loads(card_path.read_text())
    card["format_version"] = bundle_module.BUNDLE_VERSION + 1
    card_path.write_text(json.dumps(card))
    with pytest.raises(BundleError, match="newer plugin"):
        load_bundle(card_path)


def test_save_leaves_only_the_two_bundle_files(saved):
    _, card_path = saved
    assert sorted(p.name for p in card_path.parent.iterdir()) == ["tiny.json", "tiny.pt"]


def test_failed_save_keeps_the_previous_bundle_and_no_temporary_file(saved, monkeypatch):
    model, card_path = saved
    folder = card_path.parent

    def half_written(state, path):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module.torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(card_path, tiny_model(seed=5), {"name": "replacement"})
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["tiny.json", "tiny.pt"]
    loaded, card = load_bundle(card_path)
    assert card["name"] == "tiny"
    torch.testing.assert_close(_run(loaded), _run(model), rtol=0, atol=0)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_saved_files_have_ordinary_permissions(saved):
    # A bundle is meant to be shared: it must get the mode any new file gets (0666 minus
    # the umask), not the owner-only 0600 of a temporary file.
    _, card_path = saved
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    for path in (card_path, card_path.with_suffix(".pt")):
        assert oct(path.stat().st_mode & 0o777) == oct(expected), path.name
