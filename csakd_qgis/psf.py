"""The spatial degradation from the HR grid to the LR-HSI: one small value, passed to every stage.

An LR-HSI pixel is a weighted mean of the scene around its footprint centre; on the HR grid
that is a separable kernel per axis (the point spread function, PSF, relative to the MSI's
pixels) followed by decimation by the working scale s. :class:`SpatialDegradation` holds it:

* ``family``: ``"gaussian"`` (the Wald protocol's model; σ = 0.53 LR pixels gives an MTF of
  about 0.25 at the LR Nyquist frequency), ``"box"`` (pixel aggregation: each LR pixel the
  plain mean of its s × s footprint, what ``gdalwarp -r average`` gives) or ``"box-gaussian"``
  (aggregation followed by a Gaussian of σ: a detector's area plus optics and motion blur);
* ``sigma`` = (rows, cols): the Gaussian's standard deviation per axis in **LR pixels**
  (push-broom sensors blur differently along and across track);
* ``offset`` = (dy, dx): where the LR pixel centres sit relative to the footprint centres
  k·s + (s − 1)/2, in **HR pixels** (a measured misregistration);
* ``scale``: HR pixels per LR pixel (the working scale; one integer for both axes, since the
  working grid is planned on ground distances, see georaster.plan_grid).

Every stage derives its operator from this one value: the Wald degradation
(:func:`decimation_matrix`), the consistent interpolator (interpolation.py), the torch
degradation inside the network's base (:func:`degrade_torch`), the scene statistics, the
blind estimation (registration.py), training pairs and scene adaptation. No module keeps a σ
of its own.

Sources: Wald, Ranchin, Mangolini, "Fusion of satellite images of different spatial
resolutions: assessing the quality of resulting images", PE&RS 63(6), 1997 (degradation
protocol); Simões et al., IEEE TGRS 53(6), 2015 (HySure: the relative PSF is a property of the
pair, to be estimated from it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Tuple

import numpy as np

__all__ = ["SpatialDegradation", "wald", "parse_psf", "sigma_from_mtf", "decimation_matrix", "reflect_index"]

FAMILIES = ("gaussian", "box", "box-gaussian")
# The Wald protocol's Gaussian, in LR pixels (see notes on the measurement protocol).
WALD_SIGMA = 0.53
# Gaussian taps beyond this many σ are dropped (weight below 3.4e-4 of the peak).
TRUNCATE_SIGMAS = 4.0


def reflect_index(j: np.ndarray, n: int) -> np.ndarray:
    """Half-sample symmetric reflection (d c b a | a b c d | d c b a) of indexes ``j`` into
    0..n−1, the same as scipy.ndimage mode="reflect"."""
    period = 2 * n
    j = np.mod(j, period)
    return np.where(j >= n, period - 1 - j, j)


@dataclass(frozen=True)
class SpatialDegradation:
    """The LR-HSI's spatial response on the HR grid (see the module docstring).

    Frozen and hashable, so operators derived from it are cached per value.
    Raises ValueError for an unknown family, a scale below 1 or a negative σ.
    """

    scale: int
    family: str = "gaussian"
    sigma: Tuple[float, float] = (WALD_SIGMA, WALD_SIGMA)  # LR pixels, (rows, cols)
    offset: Tuple[float, float] = field(default=(0.0, 0.0))  # HR pixels, (dy, dx)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown PSF family {self.family!r}; use one of {', '.join(FAMILIES)}")
        if int(self.scale) < 1:
            raise ValueError(f"scale must be a positive integer, got {self.scale}")
        sigma = tuple(float(v) for v in np.broadcast_to(np.asarray(self.sigma, dtype=float), (2,)))
        if min(sigma) < 0:
            raise ValueError(f"σ must not be negative, got {sigma}")
        object.__setattr__(self, "scale", int(self.scale))
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "offset", tuple(float(v) for v in self.offset))

    def with_offset(self, offset) -> "SpatialDegradation":
        return replace(self, offset=tuple(float(v) for v in offset))

    def at_scale(self, scale: int) -> "SpatialDegradation":
        """The same PSF (in LR pixels) at another scale, without offset: how a scene's own
        reduced pair is made (Wald protocol applied to the LR-HSI itself)."""
        return replace(self, scale=int(scale), offset=(0.0, 0.0))

    def kernel(self, axis: int) -> Tuple[np.ndarray, int]:
        """(weights, first): LR pixel k of this axis is Σ_i weights[i] · x[k·s + first + i].

        axis 0 = rows, 1 = columns. The weights sum to 1 and are the same for every k,
        since every footprint centre sits at the same sub-pixel phase.
        """
        return _kernel(self.family, self.sigma[axis] * self.scale, self.scale, self.offset[axis])

    def reach_hr(self) -> int:
        """How many HR pixels beyond its footprint an LR pixel reads, on either axis."""
        reach = 0
        for axis in (0, 1):
            weights, first = self.kernel(axis)
            reach = max(reach, -first, first + len(weights) - self.scale)
        return max(0, reach)

    def describe(self) -> str:
        sy, sx = self.sigma
        same = abs(sy - sx) < 1e-9
        sigma = f"σ = {sy:.2f}" if same else f"σ = {sy:.2f} (rows) × {sx:.2f} (columns)"
        if self.family == "gaussian":
            mtf = f"{mtf_at_nyquist(sy):.2f}" if same else f"{mtf_at_nyquist(sy):.2f} × {mtf_at_nyquist(sx):.2f}"
            text = f"Gaussian PSF, {sigma} HSI pixels (MTF at Nyquist {mtf})"
        elif self.family == "box":
            text = "pixel aggregation (box PSF of one HSI pixel)"
        else:
            text = f"pixel aggregation blurred by a Gaussian, {sigma} HSI pixels"
        dy, dx = self.offset
        if dy or dx:
            text += f", offset {dy:+.2f} rows, {dx:+.2f} columns of MSI pixels"
        return text

    def to_dict(self) -> dict:
        return {"scale": self.scale, "family": self.family, "sigma": list(self.sigma), "offset": list(self.offset)}


def wald(scale: int, offset=(0.0, 0.0)) -> SpatialDegradation:
    """The Wald protocol's degradation (Gaussian, σ = 0.53 LR pixels) at ``scale``."""
    return SpatialDegradation(int(scale), "gaussian", (WALD_SIGMA, WALD_SIGMA), tuple(offset))


def sigma_from_mtf(mtf: float) -> float:
    """σ in LR pixels of the Gaussian whose MTF at the LR Nyquist frequency (0.5 cycles per
    pixel) is ``mtf``, as sensor data sheets state it: MTF(f) = exp(−2π²σ²f²).
    Raises ValueError outside 0 < mtf < 1."""
    if not 0.0 < mtf < 1.0:
        raise ValueError(f"the MTF at Nyquist must lie between 0 and 1 (exclusive), got {mtf}")
    return math.sqrt(-2.0 * math.log(mtf)) / math.pi


def mtf_at_nyquist(sigma: float) -> float:
    """Inverse of :func:`sigma_from_mtf`."""
    return math.exp(-0.5 * (math.pi * sigma) ** 2)


_NUMBER = r"([0-9]*\.?[0-9]+)"


def parse_psf(text: str, scale: int):
    """A user's PSF choice: None for ``auto`` (estimate from the pair), else a
    :class:`SpatialDegradation` at ``scale``.

    Accepted (case-insensitive): ``auto``; ``box`` (pixel aggregation); ``gaussian:σ`` or
    ``gaussian:σrows,σcols`` with σ in HSI pixels; ``mtf:v`` or ``mtf:vrows,vcols``, the MTF at
    Nyquist from a sensor's data sheet; ``box-gaussian:σ``. Raises ValueError with the
    accepted forms when ``text`` is none of them.
    """
    value = (text or "auto").strip().lower().replace(" ", "")
    if value in ("", "auto"):
        return None
    if value in ("box", "average", "aggregation"):
        return SpatialDegradation(scale, "box", (0.0, 0.0))
    match = re.fullmatch(rf"(gaussian|mtf|box-gaussian):{_NUMBER}(?:,{_NUMBER})?", value)
    if match is None:
        raise ValueError(
            f"PSF {text!r} not understood: use auto, box, gaussian:SIGMA (HSI pixels, e.g. gaussian:0.5 or "
            "gaussian:0.45,0.6 for rows,columns), mtf:VALUE (MTF at Nyquist, e.g. mtf:0.3) or box-gaussian:SIGMA"
        )
    kind, first, second = match.groups()
    values = (float(first), float(second if second is not None else first))
    if kind == "mtf":
        return SpatialDegradation(scale, "gaussian", tuple(sigma_from_mtf(v) for v in values))
    if kind == "gaussian" and min(values) <= 0:
        raise ValueError("a Gaussian PSF needs σ > 0 HSI pixels; for pixel aggregation use PSF=box")
    return SpatialDegradation(scale, kind, values)


@lru_cache(maxsize=512)
def _kernel(family: str, sigma_hr: float, scale: int, offset: float) -> Tuple[np.ndarray, int]:
    centre = (scale - 1) / 2.0 + offset
    if family == "gaussian":
        # Narrower than a quarter HR pixel, a sampled Gaussian can miss every tap (a centre
        # between two pixels); its limit, linear interpolation at the centre, is used instead.
        if sigma_hr < 0.25:
            # No blur: linear interpolation at the centre.
            first = int(math.floor(centre))
            frac = centre - first
            return np.array([1.0 - frac, frac]), first
        radius = int(math.ceil(TRUNCATE_SIGMAS * sigma_hr)) + 1
        first = int(math.floor(centre)) - radius
        distance = np.arange(first, first + 2 * radius + 2) - centre
        weights = np.exp(-0.5 * (distance / sigma_hr) ** 2)
        weights[np.abs(distance) > TRUNCATE_SIGMAS * sigma_hr] = 0.0
    else:
        # Exact overlap of each HR pixel [j − ½, j + ½] with the footprint [c − s/2, c + s/2].
        low, high = centre - scale / 2.0, centre + scale / 2.0
        first = int(math.floor(low + 0.5))
        taps = np.arange(first, int(math.ceil(high - 0.5)) + 1)
        weights = np.clip(np.minimum(taps + 0.5, high) - np.maximum(taps - 0.5, low), 0.0, None)
        if family == "box-gaussian" and sigma_hr > 0:
            radius = int(math.ceil(TRUNCATE_SIGMAS * sigma_hr))
            gauss = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_hr) ** 2)
            weights = np.convolve(weights, gauss / gauss.sum())
            first -= radius
    keep = np.flatnonzero(weights > 0)
    weights = weights[keep[0] : keep[-1] + 1]
    first += int(keep[0])
    return weights / weights.sum(), first


@lru_cache(maxsize=256)
def decimation_matrix(n_hr: int, degradation: SpatialDegradation, axis: int) -> np.ndarray:
    """(n_hr // s) × n_hr float64 matrix, read-only: the PSF along ``axis`` (0 rows, 1 columns)
    then sampling at the footprint centres k·s + (s − 1)/2 + offset, with half-sample symmetric
    borders (an HR image mirrored at its edge degrades to the LR image mirrored at its edge).

    Cached per value: the PSF estimate asks for the same few hundred matrices again and again
    (2460 calls for a 512² scene, 0.16 s)."""
    s = degradation.scale
    weights, first = degradation.kernel(axis)
    n_lr = n_hr // s
    taps = np.arange(n_lr)[:, None] * s + first + np.arange(len(weights))[None, :]
    matrix = np.zeros((n_lr, n_hr), dtype=np.float64)
    rows = np.broadcast_to(np.arange(n_lr)[:, None], taps.shape)
    np.add.at(matrix, (rows, reflect_index(taps, n_hr)), np.broadcast_to(weights, taps.shape))
    matrix.setflags(write=False)
    return matrix


def degrade(image: np.ndarray, degradation: SpatialDegradation) -> np.ndarray:
    """(C, H, W) → (C, H//s, W//s): the PSF and decimation as one matrix product per axis.
    float32 for float32 input, float64 otherwise. Rows/cols beyond a multiple of s are ignored."""
    a = np.asarray(image)
    dtype = np.float32 if a.dtype == np.float32 else np.float64
    s = degradation.scale
    rows, cols = (a.shape[-2] // s) * s, (a.shape[-1] // s) * s
    a = a[..., :rows, :cols].astype(dtype, copy=False)
    my = decimation_matrix(rows, degradation, 0).astype(dtype)
    mx = decimation_matrix(cols, degradation, 1).astype(dtype)
    return np.matmul(np.matmul(my, a), mx.T)


def degrade_torch(x, degradation: SpatialDegradation):
    """(N, C, H, W) → (N, C, H//s, W//s) in torch: one product with :func:`decimation_matrix`
    per axis, so the PSF, sampling and half-sample symmetric borders of :func:`degrade`. Where H
    or W is not a multiple of s the two differ at the far border: this one mirrors at H and W
    (and reads the rows beyond the last multiple), :func:`degrade` crops to the multiple first.

    Why matrices: a 256² tile's 16 subspace channels went through separable strided
    single-channel convolutions on a mirrored copy in 12 ms per call (three calls per tile);
    the two small matrix products take about 1 ms, and they are the very matrices of the
    NumPy operator and the PSF estimate, so all three share one definition."""
    import torch

    s = degradation.scale
    if s == 1 and degradation.family == "gaussian" and max(degradation.sigma) == 0 and not any(degradation.offset):
        return x
    h, w = x.shape[-2:]
    # A copy: the cached matrices are read-only, which torch does not share.
    rows = torch.tensor(decimation_matrix(h, degradation, 0), dtype=x.dtype, device=x.device)
    cols = torch.tensor(decimation_matrix(w, degradation, 1), dtype=x.dtype, device=x.device)
    return torch.matmul(torch.matmul(rows, x), cols.T)
