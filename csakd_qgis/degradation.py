"""Wald-protocol degradation: simulate an LR-HSI / HR-MSI pair from a cube.

Conventions (see the project's measurement protocol):
images are (bands, rows, cols); low-resolution pixel ``k`` covers HR pixels
``k*s .. k*s+s-1`` and is centred on HR coordinate ``k*s + (s-1)/2``.

Output dtype: float32 if the input cube is float32, float64 otherwise.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "gaussian_sigma",
    "crop_to_multiple",
    "decimation_matrix",
    "blur_and_decimate",
    "simulate_msi",
    "add_noise",
    "wald_pair",
]


def gaussian_sigma(scale: float) -> float:
    """Blur σ in HR pixels: 0.53·s gives an MTF of about 0.25 at the LR Nyquist frequency."""
    return 0.53 * float(scale)


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


def reflect_index(j: np.ndarray, n: int) -> np.ndarray:
    # Half-sample symmetric reflection (d c b a | a b c d | d c b a),
    # the same as scipy.ndimage mode="reflect".
    period = 2 * n
    j = np.mod(j, period)
    return np.where(j >= n, period - 1 - j, j)


def decimation_matrix(
    n_hr: int, scale: int, sigma: Optional[float] = None, shift: float = 0.0
) -> np.ndarray:
    """(n_hr // scale) x n_hr float64 matrix: Gaussian blur then sampling along one axis.

    Row ``k`` holds the Gaussian weights centred on HR coordinate
    ``k*s + (s-1)/2 + shift``, truncated at 4σ, normalised to sum 1 and
    folded back into the image with reflect borders.  Building the kernel
    from offsets to that exact centre keeps even scales footprint-centred
    (the centre is then a half-pixel position).  ``sigma <= 0`` means no
    blur: linear interpolation at the centre.
    """
    s = int(scale)
    if s < 1:
        raise ValueError("scale must be a positive integer")
    sig = gaussian_sigma(s) if sigma is None else float(sigma)
    n_lr = n_hr // s
    centres = np.arange(n_lr) * s + (s - 1) / 2.0 + float(shift)
    mat = np.zeros((n_lr, n_hr), dtype=np.float64)
    rows = np.arange(n_lr)[:, None]
    if sig > 0:
        radius = int(math.ceil(4.0 * sig)) + 1
        offs = np.arange(-radius, radius + 2)
        taps = np.floor(centres)[:, None].astype(np.int64) + offs[None, :]
        d = taps - centres[:, None]
        w = np.exp(-0.5 * (d / sig) ** 2)
        w[np.abs(d) > 4.0 * sig] = 0.0
    else:
        taps = np.floor(centres)[:, None].astype(np.int64) + np.array([0, 1])[None, :]
        frac = centres - np.floor(centres)
        w = np.stack([1.0 - frac, frac], axis=1)
    w /= w.sum(axis=1, keepdims=True)
    np.add.at(mat, (np.broadcast_to(rows, taps.shape), reflect_index(taps, n_hr)), w)
    return mat


def blur_and_decimate(
    cube,
    scale: int,
    sigma: Optional[float] = None,
    shift: Sequence[float] = (0.0, 0.0),
) -> np.ndarray:
    """Low-resolution image of ``cube`` at integer ``scale`` (Wald protocol).

    Rows/cols are first cropped to multiples of ``scale``; each axis is then
    blurred with a Gaussian (σ = 0.53·scale HR pixels unless ``sigma`` is
    given) and sampled at the footprint centres ``k*s + (s-1)/2``, as one
    matrix product per axis.  ``shift`` = (dy, dx) in HR pixels (sub-pixel
    allowed) moves the sampling centres to simulate misregistration.
    Borders: reflect.  Returns (B, H//s, W//s); float32 for float32 input,
    float64 otherwise.
    """
    a = crop_to_multiple(cube, scale)
    dt = _out_dtype(a)
    dy, dx = (float(v) for v in shift)
    my = decimation_matrix(a.shape[1], scale, sigma, dy).astype(dt)
    mx = decimation_matrix(a.shape[2], scale, sigma, dx).astype(dt)
    a = a.astype(dt, copy=False)
    return np.matmul(np.matmul(my, a), mx.T)


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
    scale: int,
    response_matrix,
    rng=None,
    hsi_snr_db: Optional[float] = None,
    msi_snr_db: Optional[float] = None,
    shift: Sequence[float] = (0.0, 0.0),
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lr_hsi, hr_msi, reference) for a Wald-protocol experiment.

    ``reference`` is ``cube`` cropped to multiples of ``scale``; ``lr_hsi``
    is its :func:`blur_and_decimate` (with ``shift``), ``hr_msi`` its
    projection through ``response_matrix`` (M x B).  Optional white noise
    at the given SNRs (see :func:`add_noise`).  ``rng`` None means a
    generator seeded with 0, so repeated runs give identical pairs.
    """
    ref = crop_to_multiple(cube, scale)
    dt = _out_dtype(ref)
    ref = ref.astype(dt, copy=False)
    g = np.random.default_rng(0) if rng is None else _rng(rng)
    lr = blur_and_decimate(ref, scale, shift=shift)
    msi = simulate_msi(ref, response_matrix)
    if hsi_snr_db is not None:
        lr = add_noise(lr, hsi_snr_db, g)
    if msi_snr_db is not None:
        msi = add_noise(msi, msi_snr_db, g)
    return lr, msi, ref
