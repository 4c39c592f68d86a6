"""Raster reading and writing with spectral metadata (rasterio; no QGIS).

Wavelengths are looked for where the usual tools put them: per-band GDAL metadata
(``wavelength`` + ``wavelength_units``, as EnMAP-Box writes), the ENVI header's
``wavelength`` list, and band descriptions such as ``band 7 (0.4554 Micrometers)``.
Everything is returned in nanometres.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

UNIT_TO_NM = {
    "nanometers": 1.0, "nanometer": 1.0, "nm": 1.0,
    "micrometers": 1000.0, "micrometer": 1000.0, "microns": 1000.0, "um": 1000.0, "µm": 1000.0,
    "millimeters": 1e6, "mm": 1e6,
}
_DESCRIPTION_WAVELENGTH = re.compile(r"\(\s*([0-9.]+)\s*([A-Za-zµ]+)\s*\)")


@dataclass
class SpectralMetadata:
    wavelengths_nm: Optional[np.ndarray] = None  # (B,) or None when unknown
    fwhm_nm: Optional[np.ndarray] = None
    bad_bands: Optional[np.ndarray] = None  # (B,) bool, True = band flagged bad (bbl = 0)
    band_names: List[str] = field(default_factory=list)


def _unit_factor(unit: Optional[str], values: np.ndarray) -> float:
    if unit:
        factor = UNIT_TO_NM.get(unit.strip().lower())
        if factor:
            return factor
    # No usable unit: guess from the magnitude (reflective sensors span ~0.35–2.5 µm).
    return 1000.0 if np.nanmax(values) < 30 else 1.0


def _parse_envi_list(text: Optional[str]) -> Optional[List[str]]:
    if not text:
        return None
    return [item.strip() for item in text.strip().strip("{}").split(",") if item.strip()]


def read_spectral_metadata(dataset) -> SpectralMetadata:
    """Wavelengths, FWHM and bad-band list of an open rasterio dataset."""
    count = dataset.count
    meta = SpectralMetadata(band_names=[d or f"band {i + 1}" for i, d in enumerate(dataset.descriptions)])
    band_tags = [dataset.tags(i + 1) for i in range(count)]
    envi = dataset.tags(ns="ENVI") if "ENVI" in (dataset.tag_namespaces() or []) else {}
    dataset_tags = dataset.tags()

    wavelengths = None
    unit = None
    if all("wavelength" in t for t in band_tags):
        wavelengths = np.array([float(t["wavelength"]) for t in band_tags])
        unit = band_tags[0].get("wavelength_units") or dataset_tags.get("wavelength_units")
    elif envi.get("wavelength"):
        values = _parse_envi_list(envi["wavelength"])
        if values and len(values) == count:
            wavelengths = np.array([float(v) for v in values])
            unit = envi.get("wavelength_units")
    if wavelengths is None:
        matches = [_DESCRIPTION_WAVELENGTH.search(d or "") for d in dataset.descriptions]
        if all(matches):
            wavelengths = np.array([float(m.group(1)) for m in matches])
            unit = matches[0].group(2)
    if wavelengths is not None:
        factor = _unit_factor(unit, wavelengths)
        meta.wavelengths_nm = wavelengths * factor
        fwhm = None
        if all("fwhm" in t for t in band_tags):
            fwhm = np.array([float(t["fwhm"]) for t in band_tags])
        elif envi.get("fwhm"):
            values = _parse_envi_list(envi["fwhm"])
            if values and len(values) == count:
                fwhm = np.array([float(v) for v in values])
        if fwhm is not None:
            meta.fwhm_nm = fwhm * factor
    if all("bbl" in t for t in band_tags):
        meta.bad_bands = np.array([float(t["bbl"]) == 0 for t in band_tags])
    elif envi.get("bbl"):
        values = _parse_envi_list(envi["bbl"])
        if values and len(values) == count:
            meta.bad_bands = np.array([float(v) == 0 for v in values])
    return meta


def read_cube(path, window=None) -> tuple:
    """Read a raster as float32 (B, rows, cols) with nodata as NaN, scale/offset applied.

    Returns (cube, SpectralMetadata, profile).
    """
    import rasterio

    with rasterio.open(path) as dataset:
        data = dataset.read(window=window, masked=True).astype(np.float32)
        cube = data.filled(np.nan)
        scales = np.array(dataset.scales, dtype=np.float32).reshape(-1, 1, 1)
        offsets = np.array(dataset.offsets, dtype=np.float32).reshape(-1, 1, 1)
        cube = cube * scales + offsets
        return cube, read_spectral_metadata(dataset), dataset.profile
