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
from typing import Optional

import numpy as np

from .transforms import compose

MIN_RATIO = 1.5
MAX_SCALE = 16


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
    t = dataset.transform
    if t.b != 0 or t.d != 0:
        raise FusionInputError(
            f"the {role} ({dataset.name}) is rotated; warp it to a north-up grid first (gdalwarp)"
        )


def plan_grid(lr_dataset, hr_dataset) -> FusionGrid:
    """The output and working grids for two open rasterio datasets."""
    from rasterio.warp import calculate_default_transform, transform_bounds
    from rasterio.windows import Window, from_bounds
    from affine import Affine

    _check_georeferenced(lr_dataset, "hyperspectral image (LRHSI)")
    _check_georeferenced(hr_dataset, "multispectral image (HRMSI)")
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
    if lr_width < 2 or lr_height < 2:
        raise FusionInputError(
            f"the common area is only {width}×{height} multispectral pixels, less than 2×2 hyperspectral pixels"
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
    if lr_dataset.crs == grid.crs:
        relative = compose(~lr_dataset.transform, grid.lr_transform)
        if all(abs(v - round(v)) < 1e-6 for v in (relative.a, relative.e, relative.c, relative.f)) and \
                round(relative.a) == 1 and round(relative.e) == 1:
            return Resampling.nearest
    return Resampling.cubic


def lr_on_working_grid(lr_dataset, grid: FusionGrid):
    """A WarpedVRT of the LR-HSI on the working grid (reprojected when the CRS differs)."""
    from rasterio.vrt import WarpedVRT

    return WarpedVRT(
        lr_dataset, crs=grid.crs, transform=grid.lr_transform, width=grid.lr_width, height=grid.lr_height,
        resampling=lr_resampling(lr_dataset, grid), src_nodata=lr_dataset.nodata, nodata=_vrt_nodata(lr_dataset),
    )


def hr_on_working_grid(hr_dataset, grid: FusionGrid):
    """A WarpedVRT of the HR-MSI averaged onto the working grid (for the scene statistics)."""
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    return WarpedVRT(
        hr_dataset, crs=grid.crs, transform=grid.lr_transform, width=grid.lr_width, height=grid.lr_height,
        resampling=Resampling.average, src_nodata=hr_dataset.nodata, nodata=_vrt_nodata(hr_dataset),
    )


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


def scaled(values: np.ndarray, dataset, indexes) -> np.ndarray:
    """(B, rows, cols) raw values of bands ``indexes`` (1-based) in the raster's units: each
    band's scale and offset applied."""
    scales = np.array([dataset.scales[i - 1] for i in indexes], dtype=np.float32).reshape(-1, 1, 1)
    offsets = np.array([dataset.offsets[i - 1] for i in indexes], dtype=np.float32).reshape(-1, 1, 1)
    return values * scales + offsets


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


def read_padded(dataset, row: int, col: int, rows: int, cols: int) -> np.ndarray:
    """Like read_as_float for a window that may reach past the raster; the part outside is NaN.

    (rasterio's boundless reads build a warped VRT on every call, far too slow per tile.)
    """
    from rasterio.windows import Window

    out = np.full((dataset.count, rows, cols), np.nan, dtype=np.float32)
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + rows, dataset.height), min(col + cols, dataset.width)
    if r1 > r0 and c1 > c0:
        out[:, r0 - row : r1 - row, c0 - col : c1 - col] = read_as_float(dataset, window=Window(c0, r0, c1 - c0, r1 - r0))
    return out


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
    def materialise(cls, lr_dataset, grid: FusionGrid, indexes, path, progress=None, cancelled=None) -> "WorkingGridCube":
        """Resample bands ``indexes`` of ``lr_dataset`` onto ``grid``'s working grid into
        ``path``, strip by strip (NaN for no data, scale and offset applied)."""
        from affine import Affine
        from rasterio import band
        from rasterio.warp import reproject

        bands, rows, cols = len(indexes), grid.lr_height, grid.lr_width
        strip = max(1, cls.STRIP_BYTES // (bands * cols * 4))
        resampling = lr_resampling(lr_dataset, grid)
        with open(path, "wb") as scratch:
            for row in range(0, rows, strip):
                if cancelled is not None and cancelled():
                    raise InterruptedError("cancelled while resampling the hyperspectral image")
                count = min(strip, rows - row)
                values = np.full((bands, count, cols), np.nan, dtype=np.float32)
                # One warp of all bands at once: the source's blocks are decoded once per strip,
                # not once per band.
                reproject(
                    band(lr_dataset, list(indexes)), values,
                    src_nodata=lr_dataset.nodata, dst_transform=compose(grid.lr_transform, Affine.translation(0, row)),
                    dst_crs=grid.crs, dst_nodata=np.nan, resampling=resampling, num_threads=os.cpu_count() or 1,
                    # Each band its own no-data: a bad band holds nothing where the others hold data.
                    UNIFIED_SRC_NODATA="NO",
                )
                values = scaled(values, lr_dataset, indexes)
                scratch.write(np.ascontiguousarray(values.transpose(1, 2, 0)).tobytes())
                if progress is not None:
                    progress((row + count) / rows)
        return cls(path, bands, rows, cols)

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
