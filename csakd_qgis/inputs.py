"""What the fusion checks, repairs and logs about its two inputs: band counts, an external
gain/offset, orientation, per-band gaps, and the log lines that say so. No QGIS needed."""

from __future__ import annotations

import numpy as np


MSI_TRAINED_BANDS = (3, 13)


def check_band_counts(indexes: list, hsi_count: int, msi_count: int, log) -> None:
    """Refuses too few hyperspectral bands for the MSI's; warns about MSI band counts outside
    what the model was trained on."""
    from .georaster import FusionInputError

    if len(indexes) < 4:
        raise FusionInputError(
            f"the hyperspectral image gives {len(indexes)} band(s); fusion needs at least 4 hyperspectral bands"
        )
    if len(indexes) <= msi_count:
        if hsi_count > msi_count:
            raise FusionInputError(
                f"{len(indexes)} hyperspectral band(s) chosen (BANDS) but the multispectral image has {msi_count}: "
                f"choose more than {msi_count} bands, or leave BANDS empty to fuse all {hsi_count}"
            )
        raise FusionInputError(
            f"the 'hyperspectral' image has {hsi_count} bands and the 'multispectral' one {msi_count}: "
            "the hyperspectral image must have more bands; are the two inputs swapped?"
        )
    low, high = MSI_TRAINED_BANDS
    if not low <= msi_count <= high:
        log(
            f"warning: the multispectral image has {msi_count} band(s); the model was trained on {low} to {high}. "
            "It is fused all the same; check the result (with 1 or 2 bands the spatial detail comes from a single "
            "brightness image)"
        )


def input_encoding(lr_ds, meta, log):
    """(scales, offsets) per band of the LR-HSI when they come from a metadata file beside it
    and the raster carries none of its own (EnMAP's gain 0.0001); None to use the raster's."""
    own = any(v != 1 for v in lr_ds.scales) or any(v != 0 for v in lr_ds.offsets)
    if meta.scales is None or own:
        return None
    log(f"gain and offset of every band taken from {meta.source} (value = gain · DN + offset)")
    return np.asarray(meta.scales, dtype=np.float64), np.asarray(meta.offsets, dtype=np.float64)


def log_input_properties(lr_ds, hr_ds, grid, meta, log) -> None:
    """One line for each input property the fusion repairs or adapts to."""
    from .georaster import orientation
    from .raster_io import missing_wavelengths_warning

    if meta.wavelengths_nm is None:
        log(missing_wavelengths_warning(lr_ds))
    else:
        log(f"wavelengths of the hyperspectral image read from {meta.source}")
    kind = orientation(lr_ds.transform)
    if kind != "north-up":
        log(f"the hyperspectral image is stored {'rotated' if kind == 'rotated' else 'flipped (south-up or east-to-west)'}: "
            "it is warped onto the north-up working grid")
    if grid.lr_width * grid.lr_height < SMALL_SCENE_LR_PIXELS:
        log(
            f"warning: the common area is only {grid.lr_width}×{grid.lr_height} hyperspectral pixels; the scene "
            "statistics are fitted on these few pixels and may be poor"
        )


SMALL_SCENE_LR_PIXELS = 16 * 16


def north_up_view(stack, hr_ds, log):
    """The MSI as a north-up raster for window reads (georaster.north_up), closed with ``stack``."""
    from .georaster import FlippedRaster, north_up

    view = north_up(hr_ds, log, "multispectral image (HRMSI)")
    if view is not hr_ds and not isinstance(view, FlippedRaster):
        stack.callback(view.close)
    return view


def set_aside_mostly_missing(lr_fit, indexes, meta, log) -> np.ndarray:
    """(len(indexes),) True for the bands that lack data in most pixels; they are written as
    bad bands (bbl = 0), and those the file does not already flag as bad are named in one log
    line."""
    from .georaster import mostly_missing_bands

    missing = mostly_missing_bands(lr_fit)
    named = []
    for position in np.flatnonzero(missing):
        index = indexes[position]
        if meta.bad_bands is not None and meta.bad_bands[index - 1]:
            continue
        where = f"{meta.wavelengths_nm[index - 1]:.1f} nm, " if meta.wavelengths_nm is not None else ""
        named.append(f"band {index} ({where}{1.0 - np.isfinite(lr_fit[position]).mean():.0%} missing)")
    if named:
        log("hyperspectral bands without data in most pixels, set aside as bad bands (bbl = 0, nodata in the "
            "output): " + ", ".join(named))
    return missing


def blank_band_gaps(block: np.ndarray, lr_cube, scale: int, row0: int, col0: int) -> None:
    """Set to NaN, in place, each band of the output ``block`` (bands, rows, cols) at (row0, col0)
    where that band of the working-grid LR-HSI has no data while other bands have: that band is
    nodata there. Only the bands with such a gap are upsampled (all 224 bands' masks cost
    0.17 s of a 512² scene)."""
    from .georaster import partial_gaps

    rows, cols = block.shape[1:]
    lr_r0, lr_c0 = row0 // scale, col0 // scale
    lr_r1 = min(lr_cube.rows, -(-(row0 + rows) // scale))
    lr_c1 = min(lr_cube.cols, -(-(col0 + cols) // scale))
    gaps = partial_gaps(lr_cube.read(lr_r0, lr_c0, lr_r1 - lr_r0, lr_c1 - lr_c0))
    r, c = row0 - lr_r0 * scale, col0 - lr_c0 * scale
    for band in np.flatnonzero(gaps.any(axis=(1, 2))):
        mask = gaps[band].repeat(scale, 0).repeat(scale, 1)[r : r + rows, c : c + cols]
        block[band, : mask.shape[0], : mask.shape[1]][mask] = np.nan


def set_aside_mostly_missing_msi(msi_sample, log) -> np.ndarray:
    """(M,) True for the MSI bands to keep, from a (M, rows, cols) sample of its pixels: a band
    without data in most pixels is set aside and named in the log (all are kept when none has
    data in most pixels)."""
    from .georaster import mostly_missing_bands

    missing = mostly_missing_bands(msi_sample)
    if missing.all():
        return np.ones(len(msi_sample), dtype=bool)
    for position in np.flatnonzero(missing):
        share = 1.0 - np.isfinite(msi_sample[position]).mean()
        log(f"band {position + 1} of the multispectral image has no data in {share:.0%} of the pixels: set aside "
            "(the fusion uses the other multispectral bands)")
    return ~missing
