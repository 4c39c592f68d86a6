"""Fusion quality metrics, as defined in the project's measurement protocol.

``X`` is the reference and ``F`` the fused image, both (bands, rows, cols).
All computations are done in float64 and return Python floats.  ``valid``
is an optional boolean (rows, cols) mask restricting the pixels used.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

__all__ = ["psnr", "sam", "ergas", "rmse", "ssim", "quality_report", "PSNR_CAP_DB"]

#: PSNR assigned to a band whose MSE is exactly zero (identical band).
PSNR_CAP_DB = 100.0


def _cubes(X, F):
    x = np.asarray(X, dtype=np.float64)
    f = np.asarray(F, dtype=np.float64)
    # A single band may be given as (H, W).
    if x.ndim == 2:
        x = x[None]
    if f.ndim == 2:
        f = f[None]
    if x.shape != f.shape or x.ndim != 3:
        raise ValueError(f"reference {x.shape} and fused {f.shape} must both be (B, H, W)")
    return x, f


def _pair(X, F, valid=None):
    x, f = _cubes(X, F)
    if valid is None:
        return x.reshape(x.shape[0], -1), f.reshape(f.shape[0], -1)
    m = np.asarray(valid, dtype=bool)
    if m.shape != x.shape[1:]:
        raise ValueError(f"valid mask {m.shape} does not match image {x.shape[1:]}")
    if not m.any():
        raise ValueError("valid mask selects no pixel")
    return x[:, m], f[:, m]


def psnr(X, F, valid=None) -> float:
    """Mean over bands of 10·log10(max(X_b)² / MSE_b) in dB.

    The peak is each band's own reference maximum.  A band with MSE = 0
    scores :data:`PSNR_CAP_DB` (100 dB); bands whose reference maximum is
    ≤ 0 have no meaningful peak and are skipped (NaN if all are).
    """
    x, f = _pair(X, F, valid)
    mse = np.mean((x - f) ** 2, axis=1)
    peak = x.max(axis=1)
    ok = peak > 0
    if not ok.any():
        return float("nan")
    with np.errstate(divide="ignore"):
        per = 10.0 * np.log10(peak[ok] ** 2 / mse[ok])
    per = np.minimum(per, PSNR_CAP_DB)
    return float(np.mean(per))


def sam(X, F, valid=None) -> float:
    """Spectral angle mapper in degrees.

    Mean over pixels of arccos(<x, f> / (‖x‖·‖f‖)), cosine clipped to
    [-1, 1]; pixels where either spectrum has zero norm are skipped.
    """
    x, f = _pair(X, F, valid)
    nx = np.linalg.norm(x, axis=0)
    nf = np.linalg.norm(f, axis=0)
    ok = (nx > 0) & (nf > 0)
    if not ok.any():
        return float("nan")
    cos = np.sum(x[:, ok] * f[:, ok], axis=0) / (nx[ok] * nf[ok])
    return float(np.degrees(np.mean(np.arccos(np.clip(cos, -1.0, 1.0)))))


def ergas(X, F, scale: float, valid=None) -> float:
    """(100 / s)·sqrt(mean_b (RMSE_b / mean(X_b))²).

    ``scale`` is the resolution ratio s (HR pixels per LR pixel).  Bands
    whose reference mean is zero are skipped.
    """
    x, f = _pair(X, F, valid)
    rm = np.sqrt(np.mean((x - f) ** 2, axis=1))
    mu = x.mean(axis=1)
    ok = mu != 0
    if not ok.any():
        return float("nan")
    return float(100.0 / float(scale) * np.sqrt(np.mean((rm[ok] / mu[ok]) ** 2)))


def rmse(X, F, valid=None) -> float:
    """Root mean squared error over all values (all bands, valid pixels), in data units."""
    x, f = _pair(X, F, valid)
    return float(np.sqrt(np.mean((x - f) ** 2)))


def _gaussian_filter(img: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma, mode="reflect", truncate=radius / sigma)


def ssim(X, F, data_range: Optional[float] = None, valid=None) -> float:
    """Mean over bands of SSIM (Wang et al. 2004).

    Gaussian window 11×11, σ = 1.5, K1 = 0.01, K2 = 0.03, L = ``data_range``
    which defaults to X.max() − X.min() over the whole reference cube.  The
    local statistics use the window weights directly (no sample-covariance
    correction) and the SSIM map is averaged over positions where the
    window lies fully inside the image, as in Wang's reference code
    (images smaller than 11 pixels use the whole map with reflect borders).
    ``valid`` is accepted for a uniform interface and ignored.
    """
    x, f = _cubes(X, F)
    L = float(x.max() - x.min()) if data_range is None else float(data_range)
    if L <= 0:
        L = 1.0
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    sigma, radius = 1.5, 5
    h, w = x.shape[1:]
    crop = (slice(radius, h - radius), slice(radius, w - radius))
    if h <= 2 * radius or w <= 2 * radius:
        crop = (slice(None), slice(None))
    vals = []
    for xb, fb in zip(x, f):
        mx = _gaussian_filter(xb, sigma, radius)
        mf = _gaussian_filter(fb, sigma, radius)
        vx = _gaussian_filter(xb * xb, sigma, radius) - mx * mx
        vf = _gaussian_filter(fb * fb, sigma, radius) - mf * mf
        cxf = _gaussian_filter(xb * fb, sigma, radius) - mx * mf
        smap = ((2 * mx * mf + c1) * (2 * cxf + c2)) / (
            (mx * mx + mf * mf + c1) * (vx + vf + c2)
        )
        vals.append(smap[crop].mean())
    return float(np.mean(vals))


def quality_report(
    X, F, scale: float, valid=None, data_range: Optional[float] = None
) -> Dict[str, float]:
    """All protocol metrics: keys psnr, sam, ergas, rmse, ssim."""
    return {
        "psnr": psnr(X, F, valid),
        "sam": sam(X, F, valid),
        "ergas": ergas(X, F, scale, valid),
        "rmse": rmse(X, F, valid),
        "ssim": ssim(X, F, data_range, valid),
    }
