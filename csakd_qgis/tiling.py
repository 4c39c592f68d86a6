"""Tile geometry and seam-free blending, independent of any I/O.

The high-resolution output is cut into overlapping tiles aligned to the scale s (so every
tile has an exact low-resolution counterpart). Each tile is run with a halo of extra context
that is thrown away, and neighbouring tiles are cross-faded over their overlap. Rows are
emitted in pieces aligned with the output's blocks as soon as no later tile can touch them, so
memory is bounded by one strip of tiles, never by the raster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Tuple

import numpy as np

Window = Tuple[int, int, int, int]  # row, col, rows, cols


@dataclass(frozen=True)
class Tile:
    hr_window: Window  # the output area the tile contributes to
    context_lr: Window  # LR window read for it (tile + halo, clipped to the raster)
    scale: int

    @property
    def context_hr(self) -> Window:
        r, c, h, w = self.context_lr
        s = self.scale
        return r * s, c * s, h * s, w * s

    def crop_from_context(self) -> Tuple[slice, slice]:
        """Slices that cut the tile's output out of the context's output."""
        cr, cc, _, _ = self.context_hr
        r, c, h, w = self.hr_window
        return slice(r - cr, r - cr + h), slice(c - cc, c - cc + w)


def aligned(value: int, multiple: int) -> int:
    return max(multiple, (value // multiple) * multiple)


def tile_starts(size: int, tile: int, step: int) -> List[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step))
    starts.append(starts[-1] + step if starts[-1] + step < size else size - tile)
    return [s for s in starts if s < size]


def plan_rows_of_tiles(
    lr_shape: Tuple[int, int], scale: int, tile_size: int, overlap: int, halo_lr: int
) -> List[List[Tile]]:
    """Tiles in rows; the HR raster is (lr_rows·s, lr_cols·s). Sizes are in HR pixels and
    are rounded to multiples of the scale."""
    lr_rows, lr_cols = lr_shape
    tile_lr = max(1, aligned(tile_size, scale) // scale)
    # At most half a tile: a larger overlap would step by a pixel or two and multiply the work.
    overlap_lr = min(max(0, overlap // scale), tile_lr // 2)
    step_lr = tile_lr - overlap_lr
    rows = []
    for r in tile_starts(lr_rows, tile_lr, step_lr):
        row = []
        for c in tile_starts(lr_cols, tile_lr, step_lr):
            h = min(tile_lr, lr_rows - r)
            w = min(tile_lr, lr_cols - c)
            r0, c0 = max(0, r - halo_lr), max(0, c - halo_lr)
            r1, c1 = min(lr_rows, r + h + halo_lr), min(lr_cols, c + w + halo_lr)
            row.append(Tile((r * scale, c * scale, h * scale, w * scale), (r0, c0, r1 - r0, c1 - c0), scale))
        rows.append(row)
    return rows


def blend_weights(window: Window, raster_shape: Tuple[int, int], ramp: int) -> np.ndarray:
    """Weights that rise linearly over ``ramp`` pixels at every edge shared with a neighbour
    (edges on the raster's border keep full weight)."""
    r, c, h, w = window
    rows, cols = raster_shape

    def axis(start, length, size):
        position = np.arange(length, dtype=np.float32)
        weight = np.ones(length, dtype=np.float32)
        if ramp > 0:
            if start > 0:
                weight = np.minimum(weight, (position + 0.5) / ramp)
            if start + length < size:
                weight = np.minimum(weight, (length - position - 0.5) / ramp)
        return weight

    return np.outer(axis(r, h, rows), axis(c, w, cols))


class StripBlender:
    """Accumulates weighted tile outputs and hands finished rows to ``emit(row0, rows_array)``."""

    def __init__(self, bands: int, raster_shape: Tuple[int, int], ramp: int, emit: Callable[[int, np.ndarray], None]):
        self.bands = bands
        self.rows, self.cols = raster_shape
        self.ramp = ramp
        self.emit = emit
        self.start = 0
        self.sum = np.zeros((bands, 0, self.cols), dtype=np.float32)
        self.weight = np.zeros((0, self.cols), dtype=np.float32)

    def _extend_to(self, end_row: int) -> None:
        needed = end_row - self.start - self.weight.shape[0]
        if needed > 0:
            self.sum = np.concatenate([self.sum, np.zeros((self.bands, needed, self.cols), np.float32)], axis=1)
            self.weight = np.concatenate([self.weight, np.zeros((needed, self.cols), np.float32)], axis=0)

    def add(self, window: Window, values: np.ndarray) -> None:
        r, c, h, w = window
        self._extend_to(r + h)
        weights = blend_weights(window, (self.rows, self.cols), self.ramp)
        local = slice(r - self.start, r - self.start + h)
        self.sum[:, local, c : c + w] += values * weights
        self.weight[local, c : c + w] += weights

    def flush_until(self, row: int, block_rows: int = 64) -> None:
        """Emit finished rows above ``row`` (no later tile may touch them) in pieces of
        ``block_rows`` aligned on multiples of it, so that a tiled output receives whole
        blocks; rows short of a full piece wait, except at the raster's end."""
        # self.start is always a multiple of block_rows (or the raster's end).
        end = row if row >= self.rows else (row // block_rows) * block_rows
        count = end - self.start
        if count <= 0:
            return
        for offset in range(0, count, block_rows):
            stop = min(count, offset + block_rows)
            with np.errstate(invalid="ignore", divide="ignore"):
                finished = self.sum[:, offset:stop] / self.weight[None, offset:stop]
            self.emit(self.start + offset, finished)
        self.sum = self.sum[:, count:].copy()
        self.weight = self.weight[count:].copy()
        self.start = end


def iterate_tiles(rows_of_tiles: List[List[Tile]]) -> Iterator[Tuple[Tile, int]]:
    """Yields (tile, row index of the next row of tiles' first HR row, or -1 inside a row)."""
    for i, row in enumerate(rows_of_tiles):
        for j, tile in enumerate(row):
            last_in_row = j == len(row) - 1
            if not last_in_row:
                yield tile, -1
            elif i + 1 < len(rows_of_tiles):
                yield tile, rows_of_tiles[i + 1][0].hr_window[0]
            else:
                yield tile, tile.hr_window[0] + tile.hr_window[2]
