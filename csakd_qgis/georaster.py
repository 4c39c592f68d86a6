"""Georeferenced alignment of an LR-HSI and an HR-MSI, and the fused GeoTIFF's profile.

The output grid is the HR-MSI's grid (its CRS, pixel size and pixel alignment) over the area
both images cover. The network works at an integer scale s: s = round(r), where r is the
LR-HSI's pixel size (measured in the MSI's CRS) divided by the MSI's pixel size, at least 2.
The LR-HSI is resampled onto a working grid of pixel size s × the MSI's pixel, aligned with
the output grid, so every working pixel covers exactly s × s output pixels. For the Berlin
pair (30 m / 3.6 m, r = 8.33) s = 8 and the working pixel is 28.8 m.

The LR-HSI is resampled onto the working grid once per run, into an uncompressed scratch file
(:class:`WorkingGridCube`): by averaging when the working pixel is larger than the sensor's,
by cubic interpolation when it is smaller, and not at all when it is the LR-HSI's own grid.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .transforms import compose

MIN_RATIO = 1.5
MAX_SCALE = 16
# Hyperspectral pixels per side of the common area below which the inputs are refused: a
# 2 × 2 overlap gives a "fused" image whose statistics rest on 4 pixels.
MIN_COMMON_LR = 4


class FusionInputError(ValueError):
    """The inputs cannot be fused; the message says why and what to do."""


@dataclass(frozen=True)
class FusionGrid:
    crs: object
    transform: object  # output (HR) transform
    width: int
    height: int
    ratio: float  # the inputs' true resolution ratio
    scale: int  # the network's working scale
    lr_transform: object
    lr_width: int
    lr_height: int

    @property
    def padded_shape(self):
        return self.lr_height * self.scale, self.lr_width * self.scale


def working_scale(ratio: float) -> int:
    """The rule that maps a resolution ratio onto the network's integer working scale."""
    if ratio < MIN_RATIO:
        raise FusionInputError(
            f"the multispectral image is not sharper than the hyperspectral one (resolution ratio {ratio:.2f}); "
            "give the high-resolution image as HRMSI and the coarse one as LRHSI"
        )
    if ratio > MAX_SCALE + 0.5:
        raise FusionInputError(
            f"resolution ratio {ratio:.1f} is beyond what the model supports (up to {MAX_SCALE}); "
            "resample the multispectral image to a coarser pixel first"
        )
    return max(2, int(round(ratio)))


def _check_georeferenced(dataset, role: str) -> None:
    if dataset.crs is None:
        raise FusionInputError(
            f"the {role} ({dataset.name}) has no coordinate reference system; assign one "
            "(Raster ▸ Projections ▸ Assign Projection, or gdal_edit.py -a_srs) and run again"
        )


def orientation(transform) -> str:
    """'north-up', 'flipped' (an axis runs the other way: south-up rows and/or east-to-west
    columns, as gdal_grid and many netCDF/HDF conversions write) or 'rotated' (a GDAL
    geotransform with rotation terms)."""
    if transform.b != 0 or transform.d != 0:
        return "rotated"
    return "north-up" if transform.a > 0 and transform.e < 0 else "flipped"


class FlippedRaster:
    """A flipped (south-up and/or east-to-west) rasterio dataset seen as north-up.

    Every GDAL geotransform orientation is valid and read correctly by GDAL, QGIS and
    gdalwarp; the grid planning and the window reads here assume row 0 in the north and
    column 0 in the west. A flip is exact: windows are mapped onto the mirrored window of the
    file and the pixels mirrored back, so values, per-band no-data and mask bands are the
    file's own (no resampling). Everything else is the dataset's.
    """

    def __init__(self, dataset):
        from affine import Affine

        self._dataset = dataset
        t = dataset.transform
        self._flip_x, self._flip_y = t.a < 0, t.e > 0
        left = t.c + t.a * dataset.width if self._flip_x else t.c
        top = t.f + t.e * dataset.height if self._flip_y else t.f
        self.transform = Affine(abs(t.a), 0.0, left, 0.0, -abs(t.e), top)

    def __getattr__(self, name):
        return getattr(self._dataset, name)

    @property
    def bounds(self):
        from rasterio.coords import BoundingBox

        t = self.transform
        return BoundingBox(t.c, t.f + t.e * self.height, t.c + t.a * self.width, t.f)

    def window_transform(self, window):
        from rasterio.windows import transform

        return transform(window, self.transform)

    def read(self, indexes=None, window=None, out_shape=None, **kwargs):
        from rasterio.windows import Window

        if kwargs.get("boundless"):
            raise ValueError("boundless reads of a flipped raster are not supported")
        if window is None:
            window = Window(0, 0, self.width, self.height)
        col, row = window.col_off, window.row_off
        if self._flip_x:
            col = self.width - col - window.width
        if self._flip_y:
            row = self.height - row - window.height
        data = self._dataset.read(indexes, window=Window(col, row, window.width, window.height), out_shape=out_shape, **kwargs)
        if self._flip_y:
            data = data[..., ::-1, :]
        if self._flip_x:
            data = data[..., :, ::-1]
        return data


class BandSubset:
    """Bands ``indexes`` (1-based) of a raster seen as a raster of their own (for an MSI band
    set aside because it has no data in most pixels); everything else is the raster's."""

    def __init__(self, dataset, indexes):
        self._dataset = dataset
        self._indexes = [int(i) for i in indexes]
        self.count = len(self._indexes)

    def __getattr__(self, name):
        return getattr(self._dataset, name)

    def _pick(self, values):
        return tuple(values[i - 1] for i in self._indexes)

    @property
    def scales(self):
        return self._pick(self._dataset.scales)

    @property
    def offsets(self):
        return self._pick(self._dataset.offsets)

    @property
    def nodatavals(self):
        return self._pick(self._dataset.nodatavals)

    def read(self, indexes=None, **kwargs):
        chosen = self._indexes if indexes is None else [self._indexes[i - 1] for i in np.atleast_1d(indexes)]
        return self._dataset.read(chosen, **kwargs)


def north_up(dataset, log=None, role: str = "image"):
    """``dataset`` as a north-up raster: itself when it is one, a :class:`FlippedRaster`
    when stored south-up or east-to-west, and a north-up WarpedVRT when rotated (nearest
    neighbour for a quarter turn, which is exact, cubic otherwise). The
    LR-HSI itself is always warped from the file (any orientation); this view serves the grid
    planning and the MSI's window reads."""
    kind = orientation(dataset.transform)
    if kind == "north-up":
        return dataset
    if kind == "flipped":
        if log is not None:
            log(f"the {role} is stored {'south-up' if dataset.transform.e > 0 else 'east-to-west'}: read as north-up (no resampling)")
        return FlippedRaster(dataset)
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    t = dataset.transform
    # Turned by a quarter turn: a permutation of the pixels, read exactly by nearest neighbour
    # (GDAL's cubic warper does not reproduce the pixels even on the very same centres).
    quarter_turn = t.a == 0 and t.e == 0
    resampling = Resampling.nearest if quarter_turn else Resampling.cubic
    if log is not None:
        log(f"the {role} is on a rotated grid: read through a north-up grid "
            + ("(a quarter turn: no resampling)" if quarter_turn else "by cubic resampling"))
    # float32 with the sentinel read_as_float takes for no data: the corners outside a rotated
    # footprint are no data, also for a raster that declares no no-data value.
    return WarpedVRT(dataset, resampling=resampling, src_nodata=dataset.nodata, nodata=_vrt_nodata_float, dtype="float32")


def plan_grid(lr_dataset, hr_dataset) -> FusionGrid:
    """The output and working grids for two open rasterio datasets of any GDAL geotransform
    orientation (north-up, flipped or rotated); the output grid is the MSI's made north-up.
    Raises FusionInputError when they cannot be fused."""
    _check_georeferenced(lr_dataset, "hyperspectral image (LRHSI)")
    _check_georeferenced(hr_dataset, "multispectral image (HRMSI)")
    # Footprints and pixel sizes from north-up views: a south-up raster's bounds have
    # bottom > top and would share no area with anything.
    lr_view, hr_view = north_up(lr_dataset), north_up(hr_dataset)
    try:
        return _plan_north_up(lr_view, hr_view)
    finally:
        for view, dataset in ((lr_view, lr_dataset), (hr_view, hr_dataset)):
            if view is not dataset and not isinstance(view, FlippedRaster):
                view.close()


def _plan_north_up(lr_dataset, hr_dataset) -> FusionGrid:
    from rasterio.warp import calculate_default_transform, transform_bounds
    from rasterio.windows import Window, from_bounds
    from affine import Affine

    hr_crs = hr_dataset.crs
    lr_bounds = transform_bounds(lr_dataset.crs, hr_crs, *lr_dataset.bounds, densify_pts=21)
    hr_bounds = hr_dataset.bounds
    left, right = max(lr_bounds[0], hr_bounds.left), min(lr_bounds[2], hr_bounds.right)
    bottom, top = max(lr_bounds[1], hr_bounds.bottom), min(lr_bounds[3], hr_bounds.top)
    if left >= right or bottom >= top:
        raise FusionInputError(
            "the two images do not overlap: the hyperspectral footprint "
            f"{tuple(round(v, 1) for v in lr_bounds)} and the multispectral footprint "
            f"{tuple(round(v, 1) for v in hr_bounds)} (both in {hr_crs.to_string()}) share no area; "
            "check that both layers show the same place and have the right CRS"
        )
    window = from_bounds(left, bottom, right, top, hr_dataset.transform)
    col0 = max(0, math.ceil(window.col_off - 1e-6))
    row0 = max(0, math.ceil(window.row_off - 1e-6))
    col1 = min(hr_dataset.width, math.floor(window.col_off + window.width + 1e-6))
    row1 = min(hr_dataset.height, math.floor(window.row_off + window.height + 1e-6))
    if col1 - col0 < 1 or row1 - row0 < 1:
        raise FusionInputError("the images overlap by less than one multispectral pixel")
    out_window = Window(col0, row0, col1 - col0, row1 - row0)
    out_transform = hr_dataset.window_transform(out_window)

    lr_in_hr, _, _ = calculate_default_transform(
        lr_dataset.crs, hr_crs, lr_dataset.width, lr_dataset.height, *lr_dataset.bounds
    )
    lr_pixel = math.sqrt(abs(lr_in_hr.a * lr_in_hr.e))
    hr_pixel = math.sqrt(abs(hr_dataset.transform.a * hr_dataset.transform.e))
    ratio = lr_pixel / hr_pixel
    scale = working_scale(ratio)
    width, height = int(out_window.width), int(out_window.height)
    lr_width, lr_height = math.ceil(width / scale), math.ceil(height / scale)
    if lr_width < MIN_COMMON_LR or lr_height < MIN_COMMON_LR:
        raise FusionInputError(
            f"the common area is only {width}×{height} multispectral pixels ({lr_width}×{lr_height} working pixels of "
            f"{scale} × {scale}); fusion needs at least {MIN_COMMON_LR}×{MIN_COMMON_LR} hyperspectral pixels in common "
            "(the scene statistics are fitted on them): check the footprints or choose images that overlap more"
        )
    return FusionGrid(
        hr_crs, out_transform, width, height, ratio, scale,
        compose(out_transform, Affine.scale(scale)), lr_width, lr_height,
    )


def lr_resampling(lr_dataset, grid: FusionGrid):
    """How the LR-HSI is resampled onto the working grid.

    Working pixels larger than the sensor's: average; smaller: cubic interpolation; the
    very same grid (same CRS, same pixel size, whole-pixel offset): the pixels themselves.
    """
    from rasterio.enums import Resampling

    lr_pixel_in_grid = grid.ratio / grid.scale
    if lr_pixel_in_grid < 0.95:
        return Resampling.average
    relative = _working_grid_in_lr_pixels(lr_dataset, grid)
    if relative is not None:
        # A flipped or quarter-turned LR-HSI on the same grid maps pixel centres onto pixel
        # centres too: its pixels, permuted.
        terms = (relative.a, relative.b, relative.d, relative.e)
        if sorted(abs(round(v)) for v in terms) == [0, 0, 1, 1] and round(relative.a * relative.e - relative.b * relative.d) != 0:
            return Resampling.nearest
    return Resampling.cubic


def _working_grid_in_lr_pixels(lr_dataset, grid: FusionGrid):
    """The working grid's pixel → LR-HSI pixel transform (an Affine) when it maps pixel corners
    onto pixel corners (same CRS, whole-number terms); None otherwise."""
    if lr_dataset.crs != grid.crs:
        return None
    relative = compose(~lr_dataset.transform, grid.lr_transform)
    if any(abs(v - round(v)) >= 1e-6 for v in (relative.a, relative.b, relative.c, relative.d, relative.e, relative.f)):
        return None
    return relative


def same_grid_offset(lr_dataset, grid: FusionGrid) -> Optional[Tuple[int, int]]:
    """(row, col) of the working grid's first pixel in the LR-HSI's own pixels when the working
    grid is the LR-HSI's own grid moved by whole pixels (same CRS, pixel size and orientation):
    then resampling is a plain read. None otherwise."""
    relative = _working_grid_in_lr_pixels(lr_dataset, grid)
    if relative is None or (round(relative.a), round(relative.b), round(relative.d), round(relative.e)) != (1, 0, 0, 1):
        return None
    return int(round(relative.f)), int(round(relative.c))


def read_same_grid(lr_dataset, indexes, row: int, col: int, rows: int, cols: int) -> np.ndarray:
    """(len(indexes), rows, cols) float32 raw values of a window of the LR-HSI in its own pixels,
    NaN where a band has no data (its own no-data value, or the raster's mask or alpha band) and
    outside the raster; no scale or offset applied (see :func:`scaled`).

    All bands are read in one call and the no-data values compared here: a masked read asks
    GDAL for every band's mask in turn, which, for a pixel-interleaved raster larger than the
    block cache, decompresses every tile once per band (a 2048² output took 183 s instead of
    55 s)."""
    from rasterio.enums import MaskFlags
    from rasterio.windows import Window

    def read(r0, c0, height, width):
        window = Window(c0, r0, width, height)
        raw = lr_dataset.read(list(indexes), window=window)
        values = raw.astype(np.float32)
        for position, index in enumerate(indexes):
            nodata = lr_dataset.nodatavals[index - 1]
            if nodata is not None and not np.isnan(nodata):
                values[position][raw[position] == nodata] = np.nan
        flags = {flag for index in indexes for flag in lr_dataset.mask_flag_enums[index - 1]}
        if MaskFlags.per_dataset in flags or MaskFlags.alpha in flags:
            values[:, lr_dataset.dataset_mask(window=window) == 0] = np.nan
        return values

    return padded_window(read, len(indexes), lr_dataset.height, lr_dataset.width, row, col, rows, cols)


def lr_on_working_grid(lr_dataset, grid: FusionGrid):
    """A WarpedVRT of the LR-HSI on the working grid (reprojected when the CRS differs)."""
    from rasterio.vrt import WarpedVRT

    return WarpedVRT(
        lr_dataset, crs=grid.crs, transform=grid.lr_transform, width=grid.lr_width, height=grid.lr_height,
        resampling=lr_resampling(lr_dataset, grid), src_nodata=lr_dataset.nodata, nodata=_vrt_nodata(lr_dataset),
    )


_vrt_nodata_float = -3.4e38


def _vrt_nodata(dataset):
    return dataset.nodata if dataset.nodata is not None else -3.4e38


def read_as_float(dataset, window=None, out_shape=None, indexes=None, boundless=False) -> np.ndarray:
    """float32 (B, rows, cols) with missing data as NaN and scale/offset applied."""
    kwargs = {"window": window, "masked": True, "indexes": indexes}
    if out_shape is not None:
        kwargs["out_shape"] = out_shape
    if boundless:
        kwargs["boundless"] = True
    data = dataset.read(**kwargs)
    values = np.asarray(data.astype(np.float32).filled(np.nan))
    nodata = dataset.nodata
    if nodata is not None and nodata <= -3e38:
        values[values <= -3e38] = np.nan
    return scaled(values, dataset, indexes if indexes is not None else list(range(1, dataset.count + 1)))


def scaled(values: np.ndarray, dataset, indexes, encoding=None) -> np.ndarray:
    """(B, rows, cols) raw values of bands ``indexes`` (1-based) in the raster's units: each
    band's scale and offset applied (the raster's own, or ``encoding`` = (scales, offsets) per
    band of the raster when they come from a metadata file beside it)."""
    all_scales, all_offsets = encoding if encoding is not None else (dataset.scales, dataset.offsets)
    scales = np.array([all_scales[i - 1] for i in indexes], dtype=np.float32).reshape(-1, 1, 1)
    offsets = np.array([all_offsets[i - 1] for i in indexes], dtype=np.float32).reshape(-1, 1, 1)
    return values * scales + offsets


class OutputEncoding:
    """How fused values (float32, the LR-HSI's physical units) are stored in the output.

    float32 stores them as they are. An integer output keeps the input's encoding: digital
    numbers DN = (value − offset) / scale, rounded, with the scale and offset written on the
    output bands (GDAL's scale/offset: value = scale·DN + offset), as EnMAP, Sentinel-2 and
    Landsat products are distributed. An input stored as floats has no encoding to keep: it
    gets the finest power-of-ten scale under which twice its largest absolute value still
    fits (reflectance up to 1 → 0.0001 in int16). Values outside the type's range are
    clipped and counted in ``clipped`` (uint16 holds no negative values).
    """

    def __init__(self, dtype: str, scales: np.ndarray, offsets: np.ndarray):
        if dtype not in OUTPUT_DTYPES:
            raise FusionInputError(f"output data type {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
        self.dtype = dtype
        self.nodata = OUTPUT_DTYPES[dtype]
        self.scales = np.asarray(scales, dtype=np.float64)
        self.offsets = np.asarray(offsets, dtype=np.float64)
        self.clipped = 0

    @classmethod
    def for_input(cls, dtype: str, input_dtype: str, scales, offsets, largest: float) -> "OutputEncoding":
        """The encoding of an output of ``dtype`` for an input of numpy type ``input_dtype``
        whose fused bands have these GDAL ``scales`` and ``offsets`` and whose values reach
        ``largest`` in absolute value (physical units)."""
        bands = len(scales)
        if dtype == "float32":
            return cls(dtype, np.ones(bands), np.zeros(bands))
        if np.issubdtype(np.dtype(input_dtype), np.integer):
            return cls(dtype, scales, offsets)
        headroom = 2.0 * max(float(largest), 1e-30) / np.iinfo(dtype).max
        return cls(dtype, np.full(bands, 10.0 ** math.ceil(math.log10(headroom))), np.zeros(bands))

    @property
    def is_scaled(self) -> bool:
        return bool((self.scales != 1).any() or (self.offsets != 0).any())

    def describe(self) -> str:
        if self.dtype == "float32":
            return "float32 output in the hyperspectral image's units"
        scales, offsets = np.unique(self.scales), np.unique(self.offsets)
        scale = f"{scales[0]:g}" if len(scales) == 1 else "per band"
        offset = f"{offsets[0]:g}" if len(offsets) == 1 else "per band"
        return (f"{self.dtype} output as digital numbers with scale {scale} and offset {offset} written on its bands "
                "(value = scale · DN + offset)")

    def encode(self, block: np.ndarray) -> np.ndarray:
        """(B, rows, cols) physical float values → the output's type; NaN → nodata. A float32
        output is encoded in place (the block given is returned, changed)."""
        if self.dtype == "float32":
            # In place: the block is the caller's to give away, and a 224-band 256² block's copy
            # and full-size mask cost 0.1 s each, a tenth of a 512² scene's whole fusion.
            out = block.astype(np.float32, copy=False)
            nonfinite = ~np.isfinite(out)
            if nonfinite.any():
                out[nonfinite] = self.nodata
            return out
        missing = ~np.isfinite(block)
        info = np.iinfo(self.dtype)
        low, high = info.min, info.max
        # The nodata value is kept for missing pixels only.
        if self.nodata == low:
            low += 1
        if self.nodata == high:
            high -= 1
        digital = np.rint((np.nan_to_num(block) - self.offsets[:, None, None]) / self.scales[:, None, None])
        outside = ((digital < low) | (digital > high)) & ~missing
        self.clipped += int(outside.sum())
        out = np.clip(digital, low, high).astype(self.dtype)
        out[missing] = self.nodata
        return out


# A band without data in more than this share of the pixels where the other bands have data
# is set aside like a bad band (bbl = 0) rather than filled.
MOSTLY_MISSING_SHARE = 0.5


def mostly_missing_bands(sample: np.ndarray) -> np.ndarray:
    """(B,) True for the bands of a (B, rows, cols) sample (NaN = no data) that lack data in
    more than ``MOSTLY_MISSING_SHARE`` of the pixels where any band has data."""
    finite = np.isfinite(sample)
    anywhere = finite.any(0)
    if not anywhere.any():
        return np.zeros(len(sample), dtype=bool)
    return 1.0 - finite[:, anywhere].mean(1) > MOSTLY_MISSING_SHARE


def partial_gaps(image: np.ndarray) -> np.ndarray:
    """(B, rows, cols) True where a band has no data at a pixel at which another band has."""
    finite = np.isfinite(image)
    return ~finite & finite.any(0)


def band_means(image: np.ndarray) -> np.ndarray:
    """(B,) mean of each band's finite values in (B, rows, cols); 0 for a band without any (such
    a band is set aside before fusion: the value only keeps the arithmetic finite, and silent)."""
    finite = np.isfinite(image)
    counts = finite.sum(axis=(1, 2))
    totals = np.where(finite, image, 0).sum(axis=(1, 2), dtype=np.float64)
    return (totals / np.maximum(counts, 1)).astype(np.float32)


def fill_partial_gaps(image: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """(B, rows, cols) float32 with each value missing in one band at a pixel where other
    bands have data filled from that band's valid neighbours (``fill_gaps``; ``fallback``
    (B,) where there are none). Pixels without data in any band stay NaN, so that the fusion
    still leaves them out; a value missing in one band thus costs only that band there."""
    gaps = partial_gaps(image)
    if not gaps.any():
        return image
    from .api import fill_gaps

    out = np.array(image, dtype=np.float32, copy=True)
    for band in np.flatnonzero(gaps.any(axis=(1, 2))):
        filled = fill_gaps(image[band : band + 1], np.isfinite(image[band]), np.asarray(fallback)[band : band + 1])[0]
        out[band, gaps[band]] = filled[gaps[band]]
    return out


OUTPUT_DTYPES = {"float32": -9999.0, "int16": -32768, "uint16": 65535}


def output_profile(grid: FusionGrid, bands: int, dtype: str = "float32", creation_options: Optional[dict] = None) -> dict:
    """A tiled, compressed GeoTIFF on the output grid; BigTIFF when it could pass 4 GB."""
    if dtype not in OUTPUT_DTYPES:
        raise FusionInputError(f"output data type {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    size = grid.width * grid.height * bands * np.dtype(dtype).itemsize
    profile = {
        "driver": "GTiff", "dtype": dtype, "count": bands, "width": grid.width, "height": grid.height,
        "crs": grid.crs, "transform": grid.transform, "nodata": OUTPUT_DTYPES[dtype],
        "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
        "predictor": 3 if dtype == "float32" else 2, "interleave": "band", "num_threads": "all_cpus",
        "bigtiff": "yes" if size > 3_500_000_000 else "if_safer",
    }
    for key, value in (creation_options or {}).items():
        profile[key.lower()] = value
    return profile


def padded_window(read, bands: int, height: int, width: int, row: int, col: int, rows: int, cols: int) -> np.ndarray:
    """(bands, rows, cols) float32 window of an image of ``height`` × ``width`` pixels that may
    reach past it; the part outside is NaN. ``read(row, col, rows, cols)`` reads a window
    inside the image. The one rule for every windowed reader (rasters, the working-grid cube,
    arrays in memory)."""
    out = np.full((bands, rows, cols), np.nan, dtype=np.float32)
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + rows, height), min(col + cols, width)
    if r1 > r0 and c1 > c0:
        out[:, r0 - row : r1 - row, c0 - col : c1 - col] = read(r0, c0, r1 - r0, c1 - c0)
    return out


def read_padded(dataset, row: int, col: int, rows: int, cols: int) -> np.ndarray:
    """Like read_as_float for a window that may reach past the raster; the part outside is NaN.

    (rasterio's boundless reads build a warped VRT on every call, far too slow per tile.)
    """
    from rasterio.windows import Window

    def read(r0, c0, h, w):
        return read_as_float(dataset, window=Window(c0, r0, w, h))

    return padded_window(read, dataset.count, dataset.height, dataset.width, row, col, rows, cols)


def hr_reader(hr_dataset, grid: FusionGrid):
    """read(window) → (M, rows, cols) float32 of the HR-MSI, the window (row, col, rows, cols)
    in output-grid pixels; NaN outside the raster (see :func:`read_padded`)."""
    col0 = int(round((grid.transform.c - hr_dataset.transform.c) / hr_dataset.transform.a))
    row0 = int(round((grid.transform.f - hr_dataset.transform.f) / hr_dataset.transform.e))
    return lambda w: read_padded(hr_dataset, row0 + w[0], col0 + w[1], w[2], w[3])


class WorkingGridCube:
    """The LR-HSI resampled once onto the working grid, in an uncompressed scratch file.

    Reading every tile through the warping VRT would resample and decompress the same
    source blocks again and again (minutes for a large 224-band scene). The scratch file is
    pixel-interleaved, so a window is one contiguous read per row; it is read with plain
    file reads rather than mapped, so the process's memory does not grow with the scene.
    """

    STRIP_BYTES = 16 * 1024 * 1024

    def __init__(self, path, bands: int, rows: int, cols: int):
        self.path = path
        self.bands, self.rows, self.cols = bands, rows, cols
        self._file = open(path, "rb")

    @classmethod
    def materialise(
        cls, lr_dataset, grid: FusionGrid, indexes, path, progress=None, cancelled=None, encoding=None
    ) -> "WorkingGridCube":
        """Resample bands ``indexes`` of ``lr_dataset`` onto ``grid``'s working grid into
        ``path``, strip by strip (NaN for no data, scale and offset applied: the raster's own,
        or ``encoding`` = (scales, offsets) per band, see :func:`scaled`)."""
        bands, rows, cols = len(indexes), grid.lr_height, grid.lr_width
        strip = max(1, cls.STRIP_BYTES // (bands * cols * 4))
        resampling = lr_resampling(lr_dataset, grid)
        # The LR-HSI's own grid (the usual case when the MSI was resampled to a multiple of it):
        # a plain read gives the very same values as the warper without its per-strip set-up
        # (a 224-band 170² scene: 0.4 s through the warper).
        same_grid = same_grid_offset(lr_dataset, grid)
        # GDAL allows a no-data value per band (ENVI, VRT, netCDF); the warper takes one per call.
        groups = {}
        for position, index in enumerate(indexes):
            nodata = lr_dataset.nodatavals[index - 1]
            groups.setdefault(np.nan if nodata is not None and np.isnan(nodata) else nodata, []).append(position)
        with open(path, "wb") as scratch:
            for row in range(0, rows, strip):
                if cancelled is not None and cancelled():
                    raise InterruptedError("cancelled while resampling the hyperspectral image")
                count = min(strip, rows - row)
                if same_grid is not None:
                    values = read_same_grid(lr_dataset, indexes, same_grid[0] + row, same_grid[1], count, cols)
                else:
                    values = cls._warped_strip(lr_dataset, grid, indexes, groups, resampling, row, count)
                values = scaled(values, lr_dataset, indexes, encoding)
                scratch.write(np.ascontiguousarray(values.transpose(1, 2, 0)).tobytes())
                if progress is not None:
                    progress((row + count) / rows)
        return cls(path, bands, rows, cols)

    @staticmethod
    def _warped_strip(lr_dataset, grid: FusionGrid, indexes, groups, resampling, row: int, count: int) -> np.ndarray:
        """(bands, count, cols) raw values of working-grid rows row … row + count − 1 through GDAL's
        warper; ``groups`` maps each no-data value to the positions (in ``indexes``) of its bands."""
        from affine import Affine
        from rasterio import band
        from rasterio.warp import reproject

        values = np.full((len(indexes), count, grid.lr_width), np.nan, dtype=np.float32)
        # One warp of all bands sharing a no-data value at once (usually all): the
        # source's blocks are decoded once per strip, not once per band.
        for nodata, positions in groups.items():
            part = values if len(groups) == 1 else np.full((len(positions), count, grid.lr_width), np.nan, np.float32)
            reproject(
                band(lr_dataset, [indexes[p] for p in positions]), part,
                src_nodata=nodata, dst_transform=compose(grid.lr_transform, Affine.translation(0, row)),
                dst_crs=grid.crs, dst_nodata=np.nan, resampling=resampling, num_threads=os.cpu_count() or 1,
                # Each band its own no-data: a bad band holds nothing where the others hold data.
                UNIFIED_SRC_NODATA="NO",
            )
            values[positions] = part
        return values

    def read(self, row: int, col: int, rows: int, cols: int) -> np.ndarray:
        """(bands, rows, cols) float32 of a window inside the grid."""
        out = np.empty((rows, cols, self.bands), dtype=np.float32)
        pixel = self.bands * 4
        for i in range(rows):
            self._file.seek(((row + i) * self.cols + col) * pixel)
            out[i] = np.frombuffer(self._file.read(cols * pixel), dtype=np.float32).reshape(cols, self.bands)
        return out.transpose(2, 0, 1)

    def sample(self, rows: int, cols: int) -> np.ndarray:
        """An evenly spaced (bands, rows, cols) subsample of the whole grid (for the scene statistics)."""
        row_index = np.linspace(0, self.rows - 1, rows).round().astype(int)
        col_index = np.linspace(0, self.cols - 1, cols).round().astype(int)
        out = np.empty((self.bands, rows, cols), dtype=np.float32)
        for i, row in enumerate(row_index):
            out[:, i] = self.read(int(row), 0, 1, self.cols)[:, 0, col_index]
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Ground pixels whose sides differ by more than this are not square enough for one working
# scale: an MSI in degrees at 52° N has 6.2 m × 10 m pixels, and one scale from their geometric
# mean made the fused error 2.4× that of the same MSI projected (3.5× at 65° N).
MAX_PIXEL_ASPECT = 1.1


def ground_pixel_size(dataset) -> tuple:
    """(width, height) in metres on the ground of one pixel at the raster's centre (geodesic
    distances on the WGS 84 ellipsoid, pyproj.Geod), for any CRS."""
    import warnings

    from rasterio.warp import transform

    with warnings.catch_warnings():
        # pyproj warns at import when it finds no PROJ data folder (Debian 12 with rasterio's
        # environment); geodesic distances on an ellipsoid need none.
        warnings.simplefilter("ignore", UserWarning)
        from pyproj import Geod

    t = dataset.transform
    col, row = dataset.width / 2.0, dataset.height / 2.0
    points = [t * (col, row), t * (col + 1, row), t * (col, row + 1)]
    lons, lats = transform(dataset.crs, "EPSG:4326", [p[0] for p in points], [p[1] for p in points])
    geod = Geod(ellps="WGS84")
    width = geod.inv(lons[0], lats[0], lons[1], lats[1])[2]
    height = geod.inv(lons[0], lats[0], lons[2], lats[2])[2]
    return abs(width), abs(height)


def local_metric_crs(lr_dataset, hr_dataset):
    """The CRS a working grid with square ground pixels is planned in: the LR-HSI's own CRS
    when it is projected, else the UTM zone of the MSI's centre."""
    from rasterio.crs import CRS
    from rasterio.warp import transform

    if lr_dataset.crs is not None and lr_dataset.crs.is_projected:
        return lr_dataset.crs
    t = hr_dataset.transform
    x, y = t * (hr_dataset.width / 2.0, hr_dataset.height / 2.0)
    (lon,), (lat,) = transform(hr_dataset.crs, "EPSG:4326", [x], [y])
    zone = int((lon + 180) // 6) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def msi_on_square_ground_pixels(lr_dataset, hr_dataset, log=None):
    """The HR-MSI itself when its pixels are about square on the ground, else a WarpedVRT of
    it on a local metric grid (:func:`local_metric_crs`) whose square pixels are as large as
    the MSI's coarser ground side (pixel-averaged, so no detail is invented along the finer
    side). Fusion and the output then follow ground distances."""
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    width, height = ground_pixel_size(hr_dataset)
    if max(width, height) <= MAX_PIXEL_ASPECT * min(width, height):
        return hr_dataset
    crs = local_metric_crs(lr_dataset, hr_dataset)
    size = max(width, height)
    transform, columns, rows = _metric_grid(lr_dataset, hr_dataset, crs, size)
    if log is not None:
        log(
            f"the multispectral image's pixels are {width:.1f} m × {height:.1f} m on the ground (not square); it is "
            f"fused on a {abs(transform.a):.2f} m grid in {crs.to_string()} and the output is on that grid"
        )
    return WarpedVRT(
        hr_dataset, crs=crs, transform=transform, width=columns, height=rows, resampling=Resampling.average,
        src_nodata=hr_dataset.nodata, nodata=_vrt_nodata(hr_dataset),
    )


def _metric_grid(lr_dataset, hr_dataset, crs, size: float):
    """(transform, columns, rows) of a north-up grid in ``crs`` covering the MSI with square
    pixels of about ``size``. In the LR-HSI's own CRS the pixel is the LR pixel divided by a
    whole number and the grid is aligned on the LR-HSI's, so the working grid is the
    LR-HSI's own and it is not resampled at all (a grid with another phase would be cubic
    interpolated: measured ×1.5 the error of the projected MSI, against ×1.1 aligned)."""
    from affine import Affine
    from rasterio.warp import calculate_default_transform, transform_bounds

    left, bottom, right, top = transform_bounds(hr_dataset.crs, crs, *hr_dataset.bounds, densify_pts=21)
    lr = lr_dataset.transform
    if crs == lr_dataset.crs and lr.b == 0 and lr.d == 0 and abs(abs(lr.a) - abs(lr.e)) < 1e-9 * abs(lr.a):
        pixel = abs(lr.a) / max(1, round(abs(lr.a) / size))
        step = abs(lr.a)
        left = lr.c + math.floor((left - lr.c) / step) * step
        top = lr.f - math.floor((lr.f - top) / step) * step if lr.e < 0 else top
        columns = int(math.ceil((right - left) / pixel - 1e-9))
        rows = int(math.ceil((top - bottom) / pixel - 1e-9))
        return Affine(pixel, 0, left, 0, -pixel, top), columns, rows
    return calculate_default_transform(
        hr_dataset.crs, crs, hr_dataset.width, hr_dataset.height, *hr_dataset.bounds, resolution=(size, size)
    )
