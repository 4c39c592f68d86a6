from pathlib import Path

import numpy as np
import pytest

from csakd_qgis.baselines import bicubic_upsample, gsa, upsample_matrix
from csakd_qgis.cubes import load_jasper_ridge
from csakd_qgis.degradation import blur_and_decimate, wald_pair
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
