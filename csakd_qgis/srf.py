"""Spectral response functions (SRF) of multispectral sensors.

The CSV files in ``../shared/data/srf`` (relative to the project root) hold
one sensor each: a ``#`` source note, a header ``wavelength_nm,<band>,...``
and one row per wavelength.  Hyperspectral band tables (``enmap.csv`` etc.,
header ``wavelength,fwhm``) live in the same folder but are not SRFs.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "SensorResponse",
    "default_srf_dir",
    "load_srf",
    "list_sensors",
    "spectral_response_matrix",
]

_SRF_HEADER = "wavelength_nm"

# numpy 2 renamed trapz; the Debian numpy 1.24 only has the old name.
_trapz = getattr(np, "trapezoid", None) or np.trapz


def default_srf_dir() -> Path:
    """``../shared/data/srf`` relative to the project root."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "srf"


@dataclass
class SensorResponse:
    """Sampled spectral responses of one sensor.

    ``responses`` has shape (n_wavelengths, n_bands); column ``j`` belongs
    to ``band_names[j]``.  Values are as stored in the file (usually
    peak-normalised); only their shape matters once normalised to sum 1.
    """

    name: str
    band_names: List[str]
    wavelengths_nm: np.ndarray
    responses: np.ndarray
    note: str = field(default="", repr=False)

    def __post_init__(self):
        self.band_names = list(self.band_names)
        self.wavelengths_nm = np.asarray(self.wavelengths_nm, dtype=np.float64)
        self.responses = np.asarray(self.responses, dtype=np.float64)
        if self.responses.ndim != 2 or self.responses.shape != (
            self.wavelengths_nm.size,
            len(self.band_names),
        ):
            raise ValueError(
                f"responses shape {self.responses.shape} does not match "
                f"{self.wavelengths_nm.size} wavelengths x {len(self.band_names)} bands"
            )

    def subset(self, band_names: Sequence[str]) -> "SensorResponse":
        """New SensorResponse with only ``band_names``, in the order given."""
        if isinstance(band_names, str):
            band_names = [band_names]
        missing = [b for b in band_names if b not in self.band_names]
        if missing:
            raise KeyError(
                f"{self.name}: unknown band(s) {missing}; available: {self.band_names}"
            )
        idx = [self.band_names.index(b) for b in band_names]
        return SensorResponse(
            name=self.name,
            band_names=[self.band_names[i] for i in idx],
            wavelengths_nm=self.wavelengths_nm.copy(),
            responses=self.responses[:, idx].copy(),
            note=self.note,
        )


def _unique_names(names: Sequence[str]) -> List[str]:
    # Landsat OLI's file names both SWIR columns "Shortwave Infrared"; subset()
    # selects by name, so repeated names get a 1-based suffix.
    names = [n.strip() for n in names]
    out = []
    for n in names:
        if names.count(n) > 1:
            out.append(f"{n} {sum(1 for m in out if m.startswith(n + ' ')) + 1}")
        else:
            out.append(n)
    return out


def _read_header(path: Path) -> Tuple[str, Optional[List[str]], int]:
    """(note, header fields, number of lines before the data)."""
    note = []
    with open(path, newline="", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            s = line.strip()
            if not s:
                continue
            if s.startswith("#"):
                note.append(s.lstrip("#").strip())
                continue
            return " ".join(note), next(csv.reader([s])), i + 1
    return " ".join(note), None, 0


def _resolve(name_or_path: Union[str, Path], srf_dir) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    d = Path(srf_dir) if srf_dir is not None else default_srf_dir()
    for cand in (d / p.name, d / (p.name + ".csv")):
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"no SRF file '{name_or_path}' (looked in {d}); known sensors: "
        f"{list_sensors(d) if d.is_dir() else []}"
    )


def load_srf(name_or_path: Union[str, Path], srf_dir=None) -> SensorResponse:
    """Read one sensor's SRF CSV.

    ``name_or_path`` is a file path or a file stem such as
    ``"sentinel2a_msi_srf"`` looked up in ``srf_dir`` (default
    :func:`default_srf_dir`).
    """
    path = _resolve(name_or_path, srf_dir)
    note, header, skip = _read_header(path)
    if not header or header[0].strip() != _SRF_HEADER:
        raise ValueError(
            f"{path.name}: not a sensor SRF table (header must start with "
            f"'{_SRF_HEADER}', got {header[:2] if header else None})"
        )
    data = np.loadtxt(path, delimiter=",", skiprows=skip, comments="#", ndmin=2)
    if data.shape[1] != len(header):
        raise ValueError(
            f"{path.name}: {data.shape[1]} columns but {len(header)} header fields"
        )
    order = np.argsort(data[:, 0], kind="stable")
    data = data[order]
    return SensorResponse(
        name=path.stem,
        band_names=_unique_names(header[1:]),
        wavelengths_nm=data[:, 0],
        responses=np.clip(data[:, 1:], 0.0, None),
        note=note,
    )


def list_sensors(srf_dir=None) -> List[str]:
    """File stems of the multispectral SRF tables in ``srf_dir`` (sorted)."""
    d = Path(srf_dir) if srf_dir is not None else default_srf_dir()
    out = []
    for p in sorted(d.glob("*.csv")):
        try:
            _, header, _ = _read_header(p)
        except (OSError, UnicodeDecodeError):
            continue
        if header and header[0].strip() == _SRF_HEADER:
            out.append(p.stem)
    return out


def spectral_response_matrix(
    srf: SensorResponse,
    band_centres_nm,
    min_coverage: float = 0.5,
) -> Tuple[np.ndarray, List[str]]:
    """Matrix R (M x B, float64) mapping a B-band cube to M sensor bands.

    Each sensor band's SRF is linearly interpolated at the cube's band
    centres (zero outside the SRF table) and the row normalised to sum 1,
    so a spectrally flat scene keeps its value.

    A sensor band is dropped when less than ``min_coverage`` of its response
    integral (trapezoid over the SRF's own wavelength grid) falls inside
    [min(centres), max(centres)]: the cube cannot represent it (e.g.
    Sentinel-2 SWIR bands for a cube ending at 900 nm).  Bands whose sampled
    weights are all zero (SRF narrower than the cube's band spacing and
    falling between centres) are dropped too.

    Returns (R, kept_band_names).  Raises ValueError if no band is left.
    """
    centres = np.asarray(band_centres_nm, dtype=np.float64).ravel()
    if centres.size == 0 or not np.all(np.isfinite(centres)):
        raise ValueError("band_centres_nm must be a non-empty array of finite values")
    lo, hi = centres.min(), centres.max()
    wl = srf.wavelengths_nm
    inside = (wl >= lo) & (wl <= hi)

    rows, kept = [], []
    for j, name in enumerate(srf.band_names):
        r = srf.responses[:, j]
        total = _trapz(r, wl)
        if total <= 0:
            continue
        # Clip the SRF to the cube range (with the end points interpolated)
        # so the coverage does not depend on where the SRF grid falls.
        grid = np.concatenate(([lo], wl[inside], [hi]))
        within = _trapz(np.interp(grid, wl, r, left=0.0, right=0.0), grid)
        if within / total < min_coverage:
            continue
        w = np.interp(centres, wl, r, left=0.0, right=0.0)
        s = w.sum()
        if s <= 0:
            continue
        rows.append(w / s)
        kept.append(name)
    if not rows:
        raise ValueError(
            f"{srf.name}: no band has at least {min_coverage:.0%} of its response "
            f"inside the cube's wavelength range {lo:.0f}-{hi:.0f} nm"
        )
    return np.vstack(rows), kept


def linear_resampling_matrix(source_nm: np.ndarray, target_nm: np.ndarray, reach_nm: float = 25.0) -> np.ndarray:
    """(T, S) matrix that resamples a spectrum sampled at ``source_nm`` (S,) onto ``target_nm``
    (T,) by linear interpolation in wavelength: row t weighs the two source samples nearest
    around target_nm[t]. The source need not be sorted: imaging spectrometers with two
    detectors (EnMAP's VNIR and SWIR overlap between about 900 and 1000 nm) list their bands by
    detector. Targets more than ``reach_nm`` beyond the source's range get a zero row (the
    spectrum is not known there); targets within it but beyond the end take the end sample.
    Raises ValueError for an empty or non-finite ``source_nm``.
    """
    source = np.asarray(source_nm, dtype=np.float64)
    target = np.asarray(target_nm, dtype=np.float64)
    if source.ndim != 1 or source.size == 0 or not np.isfinite(source).all():
        raise ValueError("source wavelengths must be a non-empty sequence of finite numbers")
    order = np.argsort(source, kind="stable")
    ordered = source[order]
    matrix = np.zeros((target.size, source.size))
    covered = (target >= ordered[0] - reach_nm) & (target <= ordered[-1] + reach_nm)
    for t in np.flatnonzero(covered):
        x = target[t]
        if x <= ordered[0]:
            matrix[t, order[0]] = 1.0
        elif x >= ordered[-1]:
            matrix[t, order[-1]] = 1.0
        else:
            j = int(np.searchsorted(ordered, x, side="right"))
            gap = ordered[j] - ordered[j - 1]
            w = (x - ordered[j - 1]) / gap if gap > 0 else 0.5
            matrix[t, order[j - 1]] += 1.0 - w
            matrix[t, order[j]] += w
    return matrix
