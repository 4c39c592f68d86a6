"""csakd:hyperspectralfusion on bad input: each case fails with a QgsProcessingException whose
message says what is wrong, and leaves nothing (no output, no temporary file) behind."""

import json
import shutil

import numpy as np
import pytest
import rasterio
from affine import Affine
from qgis.core import QgsProcessingException

from csakd_qgis.transforms import compose
from tests.helpers import expect_refusal


@pytest.fixture
def out_dir(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def assert_fails(run_fusion, out_dir, *fragments, **parameters):
    """Run, expect a QgsProcessingException naming every fragment, and an empty output folder."""
    parameters.setdefault("OUTPUT", str(out_dir / "fused.tif"))
    message = expect_refusal(run_fusion, *fragments, **parameters)
    assert sorted(p.name for p in out_dir.iterdir()) == []
    return message


def copy_raster(source, destination, transform=None, crs="keep", bands=None):
    """A GeoTIFF copy of ``source`` (optionally moved, without CRS, or with fewer bands)."""
    with rasterio.open(source) as src:
        indexes = bands or list(range(1, src.count + 1))
        profile = dict(src.profile, driver="GTiff", count=len(indexes))
        if transform is not None:
            profile["transform"] = transform
        if crs is None:
            profile.pop("crs", None)
        with rasterio.open(destination, "w", **profile) as dst:
            dst.write(src.read(indexes))
            for out_index, index in enumerate(indexes, start=1):
                dst.update_tags(out_index, **src.tags(index))
    return destination


def test_footprints_that_do_not_overlap(potsdam_wald_pair, run_fusion, out_dir, tmp_path):
    pair = potsdam_wald_pair
    with rasterio.open(pair.lr_path) as src:
        far_away = compose(Affine.translation(50_000, 0), src.transform)
    moved = copy_raster(pair.lr_path, tmp_path / "lr_far_away.tif", transform=far_away)
    assert_fails(run_fusion, out_dir, "do not overlap", LRHSI=str(moved), HRMSI=str(pair.hr_path))


def test_layer_without_crs(potsdam_wald_pair, run_fusion, out_dir, tmp_path):
    pair = potsdam_wald_pair
    without_crs = copy_raster(pair.lr_path, tmp_path / "lr_no_crs.tif", crs=None)
    with rasterio.open(without_crs) as ds:
        assert ds.crs is None
    assert_fails(run_fusion, out_dir, "no coordinate reference system", "hyperspectral",
                 LRHSI=str(without_crs), HRMSI=str(pair.hr_path))


def test_msi_coarser_than_hsi_means_swapped_inputs(potsdam_wald_pair, run_fusion, out_dir):
    pair = potsdam_wald_pair
    message = assert_fails(run_fusion, out_dir, "not sharper",
                           LRHSI=str(pair.hr_path), HRMSI=str(pair.lr_path))
    assert "HRMSI" in message and "LRHSI" in message


def test_too_few_hyperspectral_bands(potsdam_wald_pair, run_fusion, out_dir, tmp_path):
    pair = potsdam_wald_pair
    three_bands = copy_raster(pair.lr_path, tmp_path / "lr_3_bands.tif", bands=[20, 40, 60])
    assert_fails(run_fusion, out_dir, "3 band(s)", "at least 4", LRHSI=str(three_bands), HRMSI=str(pair.hr_path))


def _damaged_bundle(kind, fusion_model, folder):
    card = folder / "damaged.json"
    if kind == "truncated weights":
        shutil.copy(fusion_model, card)
        weights = fusion_model.with_name(json.loads(fusion_model.read_text())["weights_file"])
        data = weights.read_bytes()
        (folder / weights.name).write_bytes(data[: len(data) // 2])
        return card, ("truncated",)
    if kind == "not a model card":
        card.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
        return card, ("not a CSAKD model card",)
    card.write_bytes(b"\x00\xffnot json at all")
    return card, ("not valid JSON", "damaged")


@pytest.mark.parametrize("kind", ["truncated weights", "not a model card", "not JSON"])
def test_incompatible_model_bundle(kind, potsdam_wald_pair, run_fusion, out_dir, tmp_path, fusion_model):
    card, fragments = _damaged_bundle(kind, fusion_model, tmp_path)
    pair = potsdam_wald_pair
    assert_fails(run_fusion, out_dir, *fragments, LRHSI=str(pair.lr_path), HRMSI=str(pair.hr_path), MODEL=str(card))


def test_unreadable_file(potsdam_wald_pair, run_fusion, out_dir, tmp_path):
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    # Refused in the parameter check, before the algorithm runs (QGIS alone would call the
    # existing file "not found").
    assert_fails(run_fusion, out_dir, "LRHSI", "cannot be read", "not recognise it as a raster",
                 LRHSI=str(garbage), HRMSI=str(potsdam_wald_pair.hr_path))
    assert_fails(run_fusion, out_dir, "HRMSI", "cannot be read",
                 LRHSI=str(potsdam_wald_pair.lr_path), HRMSI=str(garbage))


def test_unwritable_output_path(potsdam_wald_pair, run_fusion, tmp_path):
    # Root ignores permissions, so the output's "folder" is a regular file instead.
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file\n")
    pair = potsdam_wald_pair
    with pytest.raises(QgsProcessingException) as caught:
        run_fusion(LRHSI=str(pair.lr_path), HRMSI=str(pair.hr_path), OUTPUT=str(blocker / "fused.tif"))
    message = str(caught.value)
    assert "cannot write" in message and "not_a_folder" in message, message
    assert blocker.read_text() == "a file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


def test_cancel_after_the_first_progress_update(potsdam_wald_pair, run_fusion, out_dir, make_feedback):
    feedback = make_feedback()
    feedback.progressChanged.connect(lambda _value: feedback.cancel())
    pair = potsdam_wald_pair
    # 32-pixel tiles: the 96×63 output takes several, so there is a tile after the first update.
    assert_fails(run_fusion, out_dir, "cancelled", "no output", feedback=feedback,
                 LRHSI=str(pair.lr_path), HRMSI=str(pair.hr_path), TILE_SIZE=32, OVERLAP=0)
    assert feedback.isCanceled()
    assert len(feedback.progress_values) >= 1 and feedback.progress_values[0] < 100


def test_missing_torch_gives_install_instructions(potsdam_wald_pair, run_fusion, out_dir, monkeypatch,
                                                  csakd_plugin_package):
    from csakd_fusion.processing_provider import dependencies

    # The algorithm asks the module at run time, so patching the module is enough.
    monkeypatch.setattr(dependencies, "torch_available", lambda: False)
    pair = potsdam_wald_pair
    message = assert_fails(run_fusion, out_dir, "PyTorch", "pip install", "torch", "restart QGIS",
                           LRHSI=str(pair.lr_path), HRMSI=str(pair.hr_path))
    assert "download.pytorch.org/whl/cpu" in message
