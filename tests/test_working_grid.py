"""The LR-HSI resampled once onto the working grid, windowed reads, and the split of the
fused spectrum into bicubic LR-HSI + subspace detail, checked on real rasters."""

import numpy as np
import pytest
import rasterio
import torch
from rasterio.enums import Resampling
from rasterio.windows import Window

from csakd_qgis.api import FusionCancelled, fit_scene, fuse_arrays, fuse_files
from csakd_qgis.degradation import blur_and_decimate
from csakd_qgis.georaster import (
    WorkingGridCube,
    lr_on_working_grid,
    lr_resampling,
    plan_grid,
    read_as_float,
    read_padded,
    same_grid_offset,
)
from csakd_qgis.model import SubspaceFusionModel
from csakd_qgis.psf import SpatialDegradation, wald
from csakd_qgis.train import student_config
from tests.helpers import randomise_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BERLIN_LR = "EnMAP_BerlinUrbanGradient_177b_30m.bsq"
BERLIN_HR = "HighResolution_BerlinUrbanGradient_HyMap4b_3m6.bsq"


def assert_same_cube(actual, expected, tolerance, rounding=0.0):
    """Equal up to ``tolerance`` × the largest value, plus ``rounding`` (a warping VRT of an
    integer raster rounds its resampled values; the scratch cube keeps them in float)."""
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    finite = np.isfinite(expected)
    scale = np.abs(expected[finite]).max()
    assert np.abs(actual[finite] - expected[finite]).max() <= tolerance * scale + rounding


def windows_of(cube, rows, cols):
    return [(0, 0, rows, cols), (3, 5, 7, 9), (rows - 4, cols - 6, 4, 6), (0, cols - 1, rows, 1)]


@pytest.mark.parametrize("pair", ["berlin", "potsdam"])
def test_scratch_cube_holds_what_the_warping_vrt_gives(pair, shared_data_dir, potsdam_wald_pair, tmp_path):
    if pair == "berlin":
        lr_path, hr_path = shared_data_dir / "berlin" / BERLIN_LR, shared_data_dir / "berlin" / BERLIN_HR
    else:
        lr_path, hr_path = potsdam_wald_pair.lr_path, potsdam_wald_pair.hr_path
    with rasterio.open(lr_path) as lr, rasterio.open(hr_path) as hr:
        grid = plan_grid(lr, hr)
        indexes = list(range(1, lr.count + 1, 7))
        rounding = 0.5 * max(lr.scales) if np.dtype(lr.dtypes[0]).kind in "iu" else 0.0
        with lr_on_working_grid(lr, grid) as vrt:
            expected = read_as_float(vrt, indexes=indexes)
        with WorkingGridCube.materialise(lr, grid, indexes, tmp_path / "scratch", progress=None) as cube:
            assert (cube.bands, cube.rows, cube.cols) == (len(indexes), grid.lr_height, grid.lr_width)
            # Berlin: cubic resampling (ratio 8.33 onto a scale-8 grid); Potsdam: the same grid.
            assert_same_cube(cube.read(0, 0, cube.rows, cube.cols), expected, 1e-5, rounding)
            for row, col, rows, cols in windows_of(expected, cube.rows, cube.cols):
                assert_same_cube(cube.read(row, col, rows, cols), expected[:, row : row + rows, col : col + cols], 1e-5, rounding)
            sample = cube.sample(5, 4)
            rows = np.linspace(0, cube.rows - 1, 5).round().astype(int)
            cols = np.linspace(0, cube.cols - 1, 4).round().astype(int)
            assert_same_cube(sample, expected[:, rows][:, :, cols], 1e-5, rounding)
    if pair == "potsdam":
        # The pair's nodata holes come back as NaN, and the grid is the LR-HSI's own (read, not warped).
        assert lr_resampling(lr, grid) == Resampling.nearest
        assert same_grid_offset(lr, grid) is not None
        for row, col in potsdam_wald_pair.lr_holes:
            assert np.isnan(expected[:, row, col]).all()
    else:
        assert lr_resampling(lr, grid) == Resampling.cubic
        assert same_grid_offset(lr, grid) is None


def test_resampling_rule_depends_on_the_working_pixel(potsdam_wald_pair, tmp_path):
    # Beside the 90 m LR-HSI, an MSI at 45 m: ratio 2 → scale 2, working pixel 90 m on the same
    # grid → the pixels themselves; at 32 m: ratio 2.81 → scale 3, working pixel 96 m > 90 m →
    # average; at 40 m: ratio 2.25 → scale 2, working pixel 80 m < 90 m → cubic.
    with rasterio.open(potsdam_wald_pair.lr_path) as lr:
        for pixel, expected in ((45.0, Resampling.nearest), (32.0, Resampling.average), (40.0, Resampling.cubic)):
            hr_path = tmp_path / f"msi_{int(pixel)}.tif"
            transform = rasterio.Affine(pixel, 0, lr.transform.c, 0, -pixel, lr.transform.f)
            with rasterio.open(hr_path, "w", driver="GTiff", width=60, height=60, count=3, dtype="float32",
                               crs=lr.crs, transform=transform) as dst:
                dst.write(np.ones((3, 60, 60), np.float32))
            with rasterio.open(hr_path) as hr:
                assert lr_resampling(lr, plan_grid(lr, hr)) == expected, pixel


def test_padded_read_matches_a_boundless_read(potsdam_wald_pair):
    with rasterio.open(potsdam_wald_pair.hr_path) as hr:
        for row, col, rows, cols in ((-5, -3, 20, 30), (hr.height - 10, hr.width - 4, 25, 12), (4, 6, 8, 8)):
            padded = read_padded(hr, row, col, rows, cols)
            boundless = read_as_float(hr, window=Window(col, row, cols, rows), boundless=True)
            inside = np.zeros((rows, cols), bool)
            inside[max(0, -row) : hr.height - row, max(0, -col) : hr.width - col] = True
            assert np.isnan(padded[:, ~inside]).all()
            np.testing.assert_array_equal(padded[:, inside], boundless[:, inside])


def test_tiled_fusion_equals_the_model_on_the_whole_image(potsdam_wald_pair):
    # Tiles are blended in the K-channel subspace and spectra composed block by block; with
    # one tile this must give exactly what the model gives on the whole image at once, with
    # the scene statistics (and estimated degradation) of the fusion's own stages.
    from csakd_qgis.api import array_pair
    from csakd_qgis.pipeline import check_against_safe, fit_scene_statistics, nonnegative_inputs

    torch.manual_seed(0)
    model = randomise_head(SubspaceFusionModel(student_config())).eval()
    pair = potsdam_wald_pair
    lr = np.nan_to_num(pair.lr[~pair.bad_bands], nan=0.0).astype(np.float32)
    with rasterio.open(pair.hr_path) as hr:
        msi = hr.read().astype(np.float32)
    scene = array_pair(lr, msi, pair.scale)
    stats, _ = fit_scene_statistics(scene, model.config.subspace_dim)
    # The fusion itself, not the conservative bicubic answer, is what is compared here.
    assert check_against_safe(scene, model, stats, torch.device("cpu")).use_fusion
    with torch.inference_mode():
        whole = model(torch.from_numpy(lr)[None], torch.from_numpy(msi)[None], stats.to_tensors()).image[0].numpy()
    if nonnegative_inputs(scene):
        whole = np.maximum(whole, 0.0)
    fused = fuse_arrays(lr, msi, model=model, tile_size=max(msi.shape[1:]))
    np.testing.assert_allclose(fused, whole, rtol=0, atol=1e-4 * np.abs(whole).max())


def test_no_scratch_file_is_left_after_success_or_cancellation(potsdam_wald_pair, fusion_model, tmp_path):
    pair = potsdam_wald_pair
    done = tmp_path / "done"
    fuse_files(pair.lr_path, pair.hr_path, done / "fused.tif", model=fusion_model, tile_size=32, overlap=8)
    assert sorted(p.name for p in done.iterdir()) == ["fused.tif"]
    for calls_before_cancel in (0, 3):
        cancelled = tmp_path / f"cancelled{calls_before_cancel}"
        calls = []

        def stop():
            calls.append(1)
            return len(calls) > calls_before_cancel

        with pytest.raises(FusionCancelled):
            fuse_files(pair.lr_path, pair.hr_path, cancelled / "fused.tif", model=fusion_model, tile_size=32,
                       overlap=8, cancelled=stop)
        # The run created the folder, so it takes it away again: nothing is left behind.
        assert not cancelled.exists()


@pytest.mark.parametrize(
    "degradation",
    [wald(3), SpatialDegradation(3, "box", (0.0, 0.0)), SpatialDegradation(3, "gaussian", (0.4, 0.65), (0.5, -0.5))],
    ids=["wald", "box", "anisotropic-offset"],
)
def test_the_msi_is_degraded_onto_the_lr_grid_exactly_as_the_fit_assumes(potsdam_wald_pair, degradation):
    # The MSI read from its raster by windows, as fuse_files reads it, and degraded onto the
    # working grid: the very degradation the statistics and the model assume (formerly a box
    # average blurred towards the Wald Gaussian, which differed from it by 19.5 in RMSE).
    from csakd_qgis.georaster import read_padded
    from csakd_qgis.pipeline import ScenePair

    with rasterio.open(potsdam_wald_pair.hr_path) as hr:
        msi = hr.read().astype(np.float32)
        lr_shape = (msi.shape[1] // 3, msi.shape[2] // 3)
        scene = ScenePair(
            lr_shape, msi.shape[1:], 3, lambda w: None, lambda w: read_padded(hr, w[0], w[1], w[2], w[3])
        )
        expected = blur_and_decimate(msi.astype(np.float64), degradation)
        tolerance = 1e-6 * np.abs(msi).max()
        whole = scene.msi_at_lr((0, 0) + lr_shape, degradation)
        np.testing.assert_allclose(whole, expected, rtol=0, atol=tolerance)  # mirrored at the edges too
        for row, col, rows, cols in ((5, 7, 10, 12), (0, 20, 9, lr_shape[1] - 20), (lr_shape[0] - 4, 0, 4, 6)):
            window = scene.msi_at_lr((row, col, rows, cols), degradation)
            np.testing.assert_allclose(window, expected[:, row : row + rows, col : col + cols], rtol=0, atol=tolerance)
    if degradation != wald(3):
        assert np.abs(expected - blur_and_decimate(msi.astype(np.float64), 3)).max() > 1
    # A missing MSI pixel makes exactly the LR pixels whose PSF reads it missing; gaps are not
    # spread by filling them.
    from csakd_qgis.api import array_pair
    from csakd_qgis.psf import decimation_matrix

    holed = msi.copy()
    holed[:, 30, 40] = np.nan
    degraded = array_pair(np.zeros((1,) + lr_shape, np.float32), holed, 3).msi_at_lr((0, 0) + lr_shape, degradation)
    touched = (decimation_matrix(msi.shape[1], degradation, 0)[:, 30] > 0)[:, None] & (
        decimation_matrix(msi.shape[2], degradation, 1)[:, 40] > 0
    )[None, :]
    assert touched.sum() >= 1
    np.testing.assert_array_equal(np.isnan(degraded).any(0), touched)
    np.testing.assert_allclose(degraded[:, ~touched], expected[:, ~touched], rtol=0, atol=tolerance)
