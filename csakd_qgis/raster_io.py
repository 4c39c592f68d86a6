"""Raster reading and writing with spectral metadata (rasterio; no QGIS).

Wavelengths (and FWHM, gain/offset, bad bands) are looked for where the common products and
tools put them, in this order:

1. per-band GDAL metadata ``wavelength`` (+ ``wavelength_units``, ``fwhm``, ``bbl``), as
   EnMAP-Box and GDAL's ENVI driver write;
2. GDAL's ``IMAGERY`` band domain (``CENTRAL_WAVELENGTH_UM``, ``FWHM_UM``, GDAL ≥ 3.10);
3. the ENVI header's ``wavelength``/``fwhm``/``bbl`` lists (``ENVI`` domain);
4. a netCDF/HDF5 wavelength dimension (GDAL's per-band ``NETCDF_DIM_<name>`` with
   ``<name>#units``), and the sensors' own attributes: PRISMA's ``List_Cw_Vnir``/``List_Cw_Swir``
   (+ ``List_Fwhm_*``), EMIT's ``wavelengths``/``fwhm``/``good_wavelengths``;
5. an EnMAP L1B/L1C/L2A ``METADATA.XML`` beside a ``…SPECTRAL_IMAGE.TIF``
   (``bandCharacterisation/bandID``: ``wavelengthCenterOfBand``, ``FWHMOfBand``, ``GainOfBand``,
   ``OffsetOfBand``);
6. band names: ``band 7 (0.4554 Micrometers)``, ``443.0 nm``, ``0.44300`` (GDAL's name for an
   ENVI band without wavelength units), ``B1 443nm``, ``Rrs_443``.

A value without a unit is taken as micrometres when all are below 30, as nanometres
otherwise (reflective sensors span about 0.35–2.5 µm). Everything is returned in nanometres.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

UNIT_TO_NM = {
    "nanometers": 1.0, "nanometer": 1.0, "nanometres": 1.0, "nanometre": 1.0, "nm": 1.0,
    "micrometers": 1000.0, "micrometer": 1000.0, "micrometres": 1000.0, "micrometre": 1000.0,
    "microns": 1000.0, "micron": 1000.0, "um": 1000.0, "µm": 1000.0, "μm": 1000.0,
    "millimeters": 1e6, "mm": 1e6,
}
_NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
_DESCRIPTION_WAVELENGTH = re.compile(r"\(\s*" + _NUMBER + r"\s*([A-Za-zµμ]+)\s*\)")
_NUMBER_WITH_UNIT = re.compile(
    _NUMBER + r"\s*(nanomet(?:er|re)s?|nm|micromet(?:er|re)s?|microns?|um|µm|μm)(?![A-Za-z])", re.IGNORECASE
)
_LAST_NUMBER = re.compile(_NUMBER + r"(?!.*[0-9])")
# Plausible band centres of an imaging spectrometer, nm (UV to thermal infrared).
WAVELENGTH_RANGE_NM = (200.0, 20000.0)
SEARCHED = (
    "band metadata (wavelength), the IMAGERY domain, the ENVI header, a netCDF/HDF5 wavelength dimension or "
    "PRISMA/EMIT attributes, an EnMAP METADATA.XML beside the image, band names"
)


@dataclass
class SpectralMetadata:
    wavelengths_nm: Optional[np.ndarray] = None  # (B,) or None when unknown
    fwhm_nm: Optional[np.ndarray] = None
    bad_bands: Optional[np.ndarray] = None  # (B,) bool, True = band flagged bad (bbl = 0)
    band_names: List[str] = field(default_factory=list)
    # Where the wavelengths were found (one of the places listed in this module's docstring).
    source: Optional[str] = None
    # (B,) gain and offset of a metadata file beside the image (EnMAP's METADATA.XML), to be
    # applied as GDAL's scale and offset when the raster itself carries none; None otherwise.
    scales: Optional[np.ndarray] = None
    offsets: Optional[np.ndarray] = None


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


def _floats(values, count: int) -> Optional[np.ndarray]:
    """``values`` as (count,) floats, or None when there are not exactly ``count`` numbers."""
    try:
        array = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return array if len(array) == count and np.isfinite(array).all() else None


def _plausible(wavelengths_nm: Optional[np.ndarray]) -> bool:
    low, high = WAVELENGTH_RANGE_NM
    return wavelengths_nm is not None and bool(((wavelengths_nm >= low) & (wavelengths_nm <= high)).all())


@dataclass
class _Found:
    wavelengths: np.ndarray
    unit: Optional[str]
    source: str
    fwhm: Optional[np.ndarray] = None
    bad_bands: Optional[np.ndarray] = None
    scales: Optional[np.ndarray] = None
    offsets: Optional[np.ndarray] = None


def _from_band_metadata(dataset, count):
    band_tags = [dataset.tags(i + 1) for i in range(count)]
    if not all("wavelength" in t for t in band_tags):
        return None
    wavelengths = _floats([t["wavelength"] for t in band_tags], count)
    if wavelengths is None:
        return None
    unit = band_tags[0].get("wavelength_units") or dataset.tags().get("wavelength_units")
    return _Found(wavelengths, unit, "band metadata")


def _from_imagery_domain(dataset, count):
    band_tags = [dataset.tags(i + 1, ns="IMAGERY") for i in range(count)]
    if not all("CENTRAL_WAVELENGTH_UM" in t for t in band_tags):
        return None
    wavelengths = _floats([t["CENTRAL_WAVELENGTH_UM"] for t in band_tags], count)
    if wavelengths is None:
        return None
    fwhm = _floats([t["FWHM_UM"] for t in band_tags], count) if all("FWHM_UM" in t for t in band_tags) else None
    return _Found(wavelengths, "um", "the IMAGERY metadata domain", fwhm)


def _from_envi_header(dataset, count):
    envi = dataset.tags(ns="ENVI") if "ENVI" in (dataset.tag_namespaces() or []) else {}
    wavelengths = _floats(_parse_envi_list(envi.get("wavelength")) or [], count)
    if wavelengths is None:
        return None
    return _Found(wavelengths, envi.get("wavelength_units"), "the ENVI header")


def _from_netcdf_dimension(dataset, count):
    """GDAL's netCDF and HDF5 drivers name each band's position along the extra dimension in
    ``NETCDF_DIM_<name>`` (the coordinate variable's value) and give ``<name>#units``."""
    band_tags = [dataset.tags(i + 1) for i in range(count)]
    dataset_tags = dataset.tags()
    for key in band_tags[0]:
        name = key[len("NETCDF_DIM_"):] if key.startswith("NETCDF_DIM_") else None
        if not name or not re.search(r"wave|lambda|wl$", name, re.IGNORECASE):
            continue
        if not all(key in t for t in band_tags):
            continue
        wavelengths = _floats([t[key] for t in band_tags], count)
        if wavelengths is not None:
            unit = dataset_tags.get(f"{name}#units") or dataset_tags.get(f"{name}#unit")
            return _Found(wavelengths, unit, f"the netCDF/HDF5 dimension '{name}'")
    return None


def _attribute(tags: dict, name: str) -> Optional[str]:
    """A dataset attribute by name, wherever GDAL's HDF5/netCDF drivers put it: alone, or
    after a group or variable path ending in '#', '/' or EMIT's 'sensor_band_parameters_'."""
    wanted = name.lower()
    for key, value in tags.items():
        key = key.lower()
        if key == wanted or key.endswith(("#" + wanted, "/" + wanted, "sensor_band_parameters_" + wanted)):
            return value
    return None


def _numbers(text: Optional[str]) -> List[str]:
    return re.findall(r"[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?", text or "")


def _from_sensor_attributes(dataset, count):
    """PRISMA (root attributes List_Cw_Vnir/List_Cw_Swir, nm; a cube holds one of the two
    ranges, or both in that order) and EMIT (wavelengths, fwhm, good_wavelengths, nm)."""
    tags = dataset.tags()
    vnir, swir = _numbers(_attribute(tags, "List_Cw_Vnir")), _numbers(_attribute(tags, "List_Cw_Swir"))
    fwhm_vnir, fwhm_swir = _numbers(_attribute(tags, "List_Fwhm_Vnir")), _numbers(_attribute(tags, "List_Fwhm_Swir"))
    for centres, widths in ((vnir, fwhm_vnir), (swir, fwhm_swir), (vnir + swir, fwhm_vnir + fwhm_swir)):
        wavelengths = _floats(centres, count)
        if wavelengths is not None and (wavelengths > 0).all():
            return _Found(wavelengths, "nm", "PRISMA's attributes", _floats(widths, count))
    wavelengths = _floats(_numbers(_attribute(tags, "wavelengths")), count)
    if wavelengths is not None:
        good = _floats(_numbers(_attribute(tags, "good_wavelengths")), count)
        return _Found(
            wavelengths, "nm", "EMIT's attributes", _floats(_numbers(_attribute(tags, "fwhm")), count),
            None if good is None else good == 0,
        )
    return None


def enmap_metadata_xml(image_path) -> Optional[Path]:
    """The METADATA.XML of an EnMAP product beside its ``…SPECTRAL_IMAGE.TIF`` (or None)."""
    path = Path(str(image_path))
    match = re.match(r"(.*)SPECTRAL_IMAGE(?:_[A-Z]+)?\.[A-Za-z]+$", path.name, re.IGNORECASE)
    if not match or not path.parent.is_dir():
        return None
    candidates = [path.parent / f"{match.group(1)}METADATA.XML", path.parent / f"{match.group(1)}metadata.xml"]
    candidates += sorted(p for p in path.parent.iterdir() if p.name.upper().endswith("METADATA.XML"))
    return next((p for p in candidates if p.is_file()), None)


def _from_enmap_xml(dataset, count):
    xml_path = enmap_metadata_xml(dataset.name)
    if xml_path is None:
        return None
    try:
        root = ElementTree.parse(xml_path).getroot()
    except (ElementTree.ParseError, OSError):
        return None
    bands = root.findall(".//bandCharacterisation/bandID")
    if len(bands) != count:
        return None

    def column(tag):
        return _floats([band.findtext(tag) for band in bands], count)

    wavelengths = column("wavelengthCenterOfBand")
    if wavelengths is None:
        return None
    return _Found(wavelengths, "nm", f"the EnMAP metadata file {xml_path.name}", column("FWHMOfBand"),
                  scales=column("GainOfBand"), offsets=column("OffsetOfBand"))


def parse_wavelength_name(name: str):
    """(value, unit or None) of a wavelength written in a band name, or None: ``… (0.4430
    Micrometers)``, a number with a unit (``443.0 nm``, ``B1 443nm``), else the last number
    of the name (``0.44300``, ``Rrs_443``)."""
    for pattern in (_DESCRIPTION_WAVELENGTH, _NUMBER_WITH_UNIT):
        match = pattern.search(name or "")
        if match and (pattern is _NUMBER_WITH_UNIT or match.group(2).lower() in UNIT_TO_NM):
            return float(match.group(1)), match.group(2)
    match = _LAST_NUMBER.search(name or "")
    return (float(match.group(1)), None) if match else None


def _from_band_names(dataset, count):
    parsed = [parse_wavelength_name(d or "") for d in dataset.descriptions]
    if not all(parsed):
        return None
    values = np.array([p[0] for p in parsed])
    units = {p[1].lower() for p in parsed if p[1]}
    # Band numbers are not wavelengths: "Band 1" … "Band 30".
    if len(units) > 1 or np.array_equal(values, np.arange(1, count + 1)) or len(np.unique(values)) < count:
        return None
    return _Found(values, units.pop() if units else None, "band names")


def _fwhm_anywhere(dataset, count) -> Optional[np.ndarray]:
    """FWHM from per-band metadata or the ENVI header, for wavelengths found elsewhere (GDAL's
    ENVI driver puts the wavelengths on the bands but leaves the FWHM in the header), in the
    wavelengths' unit."""
    band_tags = [dataset.tags(i + 1) for i in range(count)]
    if all("fwhm" in t for t in band_tags):
        return _floats([t["fwhm"] for t in band_tags], count)
    envi = dataset.tags(ns="ENVI") if "ENVI" in (dataset.tag_namespaces() or []) else {}
    return _floats(_parse_envi_list(envi.get("fwhm")) or [], count)


_READERS = (
    _from_band_metadata, _from_imagery_domain, _from_envi_header, _from_netcdf_dimension, _from_sensor_attributes,
    _from_enmap_xml, _from_band_names,
)


def read_spectral_metadata(dataset) -> SpectralMetadata:
    """Wavelengths, FWHM, bad-band list (and an external gain/offset) of an open rasterio
    dataset, from the first of the places in this module's docstring that gives one
    plausible wavelength (200–20 000 nm) per band; ``wavelengths_nm`` is None when none does."""
    count = dataset.count
    meta = SpectralMetadata(band_names=[d or f"band {i + 1}" for i, d in enumerate(dataset.descriptions)])
    for reader in _READERS:
        found = reader(dataset, count)
        if found is None:
            continue
        factor = _unit_factor(found.unit, found.wavelengths)
        if not _plausible(found.wavelengths * factor):
            continue
        meta.wavelengths_nm = found.wavelengths * factor
        fwhm = found.fwhm if found.fwhm is not None else _fwhm_anywhere(dataset, count)
        meta.fwhm_nm = None if fwhm is None else fwhm * factor
        meta.source = found.source
        meta.bad_bands = found.bad_bands
        if found.scales is not None and found.offsets is not None:
            meta.scales, meta.offsets = found.scales, found.offsets
        break
    band_tags = [dataset.tags(i + 1) for i in range(count)]
    envi = dataset.tags(ns="ENVI") if "ENVI" in (dataset.tag_namespaces() or []) else {}
    if all("bbl" in t for t in band_tags):
        meta.bad_bands = np.array([float(t["bbl"]) == 0 for t in band_tags])
    elif envi.get("bbl"):
        values = _floats(_parse_envi_list(envi["bbl"]) or [], count)
        if values is not None:
            meta.bad_bands = values == 0
    return meta


def missing_wavelengths_warning(dataset) -> str:
    """The log line for a hyperspectral image in which no wavelengths were found."""
    hint = ""
    if re.search(r"SPECTRAL_IMAGE", Path(str(dataset.name)).name, re.IGNORECASE):
        hint = " For an EnMAP product keep its METADATA.XML beside the SPECTRAL_IMAGE file (or import it with EnMAP-Box)."
    return (
        f"warning: no wavelengths found in the hyperspectral image {dataset.name} (looked in {SEARCHED}); the output "
        "will have no wavelengths and no true-colour rendering. Give each band a 'wavelength' (and "
        "'wavelength_units') metadata item, or name the bands by wavelength (e.g. '443.0 nm')." + hint
    )


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
