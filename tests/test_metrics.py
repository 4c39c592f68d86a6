import math

import numpy as np
import pytest

from csakd_qgis.metrics import (
    PSNR_CAP_DB,
    ergas,
    psnr,
    quality_report,
    rmse,
    sam,
    ssim,
)


def test_psnr_by_hand_two_bands():
    # Band 1: peak 4, errors (1, 0, 0, -1) -> MSE 0.5 -> 10·log10(16/0.5) = 10·log10(32) = 15.0515 dB
    # Band 2: peak 2, every error 0.5 -> MSE 0.25 -> 10·log10(4/0.25) = 10·log10(16) = 12.0412 dB
    # Mean over bands: 13.5463 dB
    X = np.array([[[0, 1], [2, 4]], [[1, 1], [1, 2]]], dtype=float)
    F = X + np.array([[[1, 0], [0, -1]], [[0.5, 0.5], [0.5, 0.5]]])
    expected = (10 * math.log10(32) + 10 * math.log10(16)) / 2
    assert psnr(X, F) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(13.5463, abs=1e-4)


def test_psnr_accepts_int_and_caps_identical_bands():
    X = np.array([[[0, 1], [2, 4]]], dtype=np.int32)
    assert psnr(X, X) == PSNR_CAP_DB
    # One identical band (capped at 100 dB) and band 1 of the case above (15.0515 dB).
    X2 = np.concatenate([X, X]).astype(float)
    F2 = X2.copy()
    F2[1] += np.array([[1, 0], [0, -1]])
    assert psnr(X2, F2) == pytest.approx((100 + 10 * math.log10(32)) / 2, abs=1e-12)


def test_psnr_valid_mask():
    # Masking out the two wrong pixels of band 1 leaves an exact match -> capped.
    X = np.array([[[0, 1], [2, 4]]], dtype=float)
    F = X + np.array([[[1, 0], [0, -1]]])
    valid = np.array([[False, True], [True, False]])
    assert psnr(X, F, valid=valid) == PSNR_CAP_DB
    # Keeping only pixel (0,0): peak max(X)=0 there -> no meaningful peak -> NaN.
    only = np.array([[True, False], [False, False]])
    assert math.isnan(psnr(X, F, valid=only))


def test_sam_90_and_60_degrees():
    # Pixel 1: x=(1,0), f=(0,1): cos 0 -> 90°.  Pixel 2: x=(1,0), f=(1,√3): cos 1/2 -> 60°.
    # Pixel 3: x=(0,0) has zero norm and is skipped.  Mean of 90 and 60 = 75°.
    X = np.array([[[1.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]]])
    F = np.array([[[0.0, 1.0, 1.0]], [[1.0, math.sqrt(3), 1.0]]])
    assert sam(X, F) == pytest.approx(75.0, abs=1e-9)
    assert sam(X[:, :, 1:2], F[:, :, 1:2]) == pytest.approx(60.0, abs=1e-9)
    assert sam(X, X) == pytest.approx(0.0, abs=1e-6)


def test_sam_valid_mask_selects_pixel():
    X = np.array([[[1.0, 1.0]], [[0.0, 0.0]]])
    F = np.array([[[0.0, 1.0]], [[1.0, math.sqrt(3)]]])
    assert sam(X, F, valid=np.array([[True, False]])) == pytest.approx(90.0)


def test_ergas_by_hand():
    # Band 1: X=(2,2), mean 2; F=(3,1): RMSE 1 -> ratio 0.5.  Band 2 exact -> ratio 0.
    # mean of squares (0.25 + 0)/2 = 0.125; sqrt = 0.353553; times 100/s with s=4 -> 8.838835
    X = np.array([[[2.0, 2.0]], [[4.0, 4.0]]])
    F = np.array([[[3.0, 1.0]], [[4.0, 4.0]]])
    assert ergas(X, F, 4) == pytest.approx(25 * math.sqrt(0.125), abs=1e-12)
    assert ergas(X, F, 4) == pytest.approx(8.838835, abs=1e-6)


def test_rmse_by_hand():
    # Errors over all 4 values: 1, 1, 0, 0 -> sqrt(2/4) = 0.7071
    X = np.array([[[2.0, 2.0]], [[4.0, 4.0]]])
    F = np.array([[[3.0, 1.0]], [[4.0, 4.0]]])
    assert rmse(X, F) == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert rmse(X, F, valid=np.array([[False, True]])) == pytest.approx(math.sqrt(0.5))


def _ssim_direct(x, f, L):
    # Independent reference: explicit loop over every 11×11 window lying fully
    # inside the image, Gaussian weights (σ 1.5) normalised to sum 1, weighted
    # means / variances / covariance without bias correction (Wang et al. 2004).
    r = np.arange(-5, 6)
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    g /= g.sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(5, x.shape[0] - 5):
        for j in range(5, x.shape[1] - 5):
            a = x[i - 5 : i + 6, j - 5 : j + 6]
            b = f[i - 5 : i + 6, j - 5 : j + 6]
            ma, mb = (g * a).sum(), (g * b).sum()
            va = (g * (a - ma) ** 2).sum()
            vb = (g * (b - mb) ** 2).sum()
            cab = (g * (a - ma) * (b - mb)).sum()
            vals.append(
                ((2 * ma * mb + c1) * (2 * cab + c2))
                / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return float(np.mean(vals))


def test_ssim_identical_is_one():
    rng = np.random.default_rng(1)
    X = rng.random((3, 20, 20))
    assert ssim(X, X) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_direct_computation():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:18, 0:17]
    X = np.stack([np.sin(yy / 3.0) + xx / 10.0, np.cos(xx / 4.0) * yy / 9.0])
    F = X + 0.3 * rng.standard_normal(X.shape)
    L = float(X.max() - X.min())
    expected = np.mean([_ssim_direct(X[b], F[b], L) for b in range(2)])
    got = ssim(X, F)
    assert got == pytest.approx(expected, abs=1e-10)
    assert 0.1 < got < 0.95
    # An explicit data range changes the constants.
    assert ssim(X, F, data_range=10 * L) == pytest.approx(
        np.mean([_ssim_direct(X[b], F[b], 10 * L) for b in range(2)]), abs=1e-10
    )


def test_quality_report_keys_and_values():
    X = np.array([[[2.0, 2.0]], [[4.0, 4.0]]])
    F = np.array([[[3.0, 1.0]], [[4.0, 4.0]]])
    q = quality_report(X, F, 4)
    assert set(q) == {"psnr", "sam", "ergas", "rmse", "ssim"}
    assert q["ergas"] == pytest.approx(ergas(X, F, 4))
    assert q["rmse"] == pytest.approx(math.sqrt(0.5))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        psnr(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))
