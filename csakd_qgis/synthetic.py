"""The embedded default scene: a generated, georeferenced LR-HSI + HR-MSI pair.

Used by the demo when the real data (../shared/data) is not beside the project. Five
materials with smooth, plausible reflectance spectra are mixed by abundance maps that have
both smooth fields and sharp edges (blocks and roads), so fusion has real detail to recover.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np

from .degradation import blur_and_decimate

CRS = "EPSG:32633"
ORIGIN = (383_000.0, 5_818_000.0)  # upper-left corner, UTM 33N (Berlin)
MSI_CENTRES_NM = (490.0, 560.0, 665.0, 842.0)  # Sentinel-2 B2, B3, B4, B8
MSI_FWHM_NM = (66.0, 36.0, 31.0, 106.0)


def signature_mixture(rng: np.random.Generator, bands: int, signatures: int, rows: int, cols: int) -> np.ndarray:
    """(bands, rows, cols) float64 spectra of ``signatures`` random spectral signatures mixed at
    random (draws: the signatures first, then the abundances), for timing and tests. Unlike
    uniform noise, whose components all lie below its own noise (model.signal_subspace_dimension),
    such a scene keeps ``signatures`` components to sharpen."""
    return np.einsum("bj,jhw->bhw", rng.random((bands, signatures)), rng.random((signatures, rows, cols)))


def _spectra(wavelengths: np.ndarray) -> np.ndarray:
    w = wavelengths / 1000.0

    def bump(centre, width, height):
        return height * np.exp(-0.5 * ((w - centre) / width) ** 2)

    vegetation = 0.04 + bump(0.55, 0.03, 0.05) + 0.45 / (1 + np.exp(-(w - 0.72) / 0.012)) - bump(1.45, 0.06, 0.2) - bump(1.95, 0.08, 0.25)
    soil = 0.08 + 0.25 * (w - 0.4) / 2.0 + bump(1.7, 0.3, 0.08) - bump(2.2, 0.04, 0.05)
    water = 0.06 * np.exp(-(w - 0.4) / 0.15) + 0.01
    concrete = 0.25 + 0.05 * np.sin(3 * w) - bump(1.4, 0.05, 0.05)
    roof = 0.1 + 0.2 / (1 + np.exp(-(w - 0.6) / 0.03)) + bump(2.0, 0.3, 0.05)
    return np.clip(np.stack([vegetation, soil, water, concrete, roof]), 0.005, 1.0)


def _abundances(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    smooth = np.stack([gaussian_filter(rng.random((rows, cols)), 12) for _ in range(5)])
    smooth = (smooth - smooth.min(axis=(1, 2), keepdims=True)) * 8
    for _ in range(25):  # buildings: sharp roof blocks
        r, c = rng.integers(0, rows - 12), rng.integers(0, cols - 12)
        h, w = rng.integers(4, 12, size=2)
        smooth[:, r : r + h, c : c + w] = 0
        smooth[4, r : r + h, c : c + w] = 5
    for _ in range(4):  # roads: one-to-two-pixel concrete lines
        if rng.random() < 0.5:
            r = rng.integers(0, rows)
            smooth[:, r : r + 2, :] = 0
            smooth[3, r : r + 2, :] = 5
        else:
            c = rng.integers(0, cols)
            smooth[:, :, c : c + 2] = 0
            smooth[3, :, c : c + 2] = 5
    river = np.abs(np.arange(cols)[None, :] - (cols * 0.7 + 10 * np.sin(np.arange(rows)[:, None] / 15))) < 4
    smooth[:, river] = 0
    smooth[2, river] = 5
    return smooth / smooth.sum(0, keepdims=True)


def generate_scene(rows: int = 240, cols: int = 240, bands: int = 96, scale: int = 4, seed: int = 7) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(reference HR-HSI, LR-HSI, HR-MSI, wavelengths nm); reflectance × 10000 as float32."""
    rng = np.random.default_rng(seed)
    wavelengths = np.linspace(420.0, 2400.0, bands)
    reference = np.einsum("mb,mhw->bhw", _spectra(wavelengths), _abundances(rows, cols, rng)).astype(np.float32) * 10000
    centres = np.array(MSI_CENTRES_NM)[:, None]
    sigma = np.array(MSI_FWHM_NM)[:, None] / 2.355
    response = np.exp(-0.5 * ((wavelengths[None, :] - centres) / sigma) ** 2)
    response /= response.sum(1, keepdims=True)
    msi = np.einsum("mb,bhw->mhw", response, reference).astype(np.float32)
    lr = blur_and_decimate(reference, scale).astype(np.float32)
    return reference, lr, msi, wavelengths


def write_scene(folder: Path, pixel_m: float = 10.0, scale: int = 4) -> Tuple[Path, Path]:
    """Write the pair as GeoTIFFs (wavelength metadata on the HSI); returns (lr_path, hr_path)."""
    import rasterio
    from rasterio.transform import from_origin

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _, lr, msi, wavelengths = generate_scene(scale=scale)
    lr_path, hr_path = folder / "synthetic_lr_hsi.tif", folder / "synthetic_hr_msi.tif"
    for path, data, pixel in ((lr_path, lr, pixel_m * scale), (hr_path, msi, pixel_m)):
        profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype="float32",
                       crs=CRS, transform=from_origin(*ORIGIN, pixel, pixel), tiled=True, compress="deflate")
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
            if data is lr:
                for band, wavelength in enumerate(wavelengths, start=1):
                    dst.update_tags(band, wavelength=f"{wavelength:.2f}", wavelength_units="Nanometers")
            else:
                for band, centre in enumerate(MSI_CENTRES_NM, start=1):
                    dst.update_tags(band, wavelength=f"{centre:.1f}", wavelength_units="Nanometers")
    return lr_path, hr_path
