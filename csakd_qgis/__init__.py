"""CSAKD hyperspectral/multispectral fusion engine (importable without QGIS or torch)."""

__version__ = "0.1.0"
