"""A true-colour PNG quicklook of a fused GeoTIFF, bands chosen by wavelength."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TRUE_COLOUR_NM = (640.0, 550.0, 470.0)


def nearest_bands(wavelengths_nm, targets=TRUE_COLOUR_NM):
    wavelengths = np.asarray(wavelengths_nm, dtype=float)
    return [int(np.argmin(np.abs(wavelengths - t))) + 1 for t in targets]


def stretch(band: np.ndarray, low: float = 2, high: float = 98) -> np.ndarray:
    finite = band[np.isfinite(band)]
    if finite.size == 0:
        return np.zeros(band.shape, np.uint8)
    lo, hi = np.percentile(finite, [low, high])
    scaled = np.clip((band - lo) / max(hi - lo, 1e-12), 0, 1)
    return np.where(np.isfinite(band), scaled * 254 + 1, 0).astype(np.uint8)


def write_quicklook(geotiff: Path, png: Path, max_size: int = 1024) -> Path:
    """Red/green/blue = bands nearest 640/550/470 nm (first three bands without wavelengths)."""
    import rasterio

    from .raster_io import read_spectral_metadata

    with rasterio.open(geotiff) as dataset:
        meta = read_spectral_metadata(dataset)
        bands = nearest_bands(meta.wavelengths_nm) if meta.wavelengths_nm is not None else [1, 2, 3][: dataset.count]
        factor = max(1, int(np.ceil(max(dataset.width, dataset.height) / max_size)))
        shape = (len(bands), dataset.height // factor, dataset.width // factor)
        data = dataset.read(bands, out_shape=shape, masked=True).astype(np.float32).filled(np.nan)
    rgb = np.stack([stretch(b) for b in data])
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        # A quicklook is a picture, not a map: it has no georeferencing on purpose.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(png, "w", driver="PNG", width=rgb.shape[2], height=rgb.shape[1], count=3, dtype="uint8") as out:
            out.write(rgb)
    Path(str(png) + ".aux.xml").unlink(missing_ok=True)
    return png
