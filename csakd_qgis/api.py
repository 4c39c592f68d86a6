"""The public Python API: fuse arrays, fuse files. No QGIS needed.

    from csakd_qgis.api import fuse_arrays, fuse_files
    fused = fuse_arrays(lr_hsi, hr_msi)            # (B,h,w) + (M,s·h,s·w) -> (B,s·h,s·w)
    fuse_files("enmap.tif", "sentinel2.tif", "fused.tif")
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np

DEFAULT_TILE_SIZE = 256
DEFAULT_OVERLAP = 32
# Fit the scene's own pixel-wise correction on its reduced pairs and apply it where the check
# one scale further down passes (scene_correction.py): on the 63 ×2 cases of the validation
# cubes (seven PSFs, three MSIs) it passed on 61 and gained +0.54 dB on average (up to +1.22,
# make bench), worse on none; a scene too small to be reduced twice by its own scale is reduced ×2
# (scene_correction.FALLBACK_REDUCTION), and one under about 32 HSI pixels a side left as it is.
SCENE_CORRECTION = True
DEFAULT_HALO_LR = 4
from .pipeline import SUBSPACE_FIT_PIXELS  # noqa: E402  (one limit for every fit)
# GDAL's block cache, bounded: its default (5 % of RAM) fills with finished output blocks and
# makes memory grow with the raster. Resampling the LR-HSI needs room for a strip of the
# source's blocks (a pixel-interleaved 224-band block alone is 58 MB); writing whole output
# blocks needs little.
RESAMPLE_CACHE_BYTES = 256 * 1024 * 1024
WRITE_CACHE_BYTES = 64 * 1024 * 1024
RESAMPLE_SHARE = 0.1  # of the progress bar: resampling the LR-HSI onto the working grid
# The scene correction's fits take about as long, whatever the scene's size, as fusing this many
# output pixels (224 bands, 2 cores): 3.7 s of fits against 3.5 s for the rest of a 512² output
# and about 57 s for a 2048² one, about 14 µs per output pixel.
SCENE_CORRECTION_PROGRESS_PIXELS = 250_000


class FusionCancelled(Exception):
    """Raised between tiles when the caller asked to stop."""


def resolve_device(device: Optional[str] = None):
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU here; use 'cpu' or 'auto'")
    return torch.device(device)


@lru_cache(maxsize=4)
def _cached_bundle(path: str, device: str, modified: float):
    from .bundle import load_bundle

    return load_bundle(path, device)


def load_model(path: Union[str, Path, None] = None, device: Optional[str] = None):
    """(model, card) of a bundle (the bundled student when ``path`` is None), cached per process."""
    from .bundle import card_path_for, default_model_path

    resolved = resolve_device(device)
    card = card_path_for(path or default_model_path()).resolve()
    # The card's time stamp is part of the key: a bundle retrained in place is loaded afresh.
    modified = card.stat().st_mtime if card.exists() else 0.0
    return _cached_bundle(str(card), str(resolved), modified)


def check_inputs(lr_hsi: np.ndarray, hr_msi: np.ndarray) -> int:
    """Validates shapes and returns the integer scale."""
    if lr_hsi.ndim != 3 or hr_msi.ndim != 3:
        raise ValueError("inputs must be (bands, rows, cols) arrays")
    bands, rows, cols = lr_hsi.shape
    if bands < 2:
        raise ValueError(f"the hyperspectral image has {bands} band(s); fusion needs at least 2")
    scale = hr_msi.shape[1] // rows if rows else 0
    if scale < 1 or hr_msi.shape[1] != scale * rows or hr_msi.shape[2] != scale * cols:
        raise ValueError(
            f"the MSI's size {hr_msi.shape[1:]} must be an integer multiple of the HSI's {lr_hsi.shape[1:]}"
        )
    return scale


@dataclass
class FusionReport:
    """What :func:`fuse_files` did: the torch device, the model's name, seconds, tiles, the
    working scale, and what the scene correction did (its log line without the prefix, as in
    the output's CSAKD_SCENE_CORRECTION)."""

    device: str
    model: str
    seconds: float
    tiles: int
    scale: int
    scene_correction: str = ""


class TileFuser:
    """Runs a bundle's model tile by tile over a scene whose statistics are fitted once.

    A tile gives the model's K-channel subspace detail; :class:`SpectrumComposer` turns
    blended detail into full spectra.
    """

    def __init__(self, model, stats, device, conservative: bool = False, scene_correction=None):
        import torch

        from .interpolation import consistent_reach

        self.torch = torch
        self.model = model
        self.stats = stats
        self.stat_tensors = stats.to_tensors(device)
        self.scale = stats.degradation.scale
        self.device = device
        self.channels = stats.basis.shape[1]
        # No detail at all: the output is the bicubic upsampling (pipeline.check_against_safe).
        self.conservative = conservative
        # The scene's own pixel-wise correction (scene_correction.py), or None.
        self.scene_correction = scene_correction
        # The consistent interpolator reads this far; the PSF and the network a little more.
        reach = consistent_reach(stats.degradation) + int(math.ceil(stats.degradation.reach_hr() / self.scale))
        self.halo_lr = max(DEFAULT_HALO_LR, reach + 3)

    def fuse_tile(self, lr_tile: np.ndarray, hr_tile: np.ndarray) -> np.ndarray:
        """The tile's (K, H, W) detail; NaN wherever either input had no data to give."""
        torch = self.torch
        lr_valid = np.isfinite(lr_tile).all(0)
        hr_valid = np.isfinite(hr_tile).all(0)
        if self.conservative:
            detail = np.zeros((self.channels,) + hr_tile.shape[1:], dtype=np.float32)
            detail[:, ~(hr_valid & lr_valid.repeat(self.scale, 0).repeat(self.scale, 1))] = np.nan
            return detail
        lr = fill_gaps(lr_tile, lr_valid, self.stats.band_mean)
        hr = fill_gaps(hr_tile, hr_valid, self.stats.msi_mean)
        with torch.inference_mode():
            lr_t, hr_t = torch.from_numpy(lr)[None].to(self.device), torch.from_numpy(hr)[None].to(self.device)
            detail, _ = self.model.subspace_detail(lr_t, hr_t, self.stat_tensors)
            if self.scene_correction is not None:
                from .scene_correction import corrected_detail

                detail = corrected_detail(self.scene_correction, lr_t, hr_t, detail, self.stat_tensors,
                                          self.model.config.subspace_dim)
        detail = detail[0].float().cpu().numpy()
        valid = hr_valid & lr_valid.repeat(self.scale, 0).repeat(self.scale, 1)
        detail[:, ~valid] = np.nan
        return detail


class SpectrumComposer:
    """Turns blended rows of subspace detail into full spectra, ``block_cols`` columns at a
    time, and hands each block to ``write(row0, col0, spectra)``.

    Only one block of full spectra (bands × block rows × block columns) exists at a time, so
    memory does not grow with the raster's width or the number of bands times its area.
    """

    LR_MARGIN = 4  # LR pixels around a block: bicubic reaches 2, and 1 more with a measured offset

    def __init__(self, stats, lr_shape, read_lr, write, block_cols: int = 256, device="cpu", nonnegative: bool = False):
        self.stats = stats
        self.stat_tensors = stats.to_tensors(device)
        self.scale = stats.degradation.scale
        # Both inputs non-negative: a negative output is interpolation ringing, not signal.
        self.nonnegative = nonnegative
        self.lr_rows, self.lr_cols = lr_shape
        self.read_lr = read_lr
        self.write = write
        self.block_cols = block_cols
        self.device = device

    def __call__(self, row0: int, detail: np.ndarray) -> None:
        for col0 in range(0, detail.shape[2], self.block_cols):
            block = detail[:, :, col0 : col0 + self.block_cols]
            self.write(row0, col0, self.compose(row0, col0, block))

    def compose(self, row0: int, col0: int, detail: np.ndarray) -> np.ndarray:
        import torch

        from .model import compose_spectrum

        s, margin = self.scale, self.LR_MARGIN
        rows, cols = detail.shape[1:]
        lr_r0, lr_c0 = max(0, row0 // s - margin), max(0, col0 // s - margin)
        lr_r1 = min(self.lr_rows, -(-(row0 + rows) // s) + margin)
        lr_c1 = min(self.lr_cols, -(-(col0 + cols) // s) + margin)
        lr = self.read_lr((lr_r0, lr_c0, lr_r1 - lr_r0, lr_c1 - lr_c0))
        lr = fill_gaps(lr, np.isfinite(lr).all(0), self.stats.band_mean)
        # Detail rows and columns of this block sit at this offset inside the window's HR grid;
        # only the block's own spectra are computed.
        window = (row0 - lr_r0 * s, col0 - lr_c0 * s)
        with torch.inference_mode():
            spectra = compose_spectrum(
                torch.from_numpy(lr)[None].to(self.device), torch.from_numpy(np.nan_to_num(detail))[None].to(self.device),
                self.stat_tensors, window, s,
            )[0]
        spectra = spectra.float().cpu().numpy()
        if self.nonnegative:
            np.maximum(spectra, 0.0, out=spectra)
        spectra[:, ~np.isfinite(detail).all(0)] = np.nan
        return spectra


GAP_FILL_STEPS = 12  # pixels a gap is filled inwards from its edge: beyond what interpolation reads


def fill_gaps(image: np.ndarray, valid: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """(C, h, w) float32 with the pixels outside ``valid`` filled from their valid neighbours,
    growing inwards one ring per step (mean of the already known 3×3 neighbours); what is still
    unknown after ``GAP_FILL_STEPS`` gets ``fallback`` (C,).

    A gap filled with the scene mean is a step the size of the whole signal, and the
    interpolators, which read up to 10 pixels around, would carry it far beyond the gap's own
    footprint (measured on a Potsdam pair with three one-pixel holes: 33.0 dB with mean filling, 35.6 dB
    filled from neighbours, 36.3 dB without the holes).
    """
    image = image.astype(np.float32, copy=True)
    if valid.all():
        return image
    known = valid.copy()
    image[:, ~known] = 0.0
    rows, cols = known.shape
    for _ in range(GAP_FILL_STEPS):
        if known.all():
            break
        weight = np.pad(known.astype(np.float32), 1)
        values = np.pad(image * known, ((0, 0), (1, 1), (1, 1)))
        total = sum(values[:, r : r + rows, c : c + cols] for r in range(3) for c in range(3))
        count = sum(weight[r : r + rows, c : c + cols] for r in range(3) for c in range(3))
        grow = ~known & (count > 0)
        if not grow.any():
            break
        image[:, grow] = total[:, grow] / count[grow]
        known |= grow
    image[:, ~known] = np.asarray(fallback, dtype=np.float32)[:, None]
    return image


def fit_scene(lr_hsi: np.ndarray, msi_at_lr: np.ndarray, subspace_dim: int, regression: bool = True):
    """model.SceneStatistics of an LR-HSI (B, h, w) and the MSI on its grid (M, h, w), NaN for
    no data, on at most SUBSPACE_FIT_PIXELS pixels (see SceneStatistics.estimate)."""
    from .model import SceneStatistics

    valid = np.isfinite(lr_hsi).all(0) & np.isfinite(msi_at_lr).all(0)
    return SceneStatistics.estimate(
        lr_hsi, msi_at_lr, subspace_dim, valid=valid, max_pixels=SUBSPACE_FIT_PIXELS, regression=regression
    )


def fuse_case(case, model=None, **options) -> np.ndarray:
    """:func:`fuse_arrays` of a Wald case (datasets.WaldCase): its LR-HSI, HR-MSI and band
    centres, with ``options`` (psf, log, adapt_minutes, ...) passed on. Returns float32
    (B, s·h, s·w), as :func:`fuse_arrays`, whose errors it raises."""
    return fuse_arrays(case.lr_hsi, case.hr_msi, model=model, wavelengths_nm=case.wavelengths_nm, **options)


def array_pair(lr_hsi: np.ndarray, hr_msi: np.ndarray, scale: int, wavelengths_nm: Optional[np.ndarray] = None):
    """A :class:`pipeline.ScenePair` over two arrays in memory (NaN outside them), the LR-HSI's
    band centres ``wavelengths_nm`` (B,) in nm or None."""
    from .pipeline import ScenePair

    from .georaster import padded_window

    def reader(image):
        def inside(row, col, rows, cols):
            return image[:, row : row + rows, col : col + cols]

        return lambda window: padded_window(inside, image.shape[0], image.shape[1], image.shape[2], *window)

    return ScenePair(lr_hsi.shape[1:], hr_msi.shape[1:], scale, reader(lr_hsi), reader(hr_msi), wavelengths_nm)


def fuse_scene(pair, model, device, write, tile_size, overlap, psf=None, block_cols=256,
               progress=None, cancelled=None, log=None, block_rows: int = 256, adapt=None,
               scene_correction: bool = False):
    """Fit scene → estimate degradation → check against the safe answer → adapt (optional) →
    scene correction (optional) → fuse tiles; ``write(row0, col0, spectra)`` receives finished
    blocks of full spectra. Returns (tiles fused, scene statistics, what the scene correction
    did: its log line).
    ``adapt(model, statistics)`` may return a fine-tuned model; ``scene_correction`` fits the
    scene's own pixel-wise correction on its reduced pairs (scene_correction.py) and applies it
    when its check passes. ``progress`` is told the fraction done: the scene correction's fits
    first (:func:`scene_correction_share` of it), then the tiles."""
    from .pipeline import check_against_safe, fit_scene_statistics, nonnegative_inputs

    log = log or (lambda message: None)
    statistics, estimate = fit_scene_statistics(pair, model.config.subspace_dim, psf, log)
    if model.config.representation == "grid" and statistics.grid_from_bands is None:
        log("this model works on a wavelength grid, and the hyperspectral image's band centres are unknown: its "
            "network is not applied, the output is the classical base (give the image wavelength metadata, e.g. an "
            "ENVI header's 'wavelength' list, to use it)")
    safe = check_against_safe(pair, model, statistics, device)
    log(safe.describe())
    if adapt is not None and safe.use_fusion:
        model = adapt(model, statistics)
    share = scene_correction_share(pair.hr_shape) if scene_correction else 0.0
    correction, said = _scene_correction(model, statistics, estimate, pair, log, cancelled, scene_correction,
                                         safe.use_fusion, _part(progress, 0.0, share))
    if correction is not None:
        correction = correction.to(device)
    nonnegative = nonnegative_inputs(pair)
    fuser = TileFuser(model, statistics, device, conservative=not safe.use_fusion, scene_correction=correction)
    composer = SpectrumComposer(statistics, pair.lr_shape, pair.read_lr, write, block_cols, device, nonnegative)
    tiles = run_tiles(fuser, pair.lr_shape, pair.read_lr, pair.read_hr, composer, tile_size, overlap,
                      _part(progress, share, 1.0), cancelled, block_rows)
    return tiles, statistics, said


def fuse_arrays(
    lr_hsi: np.ndarray,
    hr_msi: np.ndarray,
    model=None,
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    device: Optional[str] = None,
    progress: Optional[Callable[[float], None]] = None,
    cancelled: Optional[Callable[[], bool]] = None,
    log: Optional[Callable[[str], None]] = None,
    psf=None,
    adapt_minutes: float = 0.0,
    wavelengths_nm: Optional[np.ndarray] = None,
    scene_correction: bool = SCENE_CORRECTION,
) -> np.ndarray:
    """Fuse an LR-HSI (B, h, w) with an HR-MSI (M, s·h, s·w) on the same footprint.

    Runs the same stages as :func:`fuse_files` (pipeline.py): the LR-HSI's PSF and offset
    are estimated from the pair unless ``psf`` (a psf.SpatialDegradation at scale s, or a
    PSF text as :func:`psf.parse_psf` reads it) is given; ``log`` receives what was found.
    NaN marks missing data; output pixels without data in either input are NaN.
    ``model`` is a loaded model or a bundle path (default: the bundled student);
    ``adapt_minutes`` > 0 fine-tunes it on the scene first (as :func:`fuse_files`);
    ``scene_correction`` fits and applies the scene's own correction (as :func:`fuse_files`).
    ``wavelengths_nm`` (B,): the LR-HSI's band centres in nm, which a model on the wavelength grid
    needs (model.REPRESENTATIONS; without them it adds nothing to the base); :func:`fuse_files`
    reads them from the raster's metadata. Returns float32 (B, s·h, s·w). Raises ValueError for
    shapes that do not fit or a count of band centres other than B.
    """
    from .psf import parse_psf

    lr_hsi = np.asarray(lr_hsi, dtype=np.float32)
    hr_msi = np.asarray(hr_msi, dtype=np.float32)
    scale = check_inputs(lr_hsi, hr_msi)
    if isinstance(psf, str):
        psf = parse_psf(psf, scale)
    if model is None or isinstance(model, (str, Path)):
        model, _ = load_model(model, device)
    torch_device = next(model.parameters()).device
    output = np.empty((lr_hsi.shape[0],) + hr_msi.shape[1:], dtype=np.float32)

    def write(row0: int, col0: int, spectra: np.ndarray) -> None:
        output[:, row0 : row0 + spectra.shape[1], col0 : col0 + spectra.shape[2]] = spectra

    if wavelengths_nm is not None and len(wavelengths_nm) != lr_hsi.shape[0]:
        raise ValueError(f"{len(wavelengths_nm)} band centres for {lr_hsi.shape[0]} hyperspectral bands")
    pair = array_pair(lr_hsi, hr_msi, scale, None if wavelengths_nm is None else np.asarray(wavelengths_nm, dtype=np.float64))

    def adapt(model_, statistics):
        return _adapted(model_, statistics, pair, adapt_minutes, log or (lambda message: None), cancelled)

    fuse_scene(pair, model, torch_device, write, tile_size, overlap, psf, 256, progress, cancelled, log,
               adapt=adapt if adapt_minutes > 0 else None, scene_correction=scene_correction)
    return output


def run_tiles(
    fuser, lr_shape, read_lr, read_hr, emit, tile_size, overlap, progress=None, cancelled=None, block_rows: int = 256
) -> int:
    """Drive ``fuser`` over every tile; ``read_lr``/``read_hr`` take (row, col, rows, cols)
    windows of their own grid; tiles read ``fuser.halo_lr`` LR pixels of context around them;
    ``emit(row0, rows)`` receives finished, blended rows of the fuser's ``channels`` in pieces of
    ``block_rows`` aligned on multiples of it."""
    from .tiling import StripBlender, iterate_tiles, plan_rows_of_tiles

    scale = fuser.scale
    rows_of_tiles = plan_rows_of_tiles(lr_shape, scale, tile_size, overlap, fuser.halo_lr)
    total = sum(len(r) for r in rows_of_tiles)
    ramp = min(overlap, tile_size) // scale * scale
    blender = StripBlender(fuser.channels, (lr_shape[0] * scale, lr_shape[1] * scale), ramp, emit)
    for done, (tile, flush_row) in enumerate(iterate_tiles(rows_of_tiles), start=1):
        if cancelled is not None and cancelled():
            raise FusionCancelled("fusion cancelled")
        context = fuser.fuse_tile(read_lr(tile.context_lr), read_hr(tile.context_hr))
        rows, cols = tile.crop_from_context()
        blender.add(tile.hr_window, context[:, rows, cols])
        if flush_row >= 0:
            blender.flush_until(flush_row, block_rows)
        if progress is not None:
            progress(done / total)
    return total


def fuse_files(
    lr_hsi_path: Union[str, Path],
    hr_msi_path: Union[str, Path],
    output_path: Union[str, Path],
    model: Union[str, Path, None] = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    device: Optional[str] = None,
    bands: Optional[list] = None,
    output_dtype: str = "float32",
    creation_options: Optional[dict] = None,
    progress: Optional[Callable[[float], None]] = None,
    cancelled: Optional[Callable[[], bool]] = None,
    log: Callable[[str], None] = lambda message: None,
    adapt_minutes: float = 0.0,
    psf=None,
    scene_correction: bool = SCENE_CORRECTION,
) -> FusionReport:
    """Fuse two co-registered rasters (any GDAL format, any CRS, any geotransform orientation)
    into a GeoTIFF.

    The output is on the HR-MSI's grid (made north-up) over the common area, one band per LR-HSI band
    (or per 1-based index in ``bands``), with each band's wavelength, FWHM and bad-band flag.
    It is written block by block to a temporary file renamed into place at the end, so a
    failed or cancelled run leaves nothing behind; the LR-HSI resampled onto the working grid
    sits in a scratch file beside the output for the run's duration. A value missing in one
    band costs only that band at that pixel; integer outputs keep the input's encoding
    (georaster.OutputEncoding). Raises FusionInputError on bad input, and on an output that
    is one of the inputs' files or that cannot be created, written or renamed (disk full,
    unwritable folder: checked before starting where possible).
    ``adapt_minutes`` > 0 first fine-tunes the model on the scene's own Wald-degraded pair.
    ``scene_correction``: fit a small pixel-wise correction on the scene's own reduced pairs and
    apply it where a check one scale further down says it pays (scene_correction.py; the log
    says which, and what the check gained).
    ``psf``: None or "auto" estimates the LR-HSI's PSF from the pair; else a PSF text
    (:func:`psf.parse_psf`: "box", "gaussian:0.5", "mtf:0.3", …) or a psf.SpatialDegradation.

    Stages (pipeline.py, the same as :func:`fuse_arrays`): open inputs → plan grid → fit scene
    → estimate degradation → check against bicubic on the scene's reduced pair → adapt
    (optional) → scene correction (``scene_correction``) → fuse tiles → write.
    """
    import rasterio
    from rasterio.errors import RasterioIOError
    from rasterio.windows import Window

    from .files import atomic_output
    from .georaster import (
        BandSubset, FusionInputError, band_means, fill_partial_gaps, hr_reader, msi_on_square_ground_pixels,
        output_profile, padded_window, plan_grid, read_as_float,
    )
    from .inputs import (
        blank_band_gaps, check_band_counts, input_encoding, log_input_properties, north_up_view, set_aside_mostly_missing,
        set_aside_mostly_missing_msi,
    )
    from .outputs import (
        check_not_an_input, check_room, log_clipped, output_dataset, output_encoding, output_folder, write_block,
    )
    from .pipeline import ScenePair
    from .psf import parse_psf
    from .raster_io import read_spectral_metadata

    started = time.time()
    output_path = Path(output_path)

    def open_raster(path, role):
        try:
            return rasterio.open(path)
        except RasterioIOError as error:
            raise FusionInputError(f"cannot read the {role} {path}: {error}") from error

    with output_folder(output_path), rasterio.Env(GDAL_CACHEMAX=RESAMPLE_CACHE_BYTES), open_raster(
        lr_hsi_path, "hyperspectral image (LRHSI)"
    ) as lr_ds, open_raster(hr_msi_path, "multispectral image (HRMSI)") as hr_file, ExitStack() as inputs:
        check_not_an_input(output_path, lr_ds, hr_file)
        hr_ds = inputs.enter_context(msi_on_square_ground_pixels(lr_ds, hr_file, log))
        grid = plan_grid(lr_ds, hr_ds)
        indexes = _band_indexes(bands, lr_ds.count)
        check_band_counts(indexes, lr_ds.count, hr_ds.count, log)
        meta = read_spectral_metadata(lr_ds)
        lr_encoding = input_encoding(lr_ds, meta, log)
        log_input_properties(lr_ds, hr_ds, grid, meta, log)
        check_room(output_path, grid, len(indexes), output_dtype, log)
        fused_model, card = load_model(model, device) if not hasattr(model, "config") else (model, {})
        torch_device = next(fused_model.parameters()).device
        psf_choice = parse_psf(psf, grid.scale) if isinstance(psf, str) else psf
        log(
            f"model {card.get('name', 'custom')} ({card.get('parameters', '?')} parameters) on {torch_device}; "
            f"resolution ratio {grid.ratio:.2f} → working scale {grid.scale}; output {grid.width}×{grid.height} "
            f"pixels × {len(indexes)} bands"
        )
        with ExitStack() as stack:
            lr_cube = stack.enter_context(
                _working_grid_cube(
                    lr_ds, grid, indexes, output_path, _part(progress, 0.0, RESAMPLE_SHARE), cancelled, lr_encoding
                )
            )
            hr_view = north_up_view(stack, hr_ds, log)
            fit_shape = _fit_shape(grid.lr_height, grid.lr_width)
            lr_fit = lr_cube.sample(*fit_shape)
            # (On the MSI's own pixels: the average onto the working grid hides scattered gaps.)
            msi_sample = read_as_float(hr_view, out_shape=(hr_view.count,) + fit_shape)
            msi_keep = set_aside_mostly_missing_msi(msi_sample, log)
            if not msi_keep.all():
                kept = np.flatnonzero(msi_keep) + 1
                msi_sample, hr_view = msi_sample[msi_keep], BandSubset(hr_view, kept)
            usable = np.isfinite(lr_fit).any(axis=(1, 2))
            if meta.bad_bands is not None:
                usable &= ~meta.bad_bands[np.array(indexes) - 1]
            usable &= ~set_aside_mostly_missing(lr_fit, indexes, meta, log)
            if usable.sum() < 4:
                raise FusionInputError("fewer than 4 hyperspectral bands hold data over the common area")
            all_used = bool(usable.all())

            # A value missing in one band at a pixel where the others have data is filled for the
            # network (and written as nodata in that band only, see write below).
            lr_fallback, msi_fallback = band_means(lr_fit)[usable], band_means(msi_sample)

            def read_lr(w):
                window = padded_window(lr_cube.read, lr_cube.bands, lr_cube.rows, lr_cube.cols, *w)
                return fill_partial_gaps(window if all_used else window[usable], lr_fallback)

            read_msi = hr_reader(hr_view, grid)

            def read_hr(w):
                return fill_partial_gaps(read_msi(w), msi_fallback)

            wavelengths = None
            if meta.wavelengths_nm is not None:
                wavelengths = meta.wavelengths_nm[np.array(indexes) - 1]
                wavelengths = wavelengths if all_used else wavelengths[usable]
            pair = ScenePair((grid.lr_height, grid.lr_width), (grid.height, grid.width), grid.scale, read_lr, read_hr,
                             wavelengths)

            def adapt(model_, statistics):
                if adapt_minutes <= 0:
                    return model_
                return _adapted(model_, statistics, pair, adapt_minutes, log, cancelled)

            position = np.flatnonzero(usable)
            profile = output_profile(grid, len(indexes), output_dtype, creation_options)
            block_rows, block_cols = _block_shape(profile)
            encoding = output_encoding(output_dtype, lr_ds, lr_encoding, indexes, lr_fit, log)
            with rasterio.Env(GDAL_CACHEMAX=WRITE_CACHE_BYTES), atomic_output(output_path, suffix=".tif") as temporary:
                _release_freed_memory()
                with output_dataset(temporary, output_path, profile) as dst:
                    _write_band_metadata(dst, meta, indexes, usable, encoding)

                    def write(row0: int, col0: int, spectra: np.ndarray) -> None:
                        rows = min(spectra.shape[1], grid.height - row0)
                        cols = min(spectra.shape[2], grid.width - col0)
                        if rows <= 0 or cols <= 0:
                            return
                        if all_used:
                            block = spectra[:, :rows, :cols]
                        else:
                            block = np.full((len(indexes), rows, cols), np.nan, dtype=np.float32)
                            block[position] = spectra[:, :rows, :cols]
                        blank_band_gaps(block, lr_cube, grid.scale, row0, col0)
                        write_block(dst, encoding.encode(block), Window(col0, row0, cols, rows), output_path)

                    try:
                        tiles, statistics, corrected = fuse_scene(
                            pair, fused_model, torch_device, write, tile_size, overlap, psf_choice, block_cols,
                            _part(progress, RESAMPLE_SHARE, 1.0), cancelled, log, block_rows, adapt,
                            scene_correction,
                        )
                    except ValueError as error:
                        if "both images have data" in str(error):
                            raise FusionInputError("no pixel of the common area has data in both images") from error
                        raise
                    # The degradation the fusion assumed, readable back (consistency.psf_consistency).
                    dst.update_tags(CSAKD_PSF=json.dumps(statistics.degradation.to_dict()),
                                    CSAKD_PSF_DESCRIPTION=statistics.degradation.describe(),
                                    CSAKD_SCENE_CORRECTION=corrected.removeprefix("scene correction: "))
    log_clipped(encoding, log)
    seconds = time.time() - started
    name = card.get("name", "custom")
    log(f"fused {tiles} tile(s) with {name} on {torch_device} in {seconds:.1f} s → {output_path}")
    return FusionReport(str(torch_device), name, seconds, tiles, grid.scale, corrected.removeprefix("scene correction: "))


ADAPTATION_WINDOW = 384  # LR pixels per side: enough texture to adapt on, bounded memory


# The largest central window (LR pixels a side) the scene correction is fitted on: enough for
# its check at the scene's own scale up to ×12 (scene_correction.check_window: 576; above, its
# pairs are reduced ×2), 640² × 224 bands of float32 = 370 MB.
SCENE_CORRECTION_MAX_WINDOW = 640


def scene_correction_share(output_shape: Tuple[int, int]) -> float:
    """The part (0–1) of a fusion's progress after resampling that the scene correction's fits
    take, for an output of ``output_shape`` (H, W) pixels: their fixed cost
    (:data:`SCENE_CORRECTION_PROGRESS_PIXELS`) against the tiles', which grows with the output
    (about 0.49 for a 512² output, 0.06 for 2048²)."""
    pixels = output_shape[0] * output_shape[1]
    return SCENE_CORRECTION_PROGRESS_PIXELS / (SCENE_CORRECTION_PROGRESS_PIXELS + pixels)


def _scene_correction(model, stats, estimate, pair, log, cancelled, wanted: bool, fusion_used: bool, progress=None):
    """(the scene's pixel-wise correction or None, the log line saying what was done): fitted
    (scene_correction.fit_scene_correction) on a central window of the scene large enough for
    its check at the scene's scale, where it is ``wanted``, the fusion is used (not the safe
    answer) and the LR-HSI explains the MSI well enough for the check to be trusted;
    ``progress`` is told the fraction of the fits done."""
    from .georaster import FusionInputError
    from .scene_correction import MIN_PAIR_FIT, check_window, fit_scene_correction

    log = log or (lambda message: None)

    def said(line):
        log(line)
        return None, line

    if not wanted:
        return said("scene correction: off")
    if not fusion_used:
        return said("scene correction: not applied, the output is the safe answer (bicubic upsampling)")
    fit = getattr(estimate, "fit", float("nan"))
    if np.isfinite(fit) and fit < MIN_PAIR_FIT:
        return said(f"scene correction: not applied, the hyperspectral image explains only {100 * fit:.1f} % of the "
                    f"multispectral image (its check needs {100 * MIN_PAIR_FIT:.0f} %): are they the same place and date?")
    # Large enough to reduce by the scene's own scale where the scene is (else it falls back to ×2).
    side = min(SCENE_CORRECTION_MAX_WINDOW, max(ADAPTATION_WINDOW, check_window(stats.degradation.scale)))
    try:
        hsi, msi = _central_pair(pair, stats, side, "the centre area lacks data in both images")
    except FusionInputError as error:
        return said(f"scene correction: not applied, {error}")
    correction, report = fit_scene_correction(model, hsi, msi, stats, log, cancelled or (lambda: False),
                                              progress or (lambda fraction: None))
    if cancelled is not None and cancelled():
        raise FusionCancelled("fusion cancelled while fitting the scene correction")
    log(report.message)
    return correction, report.message


def _central_pair(pair, stats, side: int, too_sparse: str):
    """(LR-HSI (B,h,w), MSI degraded onto its grid (M,h,w)) of the central window of up to
    ``side`` LR pixels a side, under the scene's estimated degradation, gaps filled
    (user_training.filled_pair, which raises FusionInputError(too_sparse))."""
    from .registration import central_window
    from .user_training import filled_pair

    window = central_window(pair.lr_shape, side)
    return filled_pair(np.ascontiguousarray(pair.read_lr(window)), pair.msi_at_lr(window, stats.degradation), too_sparse)


def _adapted(model, stats, pair, minutes, log, cancelled):
    """The model fine-tuned on a central window of the scene, in the subspace of the scene
    statistics ``stats`` that the fusion then uses (see user_training.adapt_to_scene); the
    MSI is degraded onto the LR grid under the scene's estimated degradation."""
    from .user_training import adapt_to_scene

    hsi, msi = _central_pair(pair, stats, ADAPTATION_WINDOW,
                             "scene adaptation needs a centre area where both images have data; set its minutes to 0")
    adapted, _ = adapt_to_scene(
        model, hsi, msi, pair.scale, minutes, log=log, cancelled=cancelled or (lambda: False), statistics=stats
    )
    if cancelled is not None and cancelled():
        raise FusionCancelled("fusion cancelled during scene adaptation")
    return adapted


@contextmanager
def _working_grid_cube(lr_ds, grid, indexes, output_path: Path, progress, cancelled, encoding=None):
    """The LR-HSI on the working grid in a scratch file beside the output, removed afterwards
    whatever happens (the output's folder is where the user has room for large files).
    ``encoding``: (scales, offsets) per band when they come from a metadata file."""
    from rasterio.errors import RasterioError

    from .files import OutputError
    from .georaster import WorkingGridCube

    try:
        handle, scratch = tempfile.mkstemp(prefix=f".{output_path.name}.", suffix=".lr-working-grid", dir=output_path.parent)
        os.close(handle)
    except OSError as error:
        raise OutputError(f"cannot create the scratch file beside the output {output_path}: {error.strerror or error}") from error
    try:
        try:
            cube = WorkingGridCube.materialise(lr_ds, grid, indexes, scratch, progress, cancelled, encoding)
        except InterruptedError as error:
            raise FusionCancelled(str(error)) from error
        except OSError as error:
            if isinstance(error, RasterioError):
                raise  # reading the input, not writing the scratch file
            raise OutputError(f"cannot write the scratch file {scratch}: {error.strerror or error}") from error
        _release_freed_memory()
        with cube:
            yield cube
    finally:
        os.unlink(scratch)


def _release_freed_memory() -> None:
    """Hand memory freed by GDAL's cache and numpy back to the system (glibc keeps it
    otherwise, and the process's footprint would stay at its high-water mark)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def _part(progress, start: float, end: float):
    if progress is None:
        return None
    return lambda fraction: progress(start + (end - start) * fraction)


def _block_shape(profile: dict) -> Tuple[int, int]:
    """The output's block rows and columns (whole blocks are written at once)."""
    if str(profile.get("tiled", "")).lower() in ("true", "yes", "1"):
        return int(profile.get("blockysize", 256)), int(profile.get("blockxsize", 256))
    return DEFAULT_TILE_SIZE, DEFAULT_TILE_SIZE


def _band_indexes(bands, count: int) -> list:
    from .georaster import FusionInputError

    if not bands:
        return list(range(1, count + 1))
    indexes = [int(b) for b in bands]
    wrong = [b for b in indexes if not 1 <= b <= count]
    if wrong:
        raise FusionInputError(f"band(s) {wrong} do not exist: the hyperspectral image has bands 1 to {count}")
    return indexes


def _fit_shape(rows: int, cols: int) -> Tuple[int, int]:
    """Read the scene for its statistics at most at ~SUBSPACE_FIT_PIXELS pixels."""
    factor = max(1.0, (rows * cols / SUBSPACE_FIT_PIXELS) ** 0.5)
    return max(2, int(rows / factor)), max(2, int(cols / factor))


# A description that only restates a band number or a wavelength ("band 35", "band 35 (0.6400
# Micrometers)" as GDAL's ENVI driver writes, "640.000 nm"): not a name of the input's own.
_GENERIC_DESCRIPTION = re.compile(
    r"^\s*(band\s*\d+)?\s*(\(?\s*[0-9.]+\s*[A-Za-zµ]*\s*\)?)?\s*$", re.IGNORECASE
)


def band_description(index: int, wavelength_nm: Optional[float], own: Optional[str]) -> str:
    """Short band description for the layer panel and Identify: "640.0 nm", with the input band's
    own name after it where it has one ("640.0 nm (VNIR 35)"); without a wavelength the own name,
    else "band <index>" (1-based index in the input)."""
    own = (own or "").strip()
    named = bool(own) and not _GENERIC_DESCRIPTION.match(own)
    if wavelength_nm is None:
        return own if named else f"band {index}"
    return f"{wavelength_nm:.1f} nm ({own})" if named else f"{wavelength_nm:.1f} nm"


def _write_band_metadata(dst, meta, indexes, usable, encoding=None) -> None:
    from rasterio.enums import ColorInterp

    if encoding is not None and encoding.is_scaled:
        dst.scales, dst.offsets = tuple(encoding.scales), tuple(encoding.offsets)
    for out_band, (index, good) in enumerate(zip(indexes, usable), start=1):
        tags = {"bbl": "1" if good else "0"}
        wavelength = None
        if meta.wavelengths_nm is not None:
            wavelength = float(meta.wavelengths_nm[index - 1])
            tags["wavelength"] = f"{wavelength:.4f}"
            tags["wavelength_units"] = "Nanometers"
        if meta.fwhm_nm is not None:
            tags["fwhm"] = f"{meta.fwhm_nm[index - 1]:.4f}"
        dst.update_tags(out_band, **tags)
        own = meta.band_names[index - 1] if meta.band_names else None
        dst.set_band_description(out_band, band_description(index, wavelength, own))
    # No band is a grey (or any colour) channel. GDAL (3.6, 3.10, 3.13 checked) cannot store
    # Undefined on the first band of a GeoTIFF (TIFF's MinIsBlack makes it grey) and keeps Gray there.
    dst.colorinterp = [ColorInterp.undefined] * dst.count
