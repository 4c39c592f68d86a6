"""The fusion's stages on a scene read by windows, shared by ``fuse_arrays`` and ``fuse_files``.

    pair = ScenePair(...)                                  # open inputs, plan grid (api.py)
    statistics = fit_scene_statistics(pair, K, psf, log)   # fit scene, estimate degradation
    safe = check_against_safe(pair, model, statistics, …)  # never worse than bicubic
    …                                                       # adapt (optional), fuse tiles, write

Both entry points build a :class:`ScenePair` (arrays in memory, or the LR-HSI's working-grid
cube and the MSI's raster) and run exactly these stages on it, so on an aligned pair at an
integer ratio they give the same result. Every stage that needs the spatial degradation takes
it from the statistics (psf.SpatialDegradation); none assumes one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np

from .psf import SpatialDegradation, degrade, wald

Window = Tuple[int, int, int, int]  # (row, col, rows, cols)

# LR pixels the scene statistics are fitted on at most; a larger scene is sampled by windows.
SUBSPACE_FIT_PIXELS = 50_000
FIT_WINDOW_LR = 96
# NaN columns between the windows of the fit mosaic: the detail fit's high-pass must not read
# across two windows' seam (it excludes pixels within 2 of a gap).
_SEAM = 3
# Windows of the estimation with more gaps than this are left out (gaps are filled there).
MAX_GAP_SHARE_TO_ESTIMATE = 0.1
# The reduced-pair check (LR-HSI as reference) on a central window of at most this many LR pixels.
SAFETY_WINDOW_LR = 96
# The fusion is used only when it is this far ahead on the reduced pair. Measured on Potsdam C
# (box PSF, ×3 and ×4): with the right MSI it leads there by 9–20 dB; with an MSI of another
# place (flipped, or noise) by 0.2–0.3 dB, while at full resolution it was then between 0.26 dB
# behind and 0.23 dB ahead of bicubic: a lead that small says nothing.
SAFETY_MARGIN_DB = 0.5
# Pixels per side of the reduced pair needed for a meaningful check (a 4 × 8 pair from Potsdam
# ×4 still tells a wrong MSI from the right one by 10 dB).
MIN_REDUCED_LR = 4


@dataclass
class ScenePair:
    """An LR-HSI and an HR-MSI on one working grid, read by windows.

    ``lr_shape`` (h, w): the working grid; ``hr_shape`` (H, W): the HR extent that holds the
    MSI (at most s·h × s·w); ``read_lr(window)`` → (B, rows, cols) float32 and
    ``read_hr(window)`` → (M, rows, cols) float32, windows in their own grid's pixels, NaN for
    missing data and outside the raster."""

    lr_shape: Tuple[int, int]
    hr_shape: Tuple[int, int]
    scale: int
    read_lr: Callable[[Window], np.ndarray]
    read_hr: Callable[[Window], np.ndarray]
    # The band centres (B,) in nm of what read_lr returns, None when unknown (raster_io reads
    # them from the raster's metadata); a "grid" model needs them (model.REPRESENTATIONS).
    wavelengths_nm: Optional[np.ndarray] = None

    def hr_mirrored(self, window: Window) -> np.ndarray:
        """An HR window, mirrored (half-sample symmetric) beyond the HR extent, as the
        degradation's matrices mirror a whole image at its edges."""
        row, col, rows, cols = window
        height, width = self.hr_shape
        r0, c0 = min(max(row, 0), height - 1), min(max(col, 0), width - 1)
        r1, c1 = max(min(row + rows, height), r0 + 1), max(min(col + cols, width), c0 + 1)
        inside = self.read_hr((r0, c0, r1 - r0, c1 - c0))
        padding = ((0, 0), (r0 - row, row + rows - r1), (c0 - col, col + cols - c1))
        if not any(p for pair in padding for p in pair):
            return inside
        return np.pad(inside, padding, mode="symmetric")

    def msi_at_lr(self, window: Window, degradation: SpatialDegradation) -> np.ndarray:
        """(M, rows, cols) the MSI degraded onto LR window ``window`` under ``degradation``;
        NaN where the PSF reads a missing MSI pixel (gaps are not spread by filling them)."""
        s = degradation.scale
        row, col, rows, cols = window
        halo = int(math.ceil(degradation.reach_hr() / s)) + 1
        block = self.hr_mirrored(((row - halo) * s, (col - halo) * s, (rows + 2 * halo) * s, (cols + 2 * halo) * s))
        missing = ~np.isfinite(block).all(0)
        if missing.any():
            means = np.nanmean(block, axis=(1, 2), keepdims=True)
            block = np.where(np.isfinite(block), block, np.nan_to_num(means))
        degraded = degrade(block.astype(np.float32), degradation)[:, halo : halo + rows, halo : halo + cols]
        if missing.any():
            touched = degrade(missing[None].astype(np.float32), degradation)[0, halo : halo + rows, halo : halo + cols]
            degraded[:, touched > 0] = np.nan
        return degraded


def fit_windows(lr_shape: Tuple[int, int], max_pixels: int = SUBSPACE_FIT_PIXELS) -> List[Window]:
    """The LR windows the scene statistics are fitted on: the whole scene when it has at most
    ``max_pixels`` pixels, else windows of FIT_WINDOW_LR spread evenly over it."""
    rows, cols = lr_shape
    if rows * cols <= max_pixels:
        return [(0, 0, rows, cols)]
    from .registration import measuring_windows

    per_axis = max(1, int(math.ceil(math.sqrt(max_pixels / FIT_WINDOW_LR**2))))
    return measuring_windows(lr_shape, FIT_WINDOW_LR, per_axis)


def mosaic(parts: List[np.ndarray]) -> np.ndarray:
    """Windows side by side, separated by NaN columns (one window: itself)."""
    if len(parts) == 1:
        return parts[0]
    rows = max(p.shape[1] for p in parts)
    pieces = []
    for part in parts:
        padded = np.full((part.shape[0], rows, part.shape[2] + _SEAM), np.nan, dtype=np.float32)
        padded[:, : part.shape[1], : part.shape[2]] = part
        pieces.append(padded)
    return np.concatenate(pieces, axis=2)


def fit_scene_statistics(pair: ScenePair, subspace_dim: int, psf: Optional[SpatialDegradation] = None, log=None):
    """Fit scene, estimate degradation: (model.SceneStatistics, registration.DegradationEstimate).

    The principal basis comes from the LR-HSI alone; the PSF and offset are then estimated
    from the pair (only the offset when the user gave ``psf``), and the MSI → subspace
    regression is fitted with the MSI degraded under that estimate. The statistics carry the
    estimate as their ``degradation``, and the pair's band centres for a model on the wavelength
    grid (SceneStatistics.set_wavelengths; centres it cannot use are logged and left out).
    Raises ValueError when no pixel has data in both."""
    from .api import fill_gaps, fit_scene
    from .model import SceneStatistics
    from .registration import DegradationEstimate, central_window, estimate_degradation, measuring_size, measuring_windows

    log = log or (lambda message: None)
    s = pair.scale
    windows = fit_windows(pair.lr_shape)
    lr = mosaic([pair.read_lr(w) for w in windows])
    start = psf if psf is not None else wald(s)
    msi_start = mosaic([pair.msi_at_lr(w, start) for w in windows])
    # The basis only: the regression is fitted once, with the MSI degraded as estimated below.
    statistics = fit_scene(lr, msi_start, subspace_dim, regression=False)
    available = min(subspace_dim, lr.shape[0])
    if statistics.signal_components is not None and statistics.signal_components < available:
        log(f"the hyperspectral image's noise leaves {statistics.signal_components} of the model's {available} "
            "spectral components to sharpen; the others are upsampled bicubically")

    pairs = []
    for window in measuring_windows(pair.lr_shape, measuring_size(s)):
        lr_window = pair.read_lr(window)
        r, c, h, w = window
        hr_window = pair.hr_mirrored((r * s, c * s, h * s, w * s))
        lr_valid, hr_valid = np.isfinite(lr_window).all(0), np.isfinite(hr_window).all(0)
        if min(lr_valid.mean(), hr_valid.mean()) < 1 - MAX_GAP_SHARE_TO_ESTIMATE:
            continue
        pairs.append(
            (fill_gaps(lr_window, lr_valid, statistics.band_mean), fill_gaps(hr_window, hr_valid, statistics.msi_mean))
        )
    if not pairs:
        # No window is clean enough (a no-data collar, a cloud mask): measure on the largest part
        # of the central window where both images have data.
        r, c, h, w = central_window(pair.lr_shape, measuring_size(s))
        lr_window, hr_window = valid_part(pair.read_lr((r, c, h, w)), pair.hr_mirrored((r * s, c * s, h * s, w * s)), s, log)
        if lr_window is not None:
            pairs = [(lr_window, hr_window)]
    if pairs:
        estimate = estimate_degradation(pairs, s, statistics.basis, statistics.band_mean, fixed=psf)
        log(estimate.describe())
        if psf is None:
            log(estimate.describe_psf())
        else:
            log(f"PSF as given: {psf.describe()}")
    else:
        estimate = DegradationEstimate(start, (0.0, 0.0), 1.0, False)
        log(f"the PSF could not be estimated either; assuming {start.describe()} (set PSF to the sensor's if known)")
    degradation = estimate.degradation
    msi = msi_start if degradation == start else mosaic([pair.msi_at_lr(w, degradation) for w in windows])
    valid = np.isfinite(lr).all(0) & np.isfinite(msi).all(0)
    statistics.fit_regression(lr, msi, valid=valid, max_pixels=SUBSPACE_FIT_PIXELS)
    statistics.degradation = degradation
    if pair.wavelengths_nm is not None:
        try:
            statistics.set_wavelengths(pair.wavelengths_nm)
        except ValueError as error:
            # Only a "grid" model reads them, and it then adds nothing to the base: fusion goes on.
            log(f"the band centres cannot be put on the wavelength grid ({error}); a model on that grid adds nothing here")
    assert isinstance(statistics, SceneStatistics)
    return statistics, estimate


def valid_part(lr_window: np.ndarray, hr_window: np.ndarray, scale: int, log=None):
    """The largest part of a window pair where both images have data, to measure the offset on
    (a no-data collar or a cloud mask need not switch the measurement off); (None, None), with
    a log line that names the image with the gaps and the remedy, when that part is too small.
    lr_window (B, h, w), hr_window (M, s·h, s·w) with NaN for no data."""
    from .registration import largest_valid_window

    rows, cols = lr_window.shape[1:]
    lr_valid = np.isfinite(lr_window).all(0)
    hr_valid = np.isfinite(hr_window[:, : rows * scale, : cols * scale]).all(0)
    hr_valid_lr = hr_valid.reshape(rows, scale, cols, scale).all(axis=(1, 3))
    r, c, h, w = largest_valid_window(lr_valid & hr_valid_lr)
    if min(h, w) >= MIN_REGISTRATION_WINDOW_LR:
        if log is not None:
            log(f"misregistration measured on the {h}×{w} hyperspectral pixels of the central area where both images have data")
        return lr_window[:, r : r + h, c : c + w], hr_window[:, r * scale : (r + h) * scale, c * scale : (c + w) * scale]
    if log is not None:
        gaps = [name for name, valid in (("hyperspectral", lr_valid), ("multispectral", hr_valid)) if valid.mean() < 1]
        log(
            f"misregistration not measured: the {' and the '.join(gaps)} image{'s have' if len(gaps) > 1 else ' has'} "
            f"no data in much of the central {rows}×{cols} hyperspectral "
            f"pixels, and no block of {MIN_REGISTRATION_WINDOW_LR}×{MIN_REGISTRATION_WINDOW_LR} has data in both; the "
            "images are taken as aligned. If they are not, co-register them first (e.g. QGIS's Georeferencer or "
            "gdalwarp) or crop the no-data areas away"
        )
    return None, None


# Hyperspectral pixels per side of the valid part measured on: enough edges to measure on.
MIN_REGISTRATION_WINDOW_LR = 12


@dataclass
class SafetyCheck:
    """The fusion against bicubic upsampling on the scene's own reduced pair (PSNR in dB over
    the LR-HSI as reference); ``use_fusion`` False means the conservative answer is written."""

    fused_psnr: float
    bicubic_psnr: float
    use_fusion: bool
    checked: bool = True

    def describe(self) -> str:
        if not self.checked:
            return "the scene is too small to check the fusion on its own reduced pair; fusion used"
        verdict = "fusion used" if self.use_fusion else (
            f"NOT ahead of bicubic upsampling by {SAFETY_MARGIN_DB} dB, so the output is the bicubic upsampling of the hyperspectral image "
            "(check the PSF and the co-registration of the two images)"
        )
        return (
            f"check on the scene's own reduced pair: fusion {self.fused_psnr:.2f} dB, bicubic "
            f"{self.bicubic_psnr:.2f} dB; {verdict}"
        )


def check_against_safe(pair: ScenePair, model, statistics, device, margin_db: float = SAFETY_MARGIN_DB) -> SafetyCheck:
    """Never worse than the safe answer: fuse the scene's reduced pair (the LR-HSI degraded
    once more by the working scale with the same PSF, and the MSI degraded onto the LR grid)
    on a central window and compare with bicubic upsampling, the LR-HSI as reference (Wald
    protocol applied to the scene itself)."""
    import torch

    from .api import fill_gaps
    from .interpolation import upsample_lr
    from .metrics import psnr
    from .registration import central_window

    degradation = statistics.degradation
    s = degradation.scale
    rows, cols = (min(SAFETY_WINDOW_LR, n) // s * s for n in pair.lr_shape)
    if min(rows, cols) // s < MIN_REDUCED_LR:
        return SafetyCheck(float("nan"), float("nan"), True, checked=False)
    row, col, _, _ = central_window(pair.lr_shape, SAFETY_WINDOW_LR)
    window = (row, col, rows, cols)
    reference = pair.read_lr(window)
    msi = pair.msi_at_lr(window, degradation)
    valid = np.isfinite(reference).all(0) & np.isfinite(msi).all(0)
    if valid.mean() < 0.5:
        return SafetyCheck(float("nan"), float("nan"), True, checked=False)
    reference = fill_gaps(reference, valid, statistics.band_mean)
    msi = fill_gaps(msi, valid, statistics.msi_mean)
    reduced = degradation.at_scale(s)
    low = degrade(reference, reduced)
    from dataclasses import replace

    tensors = replace(statistics, degradation=reduced).to_tensors(device)
    with torch.inference_mode():
        lr_tensor = torch.from_numpy(np.ascontiguousarray(low))[None].to(device)
        fused = model(lr_tensor, torch.from_numpy(np.ascontiguousarray(msi))[None].to(device), tensors).image
        bicubic = upsample_lr(lr_tensor, reduced, "bicubic")
    fused_psnr = psnr(reference, fused[0].float().cpu().numpy())
    bicubic_psnr = psnr(reference, bicubic[0].float().cpu().numpy())
    return SafetyCheck(fused_psnr, bicubic_psnr, bool(fused_psnr >= bicubic_psnr + margin_db))


def nonnegative_inputs(pair: ScenePair, statistics_windows: Optional[List[Window]] = None) -> bool:
    """Whether both inputs hold no negative value on the fit windows: then a negative output
    can only be ringing and is set to 0."""
    windows = statistics_windows or fit_windows(pair.lr_shape)
    s = pair.scale
    for r, c, h, w in windows:
        if np.nanmin(pair.read_lr((r, c, h, w)), initial=0.0) < 0:
            return False
        if np.nanmin(pair.hr_mirrored((r * s, c * s, h * s, w * s)), initial=0.0) < 0:
            return False
    return True
