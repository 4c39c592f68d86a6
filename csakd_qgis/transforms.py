"""Composition of affine geotransforms that works, without warnings, across affine versions.

affine 3 composes transforms with ``@`` and warns on ``*``; affine 2.4 (Debian 12) has only ``*``.
"""

from __future__ import annotations


def compose(first, second):
    """``first`` after ``second`` as one Affine (``first @ second``): e.g. a raster's transform
    composed with ``Affine.scale(s)`` gives the transform of a grid whose pixels are s times larger."""
    if hasattr(type(first), "__matmul__"):
        return first @ second
    return first * second
