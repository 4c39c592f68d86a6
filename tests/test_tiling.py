import numpy as np
import pytest

from tests.helpers import randomise_head
import torch

from csakd_qgis.api import fuse_arrays, run_tiles
from csakd_qgis.baselines import bicubic_upsample
from csakd_qgis.cubes import load_jasper_ridge
from csakd_qgis.datasets import HyperspectralCube, make_wald_case
from csakd_qgis.model import SubspaceFusionModel
from csakd_qgis.srf import load_srf
from csakd_qgis.tiling import StripBlender, blend_weights, iterate_tiles, plan_rows_of_tiles
from csakd_qgis.train import student_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLANS = [
    # lr_shape, scale, tile_size, overlap, halo_lr
    ((25, 31), 4, 32, 16, 4),
    ((40, 13), 2, 20, 6, 2),
    ((25, 25), 4, 30, 8, 3),  # tile size not a multiple of the scale
    ((7, 5), 3, 64, 32, 4),  # one tile larger than the raster
    ((33, 33), 3, 48, 48, 4),  # overlap as large as the tile
    ((9, 50), 8, 64, 16, 1),
]


@pytest.mark.parametrize("lr_shape,scale,tile_size,overlap,halo", PLANS)
def test_plan_covers_every_pixel_with_aligned_tiles_and_clipped_contexts(lr_shape, scale, tile_size, overlap, halo):
    lr_rows, lr_cols = lr_shape
    rows, cols = lr_rows * scale, lr_cols * scale
    plan = plan_rows_of_tiles(lr_shape, scale, tile_size, overlap, halo)
    coverage = np.zeros((rows, cols), int)
    previous_row_start = -1
    for row in plan:
        starts = {t.hr_window[0] for t in row}
        assert len(starts) == 1, "a row of tiles shares its first row"
        assert starts.pop() > previous_row_start
        previous_row_start = row[0].hr_window[0]
        for tile in row:
            r, c, h, w = tile.hr_window
            assert all(v % scale == 0 for v in tile.hr_window), tile
            assert h > 0 and w > 0 and r + h <= rows and c + w <= cols
            coverage[r : r + h, c : c + w] += 1
            # Context: the tile's LR window grown by the halo, clipped to the raster.
            lr_r, lr_c, lr_h, lr_w = r // scale, c // scale, h // scale, w // scale
            top, left = max(0, lr_r - halo), max(0, lr_c - halo)
            bottom, right = min(lr_rows, lr_r + lr_h + halo), min(lr_cols, lr_c + lr_w + halo)
            assert tile.context_lr == (top, left, bottom - top, right - left)
            assert tile.context_hr == (top * scale, left * scale, (bottom - top) * scale, (right - left) * scale)
            row_slice, col_slice = tile.crop_from_context()
            context = np.zeros(tile.context_hr[2:])
            assert context[row_slice, col_slice].shape == (h, w)
            assert row_slice.start + tile.context_hr[0] == r and col_slice.start + tile.context_hr[1] == c
    assert coverage.min() >= 1


def test_blend_weights_by_hand():
    # Columns 8..15 of a 24-column raster, ramp 4: rising edge (p + 0.5)/4, falling edge
    # (8 − p − 0.5)/4; the rows touch both raster borders and keep weight 1.
    weights = blend_weights((0, 8, 4, 8), (4, 24), ramp=4)
    expected_cols = np.array([0.125, 0.375, 0.625, 0.875, 0.875, 0.625, 0.375, 0.125])
    np.testing.assert_allclose(weights, np.tile(expected_cols, (4, 1)), rtol=0, atol=1e-7)


def test_neighbour_weights_sum_to_one_across_an_overlap_of_one_ramp():
    # Tiles on columns 0..11 and 8..19 of a 20-column raster overlap on 8..11 = one ramp of 4:
    # (12 − p − 0.5)/4 + (p − 8 + 0.5)/4 = 1 there, and each weighs 1 alone elsewhere.
    total = np.zeros((2, 20), np.float32)
    total[:, 0:12] += blend_weights((0, 0, 2, 12), (2, 20), ramp=4)
    total[:, 8:20] += blend_weights((0, 8, 2, 12), (2, 20), ramp=4)
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-7)


class ConstantFuser:
    scale = 4
    channels = 3
    halo_lr = 4

    def fuse_tile(self, lr, hr):
        return np.ones((3,) + hr.shape[1:], np.float32)


class IdentityFuser:
    """Returns its HR input: the blended output must then rebuild the HR image."""

    scale = 4
    channels = 3
    halo_lr = 4

    def fuse_tile(self, lr, hr):
        return hr.copy()


def _run(fuser, hr_image, tile_size, overlap, block_rows=256):
    scale = fuser.scale
    lr_shape = (hr_image.shape[1] // scale, hr_image.shape[2] // scale)
    output = np.full(hr_image.shape, np.nan, np.float32)
    emitted = []

    def emit(row0, rows):
        emitted.append((row0, rows.shape[1]))
        output[:, row0 : row0 + rows.shape[1]] = rows

    run_tiles(
        fuser,
        lr_shape,
        lambda w: np.zeros((5, w[2], w[3]), np.float32),
        lambda w: hr_image[:, w[0] : w[0] + w[2], w[1] : w[1] + w[3]],
        emit,
        tile_size,
        overlap,
        block_rows=block_rows,
    )
    return output, emitted


@pytest.mark.parametrize("tile_size,overlap", [(32, 16), (24, 8), (64, 32), (16, 48)])
def test_constant_tiles_blend_to_exactly_one(tile_size, overlap):
    output, _ = _run(ConstantFuser(), np.zeros((3, 100, 76), np.float32), tile_size, overlap)
    np.testing.assert_array_equal(output, 1.0)


@pytest.mark.parametrize("tile_size,overlap", [(32, 16), (24, 8)])
def test_blending_puts_every_tile_in_its_place(tile_size, overlap):
    image = np.random.default_rng(0).random((3, 100, 76)).astype(np.float32)
    output, _ = _run(IdentityFuser(), image, tile_size, overlap)
    np.testing.assert_allclose(output, image, rtol=1e-6, atol=0)


@pytest.mark.parametrize("tile_size,overlap,block_rows", [(32, 16, 16), (24, 8, 16), (128, 32, 16), (32, 16, 256)])
def test_every_row_is_emitted_once_in_order_in_whole_blocks(tile_size, overlap, block_rows):
    _, emitted = _run(ConstantFuser(), np.zeros((3, 100, 76), np.float32), tile_size, overlap, block_rows)
    rows = [r for row0, count in emitted for r in range(row0, row0 + count)]
    assert rows == list(range(100))
    # Whole output blocks: every piece starts on a block boundary and only the last is short.
    assert all(row0 % block_rows == 0 for row0, _ in emitted)
    assert all(count == block_rows for _, count in emitted[:-1])
    if block_rows < 100:
        assert len(emitted) == -(-100 // block_rows), "rows are released block by block, not at the end"


def test_strip_blender_holds_at_most_a_strip():
    # Memory is bounded by one row of tiles: after a flush the buffer starts at the flush row.
    emitted = []
    blender = StripBlender(1, (40, 20), 4, lambda r, a: emitted.append(r))
    plan = plan_rows_of_tiles((10, 5), 4, 16, 8, 2)
    for tile, flush in iterate_tiles(plan):
        blender.add(tile.hr_window, np.ones((1, tile.hr_window[2], tile.hr_window[3]), np.float32))
        if flush >= 0:
            blender.flush_until(flush, block_rows=8)
            assert blender.start == flush // 8 * 8 or flush == 40
            # What stays: the overlap with the next row of tiles (16-row tiles every 8 rows)
            # plus at most one unfinished block of 8 rows.
            assert blender.weight.shape[0] <= 16
    assert blender.start == 40


@pytest.fixture(scope="module")
def jasper_case(shared_data_dir):
    cube, wavelengths = load_jasper_ridge(shared_data_dir)
    sensor = load_srf("sentinel2a_msi_srf", shared_data_dir / "srf").subset(["B2", "B3", "B4", "B8"])
    return make_wald_case(HyperspectralCube("AVIRIS Jasper Ridge", cube, wavelengths), sensor, 4)


@pytest.fixture(scope="module")
def untrained_student():
    # The bundled model changes with every training run; a fixed random one keeps the numbers stable.
    torch.manual_seed(0)
    return randomise_head(SubspaceFusionModel(student_config())).eval()


def test_tile_size_barely_changes_the_result(jasper_case, untrained_student):
    case = jasper_case
    assert case.lr_hsi.shape == (198, 25, 25) and case.hr_msi.shape == (4, 100, 100)
    data_range = float(case.reference.max() - case.reference.min())
    assert len(plan_rows_of_tiles((25, 25), 4, 100, 32, 4)) == 1
    whole = fuse_arrays(case.lr_hsi, case.hr_msi, model=untrained_student, tile_size=100)
    assert np.isfinite(whole).all()
    # The untrained network moves the output far from bicubic (measured: by 1.0 × the data
    # range), so agreement between tilings is not agreement between two bicubic upsamplings.
    effect = np.abs(whole - bicubic_upsample(case.lr_hsi, 4)).max() / data_range
    assert effect > 0.2
    # Measured max |difference| / data range: 0.0126 (32 px tiles, 16 overlap), 0.0072 (64 px,
    # 32 overlap); mean 3.5e-4 and 1.9e-4. Bounds: twice the measured maximum, about 3×
    # the measured mean.
    for tile_size, overlap, max_bound in ((32, 16, 0.025), (64, 32, 0.015)):
        tiled = fuse_arrays(case.lr_hsi, case.hr_msi, model=untrained_student, tile_size=tile_size, overlap=overlap)
        assert np.isfinite(tiled).all()
        difference = np.abs(tiled - whole) / data_range
        assert difference.max() < max_bound, (tile_size, difference.max())
        assert difference.mean() < 1e-3, (tile_size, difference.mean())


@pytest.mark.parametrize("where", ["lr", "msi", "both"])
def test_missing_input_pixels_give_missing_output_exactly_there(jasper_case, untrained_student, where):
    case = jasper_case
    lr = case.lr_hsi.copy()
    msi = case.hr_msi.copy()
    expected = np.zeros((100, 100), bool)
    if where in ("lr", "both"):
        lr[:, 10, 7] = np.nan  # one LR pixel: its 4×4 HR footprint, rows 40..43, cols 28..31
        expected[40:44, 28:32] = True
    if where in ("msi", "both"):
        msi[2, 55, 80] = np.nan  # one band of one MSI pixel is enough to lose that pixel
        expected[55, 80] = True
    fused = fuse_arrays(lr, msi, model=untrained_student, tile_size=64, overlap=32)
    np.testing.assert_array_equal(np.isnan(fused).any(axis=0), expected)
    np.testing.assert_array_equal(np.isnan(fused).all(axis=0), expected)
