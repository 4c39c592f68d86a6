"""The LR-HSI's spatial degradation (PSF and misregistration): estimated blindly from real
pairs, compensated in the fusion."""

import numpy as np
import pytest

from csakd_qgis.api import fill_gaps, fit_scene, fuse_arrays
from csakd_qgis.baselines import gsa
from csakd_qgis.datasets import make_wald_case, validation_cubes, validation_sensors
from csakd_qgis.degradation import blur_and_decimate
from csakd_qgis.metrics import psnr
from csakd_qgis.psf import SpatialDegradation, wald
from csakd_qgis.registration import estimate_degradation, measuring_windows, window_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def measured(case, fixed=None):
    """The blind estimate on a Wald case's windows, as the fusion's pipeline measures it. The
    principal basis is the LR-HSI's alone (the MSI degraded under any PSF does not change it)."""
    stats = fit_scene(case.lr_hsi, blur_and_decimate(case.hr_msi, case.scale), 8)
    pairs = [window_pair(case.lr_hsi, case.hr_msi, case.scale, w) for w in measuring_windows(case.lr_hsi.shape[1:])]
    return estimate_degradation(pairs, case.scale, stats.basis, stats.band_mean, fixed=fixed)


@pytest.mark.parametrize("scale,shift", [(4, (1.0, 1.0)), (3, (0.5, -1.0)), (8, (-2.0, 1.5))])
def test_a_real_offset_is_found_to_a_quarter_pixel(potsdam_c, scale, shift):
    case = make_wald_case(potsdam_c, validation_sensors()["Sentinel-2 10 m"], scale, shift=shift)
    found = measured(case)
    assert found.accepted, found
    np.testing.assert_allclose(found.offset, shift, atol=0.25)
    np.testing.assert_allclose(found.measured, shift, atol=0.25)
    assert found.residual_ratio < 0.85


@pytest.mark.parametrize("sensor", ["Sentinel-2 10 m", "WorldView-2", "RGB"])
@pytest.mark.parametrize("scale", [3, 8])
def test_aligned_real_pairs_are_left_alone(shared_data_dir, sensor, scale):
    # Every validation cube. RGB against a cube reaching 2.5 µm is where an imperfect spectral fit "improves" at some
    # offset (down to 0.93 of the residual on the validation cases); none may be accepted.
    for cube in validation_cubes(shared_data_dir):
        case = make_wald_case(cube, validation_sensors()[sensor], scale)
        found = measured(case)
        assert not found.accepted, (cube.name, found)
        assert found.offset == (0.0, 0.0)
        # And the blind PSF is the protocol's Gaussian these pairs were made with.
        assert found.degradation.family == "gaussian", (cube.name, found)
        np.testing.assert_allclose(found.degradation.sigma, wald(scale).sigma, atol=0.03, err_msg=cube.name)


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
    # A scene whose edge is no-data over more than a tenth of it (a swath edge) but whose other
    # measuring windows are clean. Potsdam C mirrored into a scene large enough (160 × 160 LR
    # pixels at ×2) for two of the three rows of 64-pixel windows to miss the gap; the windows
    # that hold it are left out of the estimation.
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


def equivalent_sigma(degradation, axis):
    """The standard deviation of the degradation's kernel along ``axis``, in LR pixels: how a
    box and a box blurred by a narrow Gaussian (or a Gaussian) are compared, by the second
    moment of the operator actually applied."""
    weights, first = degradation.kernel(axis)
    positions = first + np.arange(len(weights))
    mean = weights @ positions
    return float(np.sqrt(weights @ (positions - mean) ** 2)) / degradation.scale


TRUE_PSFS = {
    "box": SpatialDegradation(3, "box", (0.0, 0.0)),
    "gaussian 0.35": SpatialDegradation(3, "gaussian", (0.35, 0.35)),
    "anisotropic, offset": SpatialDegradation(3, "gaussian", (0.4, 0.65), (0.5, -0.5)),
    "wald": wald(3),
}


@pytest.mark.parametrize("name", list(TRUE_PSFS))
def test_the_true_psf_and_offset_are_recovered_from_a_real_pair(potsdam_c, name):
    truth = TRUE_PSFS[name]
    case = make_wald_case(potsdam_c, validation_sensors()["Sentinel-2 10 m"], 3, psf=truth)
    assert case.degradation == truth
    found = measured(case)
    estimate = found.degradation
    print(f"{name}: {found.describe_psf()}; {found.describe()}")
    assert estimate.scale == 3
    if truth.family == "box":
        # A box and a box blurred by a very narrow Gaussian are the same operator to within the
        # HR grid's resolution: compared by their kernels' second moments.
        assert estimate.family in ("box", "box-gaussian"), estimate
    else:
        assert estimate.family == "gaussian", estimate
        np.testing.assert_allclose(estimate.sigma, truth.sigma, atol=0.03)
    for axis in (0, 1):
        assert equivalent_sigma(estimate, axis) == pytest.approx(equivalent_sigma(truth, axis), abs=0.03), (axis, estimate)
    if any(truth.offset):
        assert found.accepted, found
        np.testing.assert_allclose(estimate.offset, truth.offset, atol=0.25)
    else:
        assert not found.accepted and estimate.offset == (0.0, 0.0), found
    # Every family was tried, and the goodness of fit reported is the estimate's, as good as
    # the best family's.
    assert set(found.by_family) == {"gaussian", "box", "box-gaussian"}
    assert found.fit >= max(found.by_family.values()) - 1e-3


def test_a_psf_the_user_gives_is_kept_and_only_the_offset_is_measured(potsdam_c):
    truth = TRUE_PSFS["anisotropic, offset"]
    case = make_wald_case(potsdam_c, validation_sensors()["Sentinel-2 10 m"], 3, psf=truth)
    given = SpatialDegradation(3, "gaussian", (0.4, 0.65))
    found = measured(case, fixed=given)
    assert found.degradation.with_offset((0.0, 0.0)) == given
    assert found.by_family == {}
    assert found.accepted
    np.testing.assert_allclose(found.offset, truth.offset, atol=0.25)
    # Even a wrong PSF is the user's to give: it is kept as given.
    wrong = SpatialDegradation(3, "box", (0.0, 0.0))
    kept = measured(case, fixed=wrong).degradation
    assert kept.family == "box" and kept.sigma == (0.0, 0.0)


def test_windows_too_small_to_measure_on_fall_back_to_what_is_known(potsdam_c):
    case = make_wald_case(potsdam_c, validation_sensors()["Sentinel-2 10 m"], 3, psf=TRUE_PSFS["box"])
    stats = fit_scene(case.lr_hsi, blur_and_decimate(case.hr_msi, 3), 8)
    tiny = [window_pair(case.lr_hsi, case.hr_msi, 3, (0, 0, 5, 5))]
    found = estimate_degradation(tiny, 3, stats.basis, stats.band_mean)
    assert found.degradation == wald(3) and not found.accepted
    given = SpatialDegradation(3, "gaussian", (0.4, 0.4))
    assert estimate_degradation(tiny, 3, stats.basis, stats.band_mean, fixed=given).degradation == given


@pytest.mark.parametrize("name", ["box", "anisotropic, offset"])
def test_blind_fusion_matches_fusion_told_the_true_psf_and_beats_gsa(potsdam_c, name):
    truth = TRUE_PSFS[name]
    case = make_wald_case(potsdam_c, validation_sensors()["Sentinel-2 10 m"], 3, psf=truth)
    messages = []
    blind = psnr(case.reference, fuse_arrays(case.lr_hsi, case.hr_msi, log=messages.append))
    told = psnr(case.reference, fuse_arrays(case.lr_hsi, case.hr_msi, psf=case.degradation))
    assumed = psnr(case.reference, fuse_arrays(case.lr_hsi, case.hr_msi, psf=wald(3)))
    gsa_psnr = psnr(case.reference, gsa(case.lr_hsi, case.hr_msi, 3))
    print(f"Potsdam C ×3, {name}: blind {blind:.2f} dB, told the PSF {told:.2f}, told Wald {assumed:.2f}, GSA {gsa_psnr:.2f}")
    assert any(m.startswith("estimated PSF: ") for m in messages), messages
    assert blind >= told - 0.3
    assert blind >= gsa_psnr + 1.0
    # The estimation is what makes the difference: the old fixed assumption is far behind.
    assert assumed < blind - 3.0
