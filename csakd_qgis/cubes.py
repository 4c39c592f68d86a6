"""Loaders for the airborne hyperspectral cubes stored as MATLAB .mat files.

The files live in ``../shared/data/cubes`` (relative to the project root).
Each loader returns ``(cube, wavelengths_nm)`` with ``cube`` float32
(bands, rows, cols) in the file's own units and ``wavelengths_nm`` a
float64 1-D array of band centres (approximate, see each docstring).
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np

__all__ = [
    "default_data_dir",
    "aviris_wavelengths",
    "load_jasper_ridge",
    "load_samson",
    "load_moffett",
]


def default_data_dir() -> Path:
    """``../shared/data`` relative to the project root."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def aviris_wavelengths() -> np.ndarray:
    """Nominal centres of the 224 AVIRIS bands: evenly spaced 380-2500 nm (≈9.5 nm).

    The .mat files carry no wavelengths, only band indices; real AVIRIS
    centres deviate from this grid by a few nm, which is below the band
    width and does not matter for SRF projection.
    """
    return np.linspace(380.0, 2500.0, 224)


def _loadmat(path: Path) -> dict:
    from scipy.io import loadmat

    if not path.is_file():
        raise FileNotFoundError(f"hyperspectral cube not found: {path}")
    return loadmat(str(path))


def _cubes_dir(data_dir) -> Path:
    return (Path(data_dir) if data_dir is not None else default_data_dir()) / "cubes"


def load_jasper_ridge(data_dir=None) -> Tuple[np.ndarray, np.ndarray]:
    """AVIRIS Jasper Ridge, 198 x 100 x 100, raw digital numbers (uint16 as float32).

    ``Y`` (198 x 10000) stores pixels column-major (MATLAB reshape), so the
    image is ``Y.reshape(198, nRow, nCol, order='F')``; with this order the
    water abundance map ``A`` shipped in the file shows the reservoir as one
    connected body.  Values reach about 5000 (``maxValue``).
    Wavelengths: ``SlectBands`` are 1-based indices into the 224 AVIRIS
    bands, mapped onto :func:`aviris_wavelengths` (≈409-2452 nm).
    """
    d = _loadmat(_cubes_dir(data_dir) / "jasperRidge2_R198.mat")
    y = d["Y"]
    rows, cols = int(d["nRow"].squeeze()), int(d["nCol"].squeeze())
    cube = y.reshape(y.shape[0], rows, cols, order="F").astype(np.float32)
    bands = np.asarray(d["SlectBands"]).ravel().astype(np.int64) - 1
    return cube, aviris_wavelengths()[bands]


def load_samson(data_dir=None) -> Tuple[np.ndarray, np.ndarray]:
    """Samson, 156 x 95 x 95, reflectance scaled 0-1.

    ``r_cube`` is stored (rows, cols, bands) and is transposed to
    (bands, rows, cols).  Wavelengths: 401-889 nm evenly spaced over the
    156 bands (≈3.1 nm), as documented for the data set; the file has none.
    """
    d = _loadmat(_cubes_dir(data_dir) / "real_data_samson.mat")
    cube = np.ascontiguousarray(np.transpose(d["r_cube"], (2, 0, 1))).astype(np.float32)
    return cube, np.linspace(401.0, 889.0, cube.shape[0])


def load_moffett(data_dir=None) -> Tuple[np.ndarray, np.ndarray]:
    """AVIRIS Moffett Field, 189 x 50 x 50, reflectance scaled 0-1.

    ``Y`` (189 x 2500) is column-major like Jasper Ridge:
    ``Y.reshape(189, H, W, order='F')``.  Wavelengths: ``selected_bands``
    are 1-based indices into the 224 AVIRIS bands, mapped onto
    :func:`aviris_wavelengths` (≈380-2273 nm; water-vapour bands removed).
    """
    d = _loadmat(_cubes_dir(data_dir) / "Moffett_vca.mat")
    y = d["Y"]
    rows, cols = int(d["H"].squeeze()), int(d["W"].squeeze())
    cube = y.reshape(y.shape[0], rows, cols, order="F").astype(np.float32)
    bands = np.asarray(d["selected_bands"]).ravel().astype(np.int64) - 1
    return cube, aviris_wavelengths()[bands]
