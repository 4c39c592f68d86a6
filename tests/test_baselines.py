from pathlib import Path

import numpy as np
import pytest

from csakd_qgis.baselines import bicubic_upsample, cnmf, gsa, hysure, upsample_matrix
from csakd_qgis.bench import cached
from csakd_qgis.cubes import load_jasper_ridge
from csakd_qgis.degradation import blur_and_decimate, simulate_msi, wald_pair
from csakd_qgis.psf import SpatialDegradation, decimation_matrix, wald
from csakd_qgis.metrics import psnr, sam
from csakd_qgis.srf import load_srf, spectral_response_matrix

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_upsample_matrix_rows_sum_to_one():
    for n_lr, n_hr, s in ((5, 20, 4), (7, 21, 3), (6, 15, 2.5)):
        m = upsample_matrix(n_lr, n_hr, s)
        assert m.shape == (n_hr, n_lr)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_reproduces_constant(scale):
    lr = np.full((2, 5, 6), 3.25)
    up = bicubic_upsample(lr, scale)
    assert up.shape == (2, 5 * scale, 6 * scale) and up.dtype == np.float64
    np.testing.assert_allclose(up, 3.25, rtol=1e-12)


@pytest.mark.parametrize("scale,out_shape", [(3, None), (4, None), (2.5, (30, 25))])
def test_bicubic_reproduces_linear_ramp_in_interior(scale, out_shape):
    # LR pixel k sits at LR coordinate k; HR pixel i at (i + 0.5)/s − 0.5.
    h, w = 12, 10
    k, l = np.mgrid[0:h, 0:w].astype(float)
    lr = (2.0 * k - 0.5 * l + 1.0)[None]
    up = bicubic_upsample(lr, scale, out_shape)[0]
    H, W = up.shape
    u = (np.arange(H) + 0.5) / scale - 0.5
    v = (np.arange(W) + 0.5) / scale - 0.5
    expected = 2.0 * u[:, None] - 0.5 * v[None, :] + 1.0
    # Interior: all four taps inside the LR image.
    iy = (u >= 1) & (u <= h - 2)
    ix = (v >= 1) & (v <= w - 2)
    np.testing.assert_allclose(up[np.ix_(iy, ix)], expected[np.ix_(iy, ix)], atol=1e-10)


def test_bicubic_lr_pixel_centres_are_interpolated_exactly():
    # With an odd integer scale HR pixel k·s + (s−1)/2 is exactly LR pixel k.
    rng = np.random.default_rng(0)
    lr = rng.random((2, 6, 7))
    up = bicubic_upsample(lr, 3)
    np.testing.assert_allclose(up[:, 1::3, 1::3], lr, atol=1e-12)


def test_degrade_of_upsample_is_close_for_smooth_image():
    s = 4
    k, l = np.mgrid[0:24, 0:24].astype(float)
    x = (1.0 + 0.5 * np.sin(2 * np.pi * k / 24.0) * np.cos(2 * np.pi * l / 30.0))[None]
    back = blur_and_decimate(bicubic_upsample(x, s), s)
    err = np.abs(back - x)[:, 3:-3, 3:-3]
    assert err.max() < 0.02 * np.abs(x).max()


def _synthetic_pair(rng, scale=2):
    yy, xx = np.mgrid[0:32, 0:32].astype(float)
    base = np.stack([np.sin(xx / 3.0) + 2, np.cos(yy / 4.0) + 2, (xx + yy) / 32 + 1])
    cube = np.concatenate([base, base * 0.5 + 0.1 * rng.random(base.shape)])
    lr = blur_and_decimate(cube, scale)
    return cube, lr


def test_gsa_shape_dtype_and_empty_groups():
    rng = np.random.default_rng(1)
    cube, lr = _synthetic_pair(rng)
    # MSI band 1 duplicates band 0 (argmax always prefers band 0, so its
    # group is empty) and band 2 is constant (no correlation at all).
    b0 = cube[:3].mean(axis=0)
    msi = np.stack([b0, b0, np.full_like(b0, 5.0)])
    out = gsa(lr, msi, 2)
    assert out.shape == cube.shape and out.dtype == np.float64
    assert np.isfinite(out).all()


def test_gsa_accepts_integer_input():
    rng = np.random.default_rng(2)
    cube, lr = _synthetic_pair(rng)
    msi = np.round(100 * cube[:3].mean(axis=0, keepdims=True)).astype(np.int16)
    out = gsa(np.round(100 * lr).astype(np.int32), msi, 2)
    assert out.dtype == np.float64 and np.isfinite(out).all()


@pytest.mark.usefixtures("shared_data_dir")
def test_gsa_beats_bicubic_on_jasper_ridge_sentinel2_scale4():
    cube, wl = load_jasper_ridge(DATA_DIR)
    s2 = load_srf("sentinel2a_msi_srf", DATA_DIR / "srf").subset(["B2", "B3", "B4", "B8"])
    R, kept = spectral_response_matrix(s2, wl)
    assert kept == ["B2", "B3", "B4", "B8"]
    lr, msi, ref = wald_pair(cube, 4, R)
    up = bicubic_upsample(lr, 4, ref.shape[1:])
    fused = gsa(lr, msi, 4)
    p_bic, p_gsa = psnr(ref, up), psnr(ref, fused)
    s_bic, s_gsa = sam(ref, up), sam(ref, fused)
    print(
        f"\nJasper Ridge x4, Sentinel-2 B2/B3/B4/B8: "
        f"bicubic PSNR {p_bic:.2f} dB SAM {s_bic:.2f} deg | "
        f"GSA PSNR {p_gsa:.2f} dB SAM {s_gsa:.2f} deg"
    )
    assert p_gsa > p_bic + 1.0
    assert s_gsa < s_bic


# --- CNMF and HySure, given the true degradation ------------------------------------------


def _box_matrix(n_hr, scale):
    """Pixel aggregation along one axis: LR pixel k is the mean of HR pixels k·s … k·s+s−1
    (psf's box PSF; test_psf.py checks it against plain block means)."""
    return decimation_matrix(n_hr, SpatialDegradation(scale, "box", (0.0, 0.0)), 0)


def _separable(images, rows, cols):
    return np.matmul(np.matmul(rows, images), cols.T)


def _tiny_pair(rng):
    """An 8 x 8, 6-band image that a 6-dimensional subspace represents exactly, its degradation
    by a Gaussian PSF at scale 2 and a 3-band MSI."""
    cube = rng.random((6, 8, 8)) + 0.5
    rows, cols = decimation_matrix(8, wald(2), 0), decimation_matrix(8, wald(2), 1)
    srf = rng.random((3, 6))
    srf /= srf.sum(axis=1, keepdims=True)
    return cube, _separable(cube, rows, cols), simulate_msi(cube, srf), srf, rows, cols


@pytest.mark.parametrize("basis", ["svd", "endmembers"])
def test_hysure_without_regulariser_reproduces_both_inputs(basis):
    # With λφ → 0 the solution must fit both data terms exactly (the image itself does):
    # a check of the ADMM sub-problem solvers and of the separable degradation operator.
    cube, lr, msi, srf, rows, cols = _tiny_pair(np.random.default_rng(0))
    fused = hysure(lr, msi, srf, rows, cols, subspace_dim=6, lambda_phi=1e-9, mu=0.005,
                   iterations=3000, basis=basis)
    assert fused.shape == cube.shape and fused.dtype == np.float64
    np.testing.assert_allclose(_separable(fused, rows, cols), lr, atol=1e-3)
    np.testing.assert_allclose(simulate_msi(fused, srf), msi, atol=1e-3)


def test_cnmf_is_non_negative_with_slightly_negative_inputs():
    cube, lr, msi, srf, rows, cols = _tiny_pair(np.random.default_rng(1))
    lr[0, 0, 0] = -0.01  # noise can push a few samples below zero
    fused = cnmf(lr, msi, srf, rows, cols, endmembers=4)
    assert fused.shape == cube.shape and fused.dtype == np.float64
    assert np.isfinite(fused).all() and fused.min() >= 0.0


@pytest.mark.parametrize("method", [cnmf, hysure])
def test_model_based_baselines_reject_a_degradation_of_the_wrong_shape(method):
    cube, lr, msi, srf, rows, cols = _tiny_pair(np.random.default_rng(2))
    with pytest.raises(ValueError, match="rows_matrix must be"):
        method(lr, msi, srf, rows[:, :6], cols)
    with pytest.raises(ValueError, match="srf must be"):
        method(lr, msi, srf.T, rows, cols)


@pytest.fixture(scope="module")
def jasper_crop(shared_data_dir):
    """48 x 48 crop of Jasper Ridge (rows and columns 26–73: water, shore and vegetation),
    with its Sentinel-2 10 m-band MSI."""
    cube, wl = load_jasper_ridge(shared_data_dir)
    s2 = load_srf("sentinel2a_msi_srf", shared_data_dir / "srf").subset(["B2", "B3", "B4", "B8"])
    srf, kept = spectral_response_matrix(s2, wl)
    assert kept == ["B2", "B3", "B4", "B8"]
    reference = cube[:, 26:74, 26:74].astype(np.float64)
    return reference, simulate_msi(reference, srf), srf


def _scores(reference, fused):
    return psnr(reference, fused), sam(reference, fused)


def test_cnmf_and_hysure_beat_bicubic_and_gsa_given_the_wald_gaussian(jasper_crop):
    """Jasper Ridge 48 x 48 crop, ×4, Wald Gaussian (σ = 0.53·s) given as the true PSF.

    Measured (PSNR dB / SAM °): bicubic 22.57 / 8.32, GSA 30.91 / 6.55, CNMF 34.90 / 4.73,
    HySure 35.42 / 4.67; about 1.3 s and 2 s.
    """
    reference, msi, srf = jasper_crop
    rows = cols = decimation_matrix(48, wald(4), 0)
    lr = _separable(reference, rows, cols)
    p_bic, s_bic = _scores(reference, bicubic_upsample(lr, 4, (48, 48)))
    p_gsa, _ = _scores(reference, gsa(lr, msi, 4))
    for method in (cnmf, hysure):
        p, s = _scores(reference, method(lr, msi, srf, rows, cols))
        print(f"\n{method.__name__}: {p:.2f} dB / {s:.2f} deg (bicubic {p_bic:.2f}, GSA {p_gsa:.2f})")
        assert p > p_bic + 8.0
        assert p > p_gsa + 2.0
        assert s < s_bic - 2.0


def test_cnmf_and_hysure_beat_bicubic_given_the_true_box_psf(jasper_crop):
    """Same crop, each LR pixel the plain mean of its 4 x 4 footprint, the box matrices given.

    Measured (PSNR dB / SAM °): bicubic 23.98 / 7.08, CNMF 35.71 / 4.46, HySure 35.54 / 4.45
    (GSA, which assumes the Gaussian, 26.67 / 8.56).
    """
    reference, msi, srf = jasper_crop
    rows = cols = _box_matrix(48, 4)
    lr = _separable(reference, rows, cols)
    p_bic, s_bic = _scores(reference, bicubic_upsample(lr, 4, (48, 48)))
    for method in (cnmf, hysure):
        p, s = _scores(reference, method(lr, msi, srf, rows, cols))
        print(f"\n{method.__name__} (box): {p:.2f} dB / {s:.2f} deg (bicubic {p_bic:.2f})")
        assert p > p_bic + 8.0
        assert s < s_bic - 2.0


def test_cached_computes_once_per_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6.0).reshape(2, 3) * len(calls)

    image = np.ones((2, 2), dtype=np.float32)
    first = cached(["hysure", {"mu": 0.05}, image], compute, tmp_path)
    again = cached(["hysure", {"mu": 0.05}, image.copy()], compute, tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(first, again)
    # Any change of parameters, values, dtype or shape is a new entry.
    cached(["hysure", {"mu": 0.5}, image], compute, tmp_path)
    cached(["hysure", {"mu": 0.05}, image * 2], compute, tmp_path)
    cached(["hysure", {"mu": 0.05}, image.astype(np.float64)], compute, tmp_path)
    cached(["hysure", {"mu": 0.05}, image.reshape(1, 4)], compute, tmp_path)
    assert len(calls) == 5
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npy"] * 5
