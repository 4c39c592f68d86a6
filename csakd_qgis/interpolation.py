"""Upsampling from the LR grid to the HR grid, for an LR grid that may be offset from the HR one.

Two interpolators, both separable and both applied as two matrix products per image (for
images with hundreds of bands, several times faster on a CPU than ``F.interpolate``, whose
bicubic kernel works channel by channel):

* **bicubic** (Keys, a = −0.75): with no offset, exactly what ``F.interpolate(mode="bicubic",
  align_corners=False)`` computes. It carries the part of the spectrum outside the subspace.
* **Wald-consistent**: P = Dᵀ(DDᵀ)⁻¹, where D is the Wald degradation (Gaussian blur σ = 0.53·s
  and decimation). It is the smallest change of an HR image that makes its degradation equal a
  given LR image, so ``x + P(y − D x)`` is the HR image closest to ``x`` whose degradation is
  ``y``. The fusion base uses it to keep exactly what the LR-HSI says and take only what the
  LR-HSI cannot see from the MSI. (Measured on the 27 validation cases, detail ridge 3e-3:
  34.05 dB against 33.54 dB for the MSI's high-pass injected onto bicubic upsampling.)
  It is regularised, Dᵀ(DDᵀ + λ·I)⁻¹ with λ a tenth of DDᵀ's mean diagonal, and scaled so
  that a constant stays constant: that gives up exact consistency for smaller negative lobes,
  which forgive a sensor whose real blur is not the Wald Gaussian. Measured: the 27 cases
  keep 34.05 dB and gain SAM (5.33° → 5.18°); on the real Berlin pair the fused image averaged
  back to 30 m departs less from the LR-HSI (relative RMSE 0.110 → 0.093) and has half the
  negative values. P's kernel decays fast but is not
  compact; it is truncated where its weights fall below ``KERNEL_TOLERANCE`` of the largest.

``offset`` = (dy, dx) in HR pixels places the LR pixel centres at k·s + (s − 1)/2 + offset, the
convention of :func:`degradation.decimation_matrix`. Bicubic borders replicate the edge pixel,
as ``F.interpolate`` does; the consistent interpolator's borders are half-sample symmetric, as
the Wald degradation's (an HR image mirrored at its edge degrades to the LR image mirrored at
its edge, so the interpolator stays an exact right inverse of the degradation up to the edge).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Tuple

import numpy as np
import torch

from .degradation import decimation_matrix, reflect_index

KEYS_A = -0.75
KERNEL_TOLERANCE = 1e-3
# Ridge on DDᵀ, relative to its mean diagonal (see the module docstring).
CONSISTENT_REGULARISATION = 0.1
# LR pixels on each side used to derive the consistent kernel: far more than its support.
_DERIVATION_HALF_WIDTH = 40


def _keys(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = KEYS_A
    return np.where(
        x <= 1,
        ((a + 2) * x - (a + 3)) * x * x + 1,
        np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0),
    )


@lru_cache(maxsize=64)
def consistent_kernel(scale: int, offset: float = 0.0) -> Tuple[np.ndarray, int]:
    """The Wald-consistent interpolator's weights of one LR pixel j on HR pixels j·s + d,
    for d = first, first + 1, …: returns (weights, first)."""
    n = 2 * _DERIVATION_HALF_WIDTH + 1
    degradation = decimation_matrix(n * scale, scale, shift=offset)
    gram = degradation @ degradation.T
    gram += CONSISTENT_REGULARISATION * np.trace(gram) / n * np.eye(n)
    inverse = degradation.T @ np.linalg.inv(gram)
    column = inverse[:, _DERIVATION_HALF_WIDTH]
    kept = np.flatnonzero(np.abs(column) >= KERNEL_TOLERANCE * np.abs(column).max())
    lo, hi = kept.min(), kept.max() + 1
    column = column[lo:hi].copy()
    # Every HR pixel's weights sum to 1, so that a constant image stays that constant, with or
    # without the regularisation (which shrinks them) and the truncation.
    phase = np.arange(lo, hi) % scale
    for p in range(scale):
        column[phase == p] /= column[phase == p].sum()
    return column, lo - _DERIVATION_HALF_WIDTH * scale


def consistent_reach(scale: int, offset: float = 0.0) -> int:
    """How many LR pixels away from an HR pixel the consistent interpolator still reads."""
    weights, first = consistent_kernel(scale, offset)
    return int(math.ceil(max(-first, first + len(weights)) / scale)) + 1


@lru_cache(maxsize=256)
def interpolation_matrix(n_lr: int, scale: int, offset: float = 0.0, kind: str = "bicubic") -> np.ndarray:
    """(n_lr·s, n_lr) float64 matrix that upsamples one axis."""
    n_hr = n_lr * scale
    matrix = np.zeros((n_hr, n_lr))
    hr = np.arange(n_hr)
    if kind == "bicubic":
        position = (hr - (scale - 1) / 2.0 - offset) / scale
        base = np.floor(position).astype(np.int64)
        for tap in range(-1, 3):
            j = base + tap
            np.add.at(matrix, (hr, np.clip(j, 0, n_lr - 1)), _keys(position - j))
    elif kind == "consistent":
        weights, first = consistent_kernel(scale, float(offset))
        reach = consistent_reach(scale, float(offset))
        for j in range(-reach, n_lr + reach):
            rows = j * scale + first + np.arange(len(weights))
            inside = (rows >= 0) & (rows < n_hr)
            np.add.at(matrix, (rows[inside], np.full(inside.sum(), reflect_index(j, n_lr))), weights[inside])
    else:
        raise ValueError(f"unknown interpolation {kind!r}")
    return matrix


def upsample_lr(x: torch.Tensor, scale: int, offset=(0.0, 0.0), kind: str = "bicubic") -> torch.Tensor:
    """(…, h, w) → (…, s·h, s·w)."""
    rows = torch.as_tensor(interpolation_matrix(x.shape[-2], scale, float(offset[0]), kind), dtype=x.dtype, device=x.device)
    cols = torch.as_tensor(interpolation_matrix(x.shape[-1], scale, float(offset[1]), kind), dtype=x.dtype, device=x.device)
    return torch.matmul(torch.matmul(rows, x), cols.T)
