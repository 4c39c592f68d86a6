"""Wald-protocol degradation: simulate an LR-HSI / HR-MSI pair from a cube.

Conventions (see the project's measurement protocol):
images are (bands, rows, cols); low-resolution pixel ``k`` covers HR pixels
``k*s .. k*s+s-1`` and is centred on HR coordinate ``k*s + (s-1)/2``.

Output dtype: float32 if the input cube is float32, float64 otherwise.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np

from .psf import SpatialDegradation, degrade, wald

__all__ = [
    "as_degradation",
    "crop_to_multiple",
    "blur_and_decimate",
    "simulate_msi",
    "add_noise",
    "wald_pair",
]


def as_degradation(degradation: Union[int, SpatialDegradation]) -> SpatialDegradation:
    """A :class:`psf.SpatialDegradation`; an integer scale means the Wald protocol's Gaussian."""
    if isinstance(degradation, SpatialDegradation):
        return degradation
    return wald(int(degradation))


def _out_dtype(a: np.ndarray):
    return np.float32 if a.dtype == np.float32 else np.float64


def _as_cube(cube) -> np.ndarray:
    a = np.asarray(cube)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"expected (bands, rows, cols), got shape {a.shape}")
    return a


def crop_to_multiple(cube, scale: int) -> np.ndarray:
    """Crop rows and cols (from the bottom/right) to multiples of ``scale``."""
    a = _as_cube(cube)
    s = int(scale)
    h, w = (a.shape[1] // s) * s, (a.shape[2] // s) * s
    if h == 0 or w == 0:
        raise ValueError(f"image {a.shape[1:]} is smaller than the scale {s}")
    return a[:, :h, :w]


def blur_and_decimate(cube, degradation: Union[int, SpatialDegradation]) -> np.ndarray:
    """Low-resolution image of ``cube`` (B, H, W) under ``degradation`` (a
    :class:`psf.SpatialDegradation`, or an integer scale for the Wald protocol's Gaussian).

    Rows/cols are first cropped to multiples of the scale; each axis is then blurred with the
    PSF and sampled at the footprint centres ``k*s + (s-1)/2 + offset``, as one matrix product
    per axis. Borders: half-sample symmetric. Returns (B, H//s, W//s); float32 for float32
    input, float64 otherwise. Raises ValueError for an image smaller than the scale.
    """
    d = as_degradation(degradation)
    a = crop_to_multiple(cube, d.scale)
    return degrade(a.astype(_out_dtype(a), copy=False), d)


def simulate_msi(cube, response_matrix) -> np.ndarray:
    """Project a (B, H, W) cube through an (M, B) response matrix to (M, H, W)."""
    a = _as_cube(cube)
    r = np.asarray(response_matrix)
    if r.ndim != 2 or r.shape[1] != a.shape[0]:
        raise ValueError(
            f"response matrix {r.shape} does not match a cube with {a.shape[0]} bands"
        )
    dt = _out_dtype(a)
    return np.tensordot(r.astype(dt), a.astype(dt, copy=False), axes=(1, 0))


def _rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def add_noise(image, snr_db: float, rng=None) -> np.ndarray:
    """Add white Gaussian noise at ``snr_db`` per band.

    SNR is defined per band as 10·log10(mean(signal²) / σ²), where the mean
    runs over that band's pixels, so σ_b = sqrt(mean(X_b²) / 10^(snr/10)).
    ``rng`` is a numpy Generator or a seed (None: unseeded).  Returns
    float32 for float32 input, float64 otherwise.
    """
    a = _as_cube(image)
    dt = _out_dtype(a)
    g = _rng(rng)
    power = np.mean(np.square(a, dtype=np.float64), axis=(1, 2))
    sd = np.sqrt(power / 10.0 ** (float(snr_db) / 10.0))
    noise = g.standard_normal(a.shape) * sd[:, None, None]
    return (a.astype(np.float64) + noise).astype(dt)


def wald_pair(
    cube,
    degradation: Union[int, SpatialDegradation],
    response_matrix,
    rng=None,
    hsi_snr_db: Optional[float] = None,
    msi_snr_db: Optional[float] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lr_hsi, hr_msi, reference) for a Wald-protocol experiment.

    ``reference`` is ``cube`` cropped to multiples of the scale; ``lr_hsi``
    is its :func:`blur_and_decimate` under ``degradation`` (any PSF and offset), ``hr_msi`` its
    projection through ``response_matrix`` (M x B).  Optional white noise
    at the given SNRs (see :func:`add_noise`).  ``rng`` None means a
    generator seeded with 0, so repeated runs give identical pairs.
    """
    degradation = as_degradation(degradation)
    ref = crop_to_multiple(cube, degradation.scale)
    dt = _out_dtype(ref)
    ref = ref.astype(dt, copy=False)
    g = np.random.default_rng(0) if rng is None else _rng(rng)
    lr = blur_and_decimate(ref, degradation)
    msi = simulate_msi(ref, response_matrix)
    if hsi_snr_db is not None:
        lr = add_noise(lr, hsi_snr_db, g)
    if msi_snr_db is not None:
        msi = add_noise(msi, msi_snr_db, g)
    return lr, msi, ref
