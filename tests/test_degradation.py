import math
from pathlib import Path

import numpy as np
import pytest

from csakd_qgis.degradation import (
    add_noise,
    blur_and_decimate,
    simulate_msi,
    wald_pair,
)
from csakd_qgis.psf import SpatialDegradation, decimation_matrix, wald
from csakd_qgis.srf import (
    list_sensors,
    load_srf,
    spectral_response_matrix,
)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SRF_DIR = DATA_DIR / "srf"


def test_an_integer_scale_means_the_wald_gaussian():
    # σ = 0.53 LR pixels, i.e. 2.12 HR pixels at ×4.
    degradation = wald(4)
    assert degradation.family == "gaussian" and degradation.sigma == (0.53, 0.53)
    assert degradation.sigma[0] * degradation.scale == pytest.approx(2.12)
    cube = np.random.default_rng(1).random((2, 24, 20))
    np.testing.assert_array_equal(blur_and_decimate(cube, 4), blur_and_decimate(cube, degradation))


@pytest.mark.parametrize("scale", [2, 3, 4, 5])
def test_constant_stays_constant(scale):
    cube = np.full((2, 4 * scale, 3 * scale), 7.5)
    lr = blur_and_decimate(cube, scale)
    assert lr.shape == (2, 4, 3)
    np.testing.assert_allclose(lr, 7.5, rtol=1e-12)
    np.testing.assert_allclose(blur_and_decimate(cube, wald(scale, (0.7, -1.3))), 7.5, rtol=1e-12)
    for family, sigma in (("box", (0.0, 0.0)), ("box-gaussian", (0.3, 0.6)), ("gaussian", (0.35, 0.8))):
        degradation = SpatialDegradation(scale, family, sigma, (0.5, -0.25))
        np.testing.assert_allclose(blur_and_decimate(cube, degradation), 7.5, rtol=1e-12)


def test_impulse_odd_scale_lands_on_footprint_centre():
    # s = 3: LR pixel k is centred on HR coordinate 3k + 1, an integer.
    s, k, l = 3, 4, 3
    cube = np.zeros((1, 27, 24))
    cube[0, s * k + 1, s * l + 1] = 1.0
    lr = blur_and_decimate(cube, s)[0]
    assert np.unravel_index(np.argmax(lr), lr.shape) == (k, l)
    assert lr[k - 1, l] == pytest.approx(lr[k + 1, l], rel=1e-12)
    assert lr[k, l - 1] == pytest.approx(lr[k, l + 1], rel=1e-12)


def test_impulse_even_scale_is_half_pixel_centred():
    # s = 4: the centre of LR pixel k is HR coordinate 4k + 1.5, between two
    # HR pixels.  A 2×2 block on HR rows/cols 4k+1, 4k+2 is symmetric about it.
    s, k, l = 4, 3, 2
    cube = np.zeros((1, 32, 24))
    cube[0, s * k + 1 : s * k + 3, s * l + 1 : s * l + 3] = 1.0
    lr = blur_and_decimate(cube, s)[0]
    assert np.unravel_index(np.argmax(lr), lr.shape) == (k, l)
    assert lr[k - 1, l] == pytest.approx(lr[k + 1, l], rel=1e-12)
    assert lr[k, l - 1] == pytest.approx(lr[k, l + 1], rel=1e-12)
    # A single impulse at row 4k+1 is 3.5 px from the centre of LR row k-1
    # and 4.5 px from that of row k+1; the Gaussian fixes their ratio.
    one = np.zeros((1, 32, 24))
    one[0, s * k + 1, s * l + 1] = 1.0
    lr1 = blur_and_decimate(one, s)[0]
    sig = wald(s).sigma[0] * s  # HR pixels
    expected = math.exp(-(3.5**2 - 4.5**2) / (2 * sig**2))
    assert lr1[k - 1, l] / lr1[k + 1, l] == pytest.approx(expected, rel=1e-9)


def test_shift_by_one_lr_pixel_moves_sampling_grid():
    rng = np.random.default_rng(0)
    cube = rng.random((2, 40, 40))
    s = 4
    base = blur_and_decimate(cube, s)
    moved = blur_and_decimate(cube, wald(s, (s, 0)))
    np.testing.assert_allclose(moved[:, 2:7, :], base[:, 3:8, :], rtol=1e-12)
    half = blur_and_decimate(cube, wald(s, (0, 0.5)))
    assert not np.allclose(half, base)


def test_decimation_matrix_rows_sum_to_one():
    for s in (2, 3, 8):
        for family, sigma in (("gaussian", (0.53, 0.7)), ("box", (0.0, 0.0)), ("box-gaussian", (0.4, 0.4))):
            degradation = SpatialDegradation(s, family, sigma, (0.3, -0.6))
            for axis in (0, 1):
                m = decimation_matrix(37, degradation, axis)
                assert m.shape == (37 // s, 37)
                np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-12)


def test_cropping_shapes_and_dtype():
    cube = np.ones((3, 10, 11), dtype=np.float32)
    lr = blur_and_decimate(cube, 3)
    assert lr.shape == (3, 3, 3) and lr.dtype == np.float32
    assert blur_and_decimate(np.ones((3, 10, 11), dtype=np.uint16), 3).dtype == np.float64
    R = np.full((2, 3), 1 / 3)
    lr_hsi, msi, ref = wald_pair(cube, 3, R)
    assert ref.shape == (3, 9, 9)
    assert lr_hsi.shape == (3, 3, 3)
    assert msi.shape == (2, 9, 9)


def test_float32_cube_stays_float32_and_is_decimated_by_the_scale():
    # (Speed is measured in `make bench`, not asserted in tests.)
    cube = np.random.default_rng(0).random((224, 128, 128), dtype=np.float32)
    lr = blur_and_decimate(cube, 4)
    assert lr.shape == (224, 32, 32) and lr.dtype == np.float32


def test_simulate_msi_is_band_projection():
    rng = np.random.default_rng(3)
    cube = rng.random((5, 4, 6))
    R = rng.random((2, 5))
    msi = simulate_msi(cube, R)
    assert msi.shape == (2, 4, 6)
    np.testing.assert_allclose(msi[1, 2, 3], R[1] @ cube[:, 2, 3])
    with pytest.raises(ValueError):
        simulate_msi(cube, R[:, :4])


@pytest.mark.parametrize("snr_db", [30.0, 40.0])
def test_add_noise_snr(snr_db):
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:200, 0:200]
    img = np.stack([1 + np.sin(xx / 9.0), 10 + 0 * xx, 0.1 * (1 + yy / 200.0)])
    noisy = add_noise(img, snr_db, rng)
    for b in range(3):
        measured = 10 * np.log10(np.mean(img[b] ** 2) / np.var(noisy[b] - img[b]))
        assert measured == pytest.approx(snr_db, abs=0.1)


def test_wald_pair_noise_is_reproducible():
    cube = np.random.default_rng(0).random((4, 16, 16))
    R = np.full((1, 4), 0.25)
    a = wald_pair(cube, 2, R, hsi_snr_db=35, msi_snr_db=35)
    b = wald_pair(cube, 2, R, hsi_snr_db=35, msi_snr_db=35)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], cube)


@pytest.mark.usefixtures("shared_data_dir")
def test_list_sensors_excludes_hyperspectral_tables():
    names = list_sensors(SRF_DIR)
    assert "sentinel2a_msi_srf" in names and "landsat8_9_oli_srf" in names
    for hs in ("enmap", "prisma", "desis", "emit"):
        assert hs not in names


@pytest.mark.usefixtures("shared_data_dir")
def test_load_srf_by_stem_and_subset():
    s2 = load_srf("sentinel2a_msi_srf", SRF_DIR)
    assert s2.band_names[:4] == ["B1", "B2", "B3", "B4"] and len(s2.band_names) == 13
    assert s2.responses.shape == (s2.wavelengths_nm.size, 13)
    sub = s2.subset(["B2", "B3", "B4", "B8"])
    assert sub.band_names == ["B2", "B3", "B4", "B8"]
    np.testing.assert_array_equal(sub.responses[:, 3], s2.responses[:, 7])
    # Landsat OLI names both SWIR columns alike; they must stay selectable.
    oli = load_srf(SRF_DIR / "landsat8_9_oli_srf.csv")
    assert len(set(oli.band_names)) == len(oli.band_names) == 6
    with pytest.raises(ValueError):
        load_srf("enmap", SRF_DIR)


@pytest.mark.usefixtures("shared_data_dir")
def test_srf_matrix_rows_sum_to_one_and_swir_dropped():
    s2 = load_srf("sentinel2a_msi_srf", SRF_DIR)
    centres = np.arange(400.0, 901.0, 10.0)
    R, kept = spectral_response_matrix(s2, centres)
    assert R.shape == (len(kept), centres.size)
    np.testing.assert_allclose(R.sum(axis=1), 1.0, rtol=1e-12)
    assert (R >= 0).all()
    for band in ("B2", "B3", "B4", "B8"):
        assert band in kept
    for band in ("B9", "B10", "B11", "B12"):
        assert band not in kept
    # A flat spectrum keeps its value through every kept band.
    flat = np.full((centres.size, 2, 2), 0.3)
    np.testing.assert_allclose(simulate_msi(flat, R), 0.3)
    with pytest.raises(ValueError, match="no band"):
        spectral_response_matrix(s2, np.arange(2600.0, 2700.0, 10.0))


def test_wald_pair_degrades_under_the_degradation_it_is_given():
    # The offset lives in the degradation (no separate shift any more).
    cube = np.random.default_rng(2).random((4, 18, 18))
    R = np.full((1, 4), 0.25)
    degradation = SpatialDegradation(3, "box-gaussian", (0.3, 0.5), (0.5, -1.0))
    lr, msi, ref = wald_pair(cube, degradation, R)
    np.testing.assert_array_equal(lr, blur_and_decimate(cube, degradation))
    assert not np.allclose(lr, blur_and_decimate(cube, 3))
    np.testing.assert_array_equal(ref, cube)
    np.testing.assert_allclose(msi, simulate_msi(cube, R))
