"""Real hyperspectral cubes for training and validation, and Wald-protocol training batches.

The cubes are read in place from ``../shared/data`` (beside the project root). The split is
by region, never by pixel: validation cubes share no ground with any training cube.

* training: EnMAP Potsdam block A and the part of block B west of block C, the simulated
  EnMAP Berlin cube (244 bands), AVIRIS Moffett Field, Samson;
* validation: EnMAP Potsdam block C, HyMap02 Berlin (9 m), AVIRIS Jasper Ridge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import cubes
from .degradation import wald_pair
from .srf import SensorResponse, list_sensors, load_srf, spectral_response_matrix

TRAINING_SCALES = (2, 3, 4, 5, 6, 8, 10)
VALIDATION_SCALES = (3, 4, 8)
# Realistic PSFs every validation cube is also degraded with (see the measurement protocol):
# σ in LR pixels; the anisotropic one with a sub-pixel offset in HR pixels.
VALIDATION_GAUSSIAN_SIGMAS = (0.35, 0.45, 0.65, 0.8)
VALIDATION_ANISOTROPIC = ((0.4, 0.7), (0.5, -0.5))
# Training draws its PSFs from this range, never within TRAINING_PSF_GAP of a validation σ.
TRAINING_SIGMA_RANGE = (0.25, 1.0)
TRAINING_PSF_GAP = 0.02


@dataclass
class HyperspectralCube:
    """One reference cube: (B, rows, cols) float32 with bad and empty bands removed.

    ``wavelengths_nm`` (B,) is None when the band centres are unknown: such a cube is paired
    only with band-group MSIs (:func:`band_group_response`), never with a sensor's SRF.
    ``weight`` scales how often training draws the cube (laboratory scenes are drawn less).
    """

    name: str
    data: np.ndarray
    wavelengths_nm: Optional[np.ndarray]
    weight: float = 1.0


def default_data_dir() -> Path:
    return cubes.default_data_dir()


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the real data is expected in ../shared/data beside the project root"
        )
    return path


def _clean(
    name: str, data: np.ndarray, wavelengths: Optional[np.ndarray], bad: Optional[np.ndarray] = None, weight: float = 1.0
) -> HyperspectralCube:
    """Drop flagged, empty or non-finite bands; the network never sees a band of no-data."""
    keep = np.isfinite(data).all(axis=(1, 2))
    keep[keep] = data[keep].std(axis=(1, 2)) > 0
    if bad is not None:
        keep &= ~bad
    kept_wavelengths = np.asarray(wavelengths)[keep] if wavelengths is not None else None
    return HyperspectralCube(name, np.ascontiguousarray(data[keep], dtype=np.float32), kept_wavelengths, weight)


def _read_raster(path: Path, window=None) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    from .raster_io import read_cube

    cube, meta, _ = read_cube(_require(path), window=window)
    if meta.wavelengths_nm is None:
        raise ValueError(f"{path} has no wavelengths")
    return cube, meta.wavelengths_nm, meta.bad_bands


def load_potsdam_block(letter: str, data_dir=None, columns: Optional[slice] = None) -> HyperspectralCube:
    root = Path(data_dir or default_data_dir()) / "enmap_potsdam"
    matches = sorted(root.glob(f"enmap_potsdam_block{letter}_*.tif"))
    if not matches:
        raise FileNotFoundError(f"EnMAP Potsdam block {letter} not found in {root}")
    data, wavelengths, bad = _read_raster(matches[0])
    if columns is not None:
        data = data[:, :, columns]
    return _clean(f"EnMAP Potsdam block {letter}", data, wavelengths, bad)


def load_berlin(stem: str, label: str, data_dir=None) -> HyperspectralCube:
    data, wavelengths, bad = _read_raster(Path(data_dir or default_data_dir()) / "berlin" / f"{stem}.bsq")
    return _clean(label, data, wavelengths, bad)


def _from_mat(label: str, loader, data_dir=None) -> HyperspectralCube:
    data, wavelengths = loader(data_dir)
    return _clean(label, data, wavelengths)


def training_cubes(data_dir=None) -> List[HyperspectralCube]:
    # Block B overlaps block C (validation) east of x = 366975 m, i.e. from its 65th column.
    return [
        load_potsdam_block("A", data_dir),
        load_potsdam_block("B", data_dir, columns=slice(0, 64)),
        load_berlin("EnMAP_BerlinUrbanGradient_244b_30m", "EnMAP-simulated Berlin (244 bands)", data_dir),
        _from_mat("AVIRIS Moffett Field", cubes.load_moffett, data_dir),
        _from_mat("Samson", cubes.load_samson, data_dir),
    ]


# Laboratory scenes (CAVE: close range, 400–700 nm) are drawn this much less often than an
# Earth-observation cube of the same size: their statistics differ strongly from what users fuse.
LABORATORY_WEIGHT = 0.25


def corpus_cubes(data_dir=None, unknown_wavelengths: bool = True) -> List[HyperspectralCube]:
    """The training corpus (``corpus/`` in the shared data folder; its README gives every cube's
    sensor, source and licence): AVIRIS, HYDICE and ROSIS airborne scenes and CAVE laboratory
    scenes, as GeoTIFFs with per-band ``wavelength`` tags where the centres are known or
    reconstructed, ``wavelength_approx`` where only approximate (used as centres: ROSIS's
    uniform 430–860 nm grid is within a band width of the truth) and none where unknown
    (kept with ``wavelengths_nm`` None when ``unknown_wavelengths``, else left out).
    Values are scaled by the files' GDAL scale factors; NaN bands are dropped.
    Raises FileNotFoundError when the folder is missing.
    """
    import rasterio

    root = _require(Path(data_dir or default_data_dir()) / "corpus")
    found = []
    for path in sorted(root.glob("*.tif")):
        with rasterio.open(path) as dataset:
            data = dataset.read().astype(np.float32) * np.asarray(dataset.scales, dtype=np.float32)[:, None, None]
            tags = [dataset.tags(b) for b in range(1, dataset.count + 1)]
            domain = dataset.tags().get("domain", "")
        for key in ("wavelength", "wavelength_approx"):
            if all(key in t for t in tags):
                wavelengths = np.array([float(t[key]) for t in tags])
                break
        else:
            wavelengths = None
        if wavelengths is None and not unknown_wavelengths:
            continue
        weight = LABORATORY_WEIGHT if "lab" in domain else 1.0
        found.append(_clean(path.stem, data, wavelengths, weight=weight))
    if not found:
        raise FileNotFoundError(f"no cube (*.tif) in {root}")
    return found


def band_group_response(bands: int, rng: np.random.Generator) -> Tuple[np.ndarray, str]:
    """An MSI made from groups of neighbouring bands, for cubes whose band centres are unknown:
    3–8 bands, each a Gaussian over band index centred at random (width 2–8 % of the bands), rows
    normalised to sum 1. Returns the (M, B) response matrix and a label."""
    count = int(rng.integers(3, 9))
    centres = np.sort(rng.uniform(0.03, 0.97, count)) * (bands - 1)
    widths = rng.uniform(0.02, 0.08, count) * bands
    index = np.arange(bands)
    response = np.exp(-0.5 * ((index[None, :] - centres[:, None]) / widths[:, None]) ** 2)
    return response / response.sum(1, keepdims=True), f"{count} band groups"


def validation_cubes(data_dir=None) -> List[HyperspectralCube]:
    return [
        load_potsdam_block("C", data_dir),
        load_berlin("HyMap02_Berlin_Urban_Gradient_2009", "HyMap02 Berlin", data_dir),
        _from_mat("AVIRIS Jasper Ridge", cubes.load_jasper_ridge, data_dir),
    ]


def validation_sensors() -> Dict[str, SensorResponse]:
    sentinel2 = load_srf("sentinel2a_msi_srf")
    return {
        "Sentinel-2 10 m": sentinel2.subset(["B2", "B3", "B4", "B8"]),
        "WorldView-2": load_srf("worldview2_srf"),
        "RGB": sentinel2.subset(["B2", "B3", "B4"]),
    }


def training_sensors() -> List[SensorResponse]:
    """Every real multispectral sensor, plus the subsets users typically have (10 m, RGB)."""
    sensors = [load_srf(name) for name in list_sensors()]
    sentinel2 = load_srf("sentinel2b_msi_srf")
    sensors.append(sentinel2.subset(["B2", "B3", "B4", "B8"]))
    sensors.append(sentinel2.subset(["B2", "B3", "B4"]))
    return sensors


@dataclass
class WaldCase:
    """One Wald-protocol example: inputs, reference and what produced them."""

    lr_hsi: np.ndarray
    hr_msi: np.ndarray
    reference: np.ndarray
    scale: int
    cube: str
    sensor: str
    # How the LR-HSI was made (psf.SpatialDegradation): the truth a blind estimate is judged by.
    degradation: Optional[object] = None
    # Scene statistics of the whole scene the case was cut from (model.SceneStatistics), as
    # fusion fits them on a whole scene; None: fitted on the case itself.
    statistics: Optional[object] = None
    # The LR-HSI's band centres (B,) in nm, None when unknown: what fusion reads from a raster's
    # metadata, and what a "grid" model needs (model.REPRESENTATIONS).
    wavelengths_nm: Optional[np.ndarray] = None


def make_wald_case(
    cube: HyperspectralCube,
    sensor: SensorResponse,
    scale: int,
    rng: Optional[np.random.Generator] = None,
    hsi_snr_db: Optional[float] = None,
    msi_snr_db: Optional[float] = None,
    shift: Tuple[float, float] = (0.0, 0.0),
    crop: Optional[Tuple[int, int, int, int]] = None,
    psf=None,
    response: Optional[np.ndarray] = None,
) -> WaldCase:
    """crop = (row, col, rows, cols) of the reference in HR pixels; rows/cols are cut to multiples of scale.

    ``psf``: the LR-HSI's spatial degradation (psf.SpatialDegradation at ``scale``; default the
    Wald protocol's Gaussian), its offset moved further by ``shift`` (dy, dx) HR pixels.
    ``response`` (M, B), when given, replaces the sensor's SRFs (band-group MSIs)."""
    from .psf import wald

    degradation = psf if psf is not None else wald(scale)
    degradation = degradation.with_offset(tuple(a + float(b) for a, b in zip(degradation.offset, shift)))
    data = cube.data
    if crop is not None:
        r, c, h, w = crop
        data = data[:, r : r + h, c : c + w]
    if response is None:
        response, _ = spectral_response_matrix(sensor, cube.wavelengths_nm)
    lr, msi, reference = wald_pair(data, degradation, response, rng, hsi_snr_db, msi_snr_db)
    name = sensor if isinstance(sensor, str) else sensor.name
    return WaldCase(
        lr.astype(np.float32), msi.astype(np.float32), np.ascontiguousarray(reference), scale, cube.name, name, degradation,
        wavelengths_nm=cube.wavelengths_nm,
    )


def validation_psfs(scale: int) -> Dict[str, object]:
    """label → psf.SpatialDegradation: the realistic PSF variants of the validation suite at
    ``scale`` (box; Gaussians of VALIDATION_GAUSSIAN_SIGMAS; an anisotropic Gaussian with a
    sub-pixel offset). The Wald protocol's Gaussian (psf.WALD_SIGMA) is the main suite's."""
    from .psf import SpatialDegradation

    variants = {"box": SpatialDegradation(scale, "box", (0.0, 0.0))}
    for sigma in VALIDATION_GAUSSIAN_SIGMAS:
        variants[f"Gaussian σ {sigma:.2f}"] = SpatialDegradation(scale, "gaussian", (sigma, sigma))
    sigma, offset = VALIDATION_ANISOTROPIC
    variants[f"Gaussian σ {sigma[0]:.2f}×{sigma[1]:.2f}, offset {offset[0]:+.1f},{offset[1]:+.1f}"] = SpatialDegradation(
        scale, "gaussian", sigma, offset
    )
    return variants


def training_psf(scale: int, rng: np.random.Generator):
    """A random PSF for one training batch: a Gaussian (60 %, σ per axis), pixel aggregation
    (20 %) or aggregation blurred by a Gaussian (20 %); σ uniform in TRAINING_SIGMA_RANGE but
    never within TRAINING_PSF_GAP of a validation σ, so validation measures PSFs never trained on."""
    from .psf import WALD_SIGMA, SpatialDegradation

    def sigma() -> float:
        forbidden = VALIDATION_GAUSSIAN_SIGMAS + VALIDATION_ANISOTROPIC[0] + (WALD_SIGMA,)
        while True:
            value = round(float(rng.uniform(*TRAINING_SIGMA_RANGE)), 3)
            if min(abs(value - f) for f in forbidden) >= TRAINING_PSF_GAP:
                return value

    draw = rng.random()
    if draw < 0.6:
        return SpatialDegradation(scale, "gaussian", (sigma(), sigma()))
    if draw < 0.8:
        return SpatialDegradation(scale, "box", (0.0, 0.0))
    return SpatialDegradation(scale, "box-gaussian", (sigma() / 2, sigma() / 2))


def validation_cases(
    data_dir=None,
    scales: Sequence[int] = VALIDATION_SCALES,
    cubes_: Optional[Sequence[HyperspectralCube]] = None,
    sensors: Optional[Dict[str, SensorResponse]] = None,
) -> List[WaldCase]:
    """The Wald cases of the validation suite: every cube × scale × sensor, Wald's Gaussian PSF.
    ``cubes_`` and ``sensors`` (label → SRF) default to :func:`validation_cubes` (read from
    ``data_dir``) and :func:`validation_sensors`; a training-set pack supplies its own."""
    cases = []
    for cube in cubes_ if cubes_ is not None else validation_cubes(data_dir):
        for scale in scales:
            for label, sensor in (sensors if sensors is not None else validation_sensors()).items():
                case = make_wald_case(cube, sensor, scale)
                case.sensor = label
                cases.append(case)
    return cases


def _augment(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    patch = np.rot90(patch, k=int(rng.integers(4)), axes=(1, 2))
    if rng.random() < 0.5:
        patch = patch[:, :, ::-1]
    return np.ascontiguousarray(patch)


def training_batch(
    cubes_: Sequence[HyperspectralCube],
    sensors: Sequence[SensorResponse],
    rng: np.random.Generator,
    batch_size: int = 4,
    crop: int = 64,
    scales: Sequence[int] = TRAINING_SCALES,
    statistics: Optional[Callable[[HyperspectralCube, SensorResponse, int], object]] = None,
) -> List[WaldCase]:
    """A batch of Wald pairs sharing one cube, sensor and scale (so that they stack).

    ``statistics(cube, sensor, scale)``, when given, supplies the scene statistics of the
    whole cube's Wald pair for every crop.

    Random crop, 90° rotation and flip; one random PSF per batch (:func:`training_psf`); LR-HSI noise at 30–45 dB SNR on a third of the batches,
    MSI noise on a quarter. (Noise on most batches taught the network mainly to denoise, which
    clean inputs do not need.) No misregistration: fusion measures and compensates it
    (registration.py), so a network taught to hedge against it would only blur aligned pairs.
    Raises ValueError when none of ``sensors`` can be simulated from the drawn cube's bands, or
    the cube has fewer than 6 LR pixels per side at every one of ``scales``.
    """
    weights = np.array([c.weight * (c.data.shape[1] * c.data.shape[2]) ** 0.5 for c in cubes_])
    cube = cubes_[rng.choice(len(cubes_), p=weights / weights.sum())]
    if cube.wavelengths_nm is None:
        response, sensor = band_group_response(cube.data.shape[0], rng)
    else:
        uncovered = set()
        while True:
            index = int(rng.integers(len(sensors)))
            sensor = sensors[index]
            try:
                response, _ = spectral_response_matrix(sensor, cube.wavelengths_nm)
                break
            except ValueError:
                uncovered.add(index)
                if len(uncovered) == len(sensors):
                    raise ValueError(
                        f"none of the sensors ({', '.join(s.name for s in sensors)}) can be simulated from {cube.name}'s "
                        f"bands ({cube.wavelengths_nm.min():.0f}–{cube.wavelengths_nm.max():.0f} nm)"
                    ) from None
    _, rows, cols = cube.data.shape
    usable = [s for s in scales if min(rows, cols) // s >= 6]
    if not usable:
        raise ValueError(
            f"{cube.name} ({rows}×{cols} pixels) is too small for scales {list(scales)}: a Wald pair needs at least "
            f"6 low-resolution pixels on each side ({6 * min(scales)} pixels at scale {min(scales)})"
        )
    scale = int(rng.choice(usable))
    size = min(crop, rows, cols) // scale * scale
    hsi_snr = float(rng.uniform(30, 45)) if rng.random() < 1 / 3 else None
    msi_snr = float(rng.uniform(30, 45)) if rng.random() < 1 / 4 else None
    psf = training_psf(scale, rng)
    batch = []
    for _ in range(batch_size):
        r = int(rng.integers(rows - size + 1))
        c = int(rng.integers(cols - size + 1))
        patch = HyperspectralCube(cube.name, _augment(cube.data[:, r : r + size, c : c + size], rng), cube.wavelengths_nm, cube.weight)
        batch.append(make_wald_case(patch, sensor, scale, rng, hsi_snr, msi_snr, psf=psf, response=response))
    if statistics is not None:
        whole = statistics(cube, sensor, psf, response)
        for case in batch:
            case.statistics = whole
    return batch


class WholeSceneStatistics:
    """Scene statistics of a whole cube's clean Wald pair, per (cube, sensor, scale), cached.

    Fitted on a 64-pixel crop, the statistics describe a few dozen LR pixels: a regression
    that local is a far better base than the one fusion fits on a whole scene, and a network
    trained on top of it learns corrections that do not hold at run time.
    """

    MAX_ENTRIES = 256

    def __init__(self, subspace_dim: int):
        self.subspace_dim = subspace_dim
        self.cache: Dict[tuple, object] = {}

    def __call__(self, cube: HyperspectralCube, sensor, psf, response: Optional[np.ndarray] = None):
        """``psf``: a psf.SpatialDegradation, or an integer scale for the Wald Gaussian;
        ``sensor`` a SensorResponse, or a label when ``response`` (M, B) gives the MSI."""
        from .degradation import as_degradation

        psf = as_degradation(psf)
        if response is None:
            response, _ = spectral_response_matrix(sensor, cube.wavelengths_nm)
        key = (cube.name, cube.data.shape, getattr(sensor, "name", sensor), response.tobytes(), psf)
        if key not in self.cache:
            if len(self.cache) >= self.MAX_ENTRIES:
                # Random PSFs rarely repeat: keep memory bounded rather than every fit.
                self.cache.pop(next(iter(self.cache)))
            whole = make_wald_case(cube, sensor, psf.scale, psf=psf, response=response)
            # The band centres, where known, give the grid representation its maps (model.py).
            self.cache[key] = case_statistics(whole, self.subspace_dim).set_wavelengths(cube.wavelengths_nm)
        return self.cache[key]


def case_statistics(case: WaldCase, subspace_dim: int):
    """The scene statistics (model.SceneStatistics) fitted on a Wald case's own inputs, the
    MSI degraded onto the LR-HSI's grid as the case's LR-HSI was."""
    from .degradation import blur_and_decimate
    from .model import SceneStatistics

    degradation = case.degradation if case.degradation is not None else case.scale
    statistics = SceneStatistics.estimate(case.lr_hsi, blur_and_decimate(case.hr_msi, degradation), subspace_dim)
    statistics.degradation = case.degradation
    return statistics
