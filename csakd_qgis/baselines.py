"""Reference fusion methods every learned result is shown beside.

- :func:`bicubic_upsample`: the floor (spectrally consistent, no spatial detail);
- :func:`gsa`: adaptive Gram-Schmidt per MSI band group (Aiazzi et al. 2007).

Both return float64 (bands, rows, cols).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .degradation import blur_and_decimate

__all__ = ["cubic_kernel", "upsample_matrix", "bicubic_upsample", "gsa"]

_KEYS_A = -0.5


def cubic_kernel(x, a: float = _KEYS_A) -> np.ndarray:
    """Keys cubic convolution kernel; a = -0.5 reproduces quadratics exactly."""
    t = np.abs(np.asarray(x, dtype=np.float64))
    t2, t3 = t * t, t * t * t
    near = (a + 2.0) * t3 - (a + 3.0) * t2 + 1.0
    far = a * t3 - 5.0 * a * t2 + 8.0 * a * t - 4.0 * a
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


def upsample_matrix(n_lr: int, n_hr: int, scale: float) -> np.ndarray:
    """n_hr x n_lr float64 bicubic interpolation matrix along one axis.

    HR pixel ``i`` sits at LR coordinate (i + 0.5)/scale − 0.5, i.e. LR
    pixel ``k`` is centred on HR coordinate k·s + (s−1)/2 (the half-pixel,
    "align_corners=False" convention, matching :func:`blur_and_decimate`).
    Samples beyond the edge repeat the edge pixel.
    """
    u = (np.arange(n_hr, dtype=np.float64) + 0.5) / float(scale) - 0.5
    base = np.floor(u).astype(np.int64)
    taps = base[:, None] + np.arange(-1, 3)[None, :]
    w = cubic_kernel(u[:, None] - taps)
    mat = np.zeros((n_hr, n_lr), dtype=np.float64)
    rows = np.broadcast_to(np.arange(n_hr)[:, None], taps.shape)
    np.add.at(mat, (rows, np.clip(taps, 0, n_lr - 1)), w)
    return mat


def _pair_scale(scale) -> Tuple[float, float]:
    if np.ndim(scale) == 0:
        return float(scale), float(scale)
    sy, sx = scale
    return float(sy), float(sx)


def bicubic_upsample(
    lr,
    scale: Union[float, Sequence[float]],
    out_shape: Optional[Tuple[int, int]] = None,
) -> np.ndarray:
    """Bicubic (Keys, a = −0.5) upsampling of a (B, h, w) image; float64 output.

    ``scale`` is HR pixels per LR pixel (a number or (sy, sx)); it may be
    non-integer.  ``out_shape`` (H, W) defaults to round(h·sy), round(w·sx).
    Each axis is one matrix product, so the result is exact and fast.
    """
    a = np.asarray(lr, dtype=np.float64)
    squeeze = a.ndim == 2
    if squeeze:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"expected (bands, rows, cols), got shape {a.shape}")
    sy, sx = _pair_scale(scale)
    h, w = a.shape[1:]
    if out_shape is None:
        out_shape = (int(round(h * sy)), int(round(w * sx)))
    H, W = (int(v) for v in out_shape)
    my = upsample_matrix(h, H, sy)
    mx = upsample_matrix(w, W, sx)
    out = np.matmul(np.matmul(my, a), mx.T)
    return out[0] if squeeze else out


def _lstsq_with_const(A: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, float]:
    """Weights w and constant c minimising ‖A w + c − y‖ (A: n x k)."""
    design = np.hstack([A, np.ones((A.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef[:-1], float(coef[-1])


def gsa(lr_hsi, hr_msi, scale: int) -> np.ndarray:
    """Adaptive Gram-Schmidt (GSA) fusion applied per MSI band group.

    1. Upsample the LR-HSI bicubically to the MSI grid (HSI_up).
    2. Degrade the MSI to the LR grid with the Wald blur/decimation.
    3. Assign every HSI band to the MSI band it correlates best with at low
       resolution; MSI bands that win no HSI band are unused.
    4. Per group: least squares at low resolution of the degraded MSI band
       on the group's LR-HSI bands plus a constant gives the weights of the
       intensity I = Σ w_b·HSI_up_b + c; the MSI band is equalised to the
       mean and standard deviation of I, both measured at low resolution
       (degraded MSI vs. LR intensity); detail = MSI_eq − I; each band gets
       fused_b = HSI_up_b + g_b·detail with g_b = cov(HSI_up_b, I)/var(I).

    ``hr_msi`` rows/cols are cropped to multiples of ``scale``; the LR-HSI
    must then be (at least) (H/scale, W/scale).  Returns float64 (B, H, W).
    """
    s = int(scale)
    hsi = np.asarray(lr_hsi, dtype=np.float64)
    msi = np.asarray(hr_msi, dtype=np.float64)
    if hsi.ndim != 3 or msi.ndim != 3:
        raise ValueError("lr_hsi and hr_msi must be (bands, rows, cols)")
    H, W = (msi.shape[1] // s) * s, (msi.shape[2] // s) * s
    msi = msi[:, :H, :W]
    h, w = H // s, W // s
    if hsi.shape[1] < h or hsi.shape[2] < w:
        raise ValueError(
            f"LR-HSI {hsi.shape[1:]} too small for MSI {msi.shape[1:]} at scale {s}"
        )
    hsi = hsi[:, :h, :w]
    B, M = hsi.shape[0], msi.shape[0]

    up = bicubic_upsample(hsi, s, (H, W))
    msi_lr = blur_and_decimate(msi, s)

    hv = hsi.reshape(B, -1)
    mv = msi_lr.reshape(M, -1)
    hc = hv - hv.mean(axis=1, keepdims=True)
    mc = mv - mv.mean(axis=1, keepdims=True)
    hn = np.linalg.norm(hc, axis=1)
    mn = np.linalg.norm(mc, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (hc @ mc.T) / (hn[:, None] * mn[None, :])
    corr = np.nan_to_num(corr, nan=-np.inf)
    group = np.argmax(corr, axis=1)

    fused = up.copy()
    upv = up.reshape(B, -1)
    fv = fused.reshape(B, -1)
    for m in range(M):
        idx = np.flatnonzero(group == m)
        if idx.size == 0 or mn[m] == 0:
            continue
        wts, c = _lstsq_with_const(hv[idx].T, mv[m])
        intensity = wts @ upv[idx] + c
        i_lr = wts @ hv[idx] + c
        i_std, p_std = i_lr.std(), mv[m].std()
        if i_std == 0 or p_std == 0 or intensity.std() == 0:
            continue
        # Mean/std equalisation uses statistics taken at the same (low)
        # resolution on both sides.  Matching the sharp MSI band to the
        # bicubic intensity instead would shrink its contrast by the
        # smoothing ratio and lift dark pixels (water), which costs several
        # degrees of SAM on the real cubes.
        p_eq = (msi[m].ravel() - mv[m].mean()) * (i_std / p_std) + i_lr.mean()
        detail = p_eq - intensity
        ic = intensity - intensity.mean()
        gains = (upv[idx] - upv[idx].mean(axis=1, keepdims=True)) @ ic / (ic @ ic)
        fv[idx] += gains[:, None] * detail[None, :]
    return fused
