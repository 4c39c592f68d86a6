"""Misregistration of the LR-HSI: measured on real cubes, compensated in the fusion."""

import numpy as np
import pytest

from csakd_qgis.api import fill_gaps, fit_scene, fuse_arrays
from csakd_qgis.baselines import gsa
from csakd_qgis.datasets import load_potsdam_block, make_wald_case, validation_cubes, validation_sensors
from csakd_qgis.degradation import blur_and_decimate
from csakd_qgis.metrics import psnr
from csakd_qgis.registration import measure_offset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def potsdam_c(shared_data_dir):
    return load_potsdam_block("C", shared_data_dir)


def measured(case):
    stats = fit_scene(case.lr_hsi, blur_and_decimate(case.hr_msi, case.scale), 8)
    return measure_offset(case.lr_hsi, case.hr_msi, case.scale, stats.basis, stats.band_mean)


@pytest.mark.parametrize("scale,shift", [(4, (1.0, 1.0)), (3, (0.5, -1.0)), (8, (-2.0, 1.5))])
def test_a_real_offset_is_found_to_a_quarter_pixel(potsdam_c, scale, shift):
    case = make_wald_case(potsdam_c, validation_sensors()["Sentinel-2 10 m"], scale, shift=shift)
    found = measured(case)
    assert found.accepted, found
    np.testing.assert_allclose(found.offset, shift, atol=0.25)


@pytest.mark.parametrize("sensor", ["Sentinel-2 10 m", "WorldView-2", "RGB"])
@pytest.mark.parametrize("scale", [3, 8])
def test_aligned_real_pairs_are_left_alone(shared_data_dir, sensor, scale):
    # RGB against a cube reaching 2.5 µm is where an imperfect spectral fit "improves" at some
    # offset (down to 0.93 of the residual on the validation cases); none may be accepted.
    for cube in validation_cubes(shared_data_dir):
        case = make_wald_case(cube, validation_sensors()[sensor], scale)
        found = measured(case)
        assert not found.accepted, (cube.name, found)
        assert found.offset == (0.0, 0.0)


def test_compensated_fusion_of_a_shifted_pair_beats_gsa_and_nearly_matches_the_aligned_one(potsdam_c):
    sensor = validation_sensors()["Sentinel-2 10 m"]
    aligned = make_wald_case(potsdam_c, sensor, 4)
    shifted = make_wald_case(potsdam_c, sensor, 4, shift=(1.0, 1.0))
    messages = []
    fused = fuse_arrays(shifted.lr_hsi, shifted.hr_msi, log=messages.append)
    shifted_psnr = psnr(shifted.reference, fused)
    aligned_psnr = psnr(aligned.reference, fuse_arrays(aligned.lr_hsi, aligned.hr_msi))
    gsa_psnr = psnr(shifted.reference, gsa(shifted.lr_hsi, shifted.hr_msi, 4))
    print(f"Potsdam C ×4, shifted 1 px: fused {shifted_psnr:.2f} dB (aligned {aligned_psnr:.2f}), GSA {gsa_psnr:.2f}")
    assert any("compensated" in m for m in messages), messages
    assert shifted_psnr > gsa_psnr + 1.0
    assert shifted_psnr > aligned_psnr - 0.5


def test_gaps_are_filled_from_their_neighbours_and_data_is_untouched():
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:20, :30]
    image = np.stack([rows + 0.5 * cols, 100 - rows]).astype(np.float32) + rng.normal(0, 0.01, (2, 20, 30)).astype(np.float32)
    valid = np.ones((20, 30), bool)
    valid[5:8, 10:12] = False  # a hole
    valid[:, 27:] = False  # an edge strip
    filled = fill_gaps(np.where(valid, image, np.nan), valid, fallback=np.array([-1e6, -1e6]))
    np.testing.assert_array_equal(filled[:, valid], image[:, valid])
    # A smooth ramp is continued across the gaps to within a few of its steps, far from the
    # band mean a naive fill would put there.
    assert np.abs(filled[:, ~valid] - image[:, ~valid]).max() < 3.0
    # What no neighbour reaches within the fill's steps gets the fallback.
    far = np.zeros((1, 5, 40), np.float32)
    only = np.zeros((5, 40), bool)
    only[:, 0] = True
    far[:, :, 0] = 1.0
    out = fill_gaps(far, only, fallback=np.array([7.0]))
    assert (out[0, :, 1:13] == 1.0).all() and (out[0, :, 13:] == 7.0).all()


def test_gaps_outside_the_central_window_do_not_stop_the_measurement(potsdam_c):
    # A scene whose edge is no-data over more than a tenth of it (a swath edge) but whose centre,
    # where the offset is measured, is clean. Potsdam C mirrored into a scene large enough for
    # the 96 × 96 central window to miss the gap.
    from csakd_qgis.datasets import HyperspectralCube

    large = np.concatenate([potsdam_c.data, potsdam_c.data[:, ::-1]] * 3, axis=1)[:, :320]
    large = np.concatenate([large, large[:, :, ::-1], large], axis=2)[:, :, :320]
    cube = HyperspectralCube("Potsdam C mirrored", np.ascontiguousarray(large), potsdam_c.wavelengths_nm)
    case = make_wald_case(cube, validation_sensors()["Sentinel-2 10 m"], 2, shift=(1.0, -1.0))
    lr = case.lr_hsi.copy()
    lr[:, :24] = np.nan  # 15 % of the LR-HSI
    messages = []
    fused = fuse_arrays(lr, case.hr_msi, log=messages.append)
    assert any("compensated" in m for m in messages), messages
    assert np.isnan(fused[:, :40]).all() and np.isfinite(fused[:, 60:]).all()
