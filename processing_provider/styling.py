"""A true-colour rendering of the fused layer, chosen by wavelength."""

from __future__ import annotations

from qgis.core import (
    QgsContrastEnhancement,
    QgsMultiBandColorRenderer,
    QgsProcessingLayerPostProcessorInterface,
    QgsRasterLayer,
)

TRUE_COLOUR_NM = (640.0, 550.0, 470.0)


def true_colour_bands(wavelengths_nm):
    """1-based band numbers nearest to red, green and blue, or None without wavelengths."""
    if not wavelengths_nm:
        return None
    return tuple(
        1 + min(range(len(wavelengths_nm)), key=lambda i: abs(wavelengths_nm[i] - target)) for target in TRUE_COLOUR_NM
    )


def layer_wavelengths(layer: QgsRasterLayer):
    from osgeo import gdal

    dataset = gdal.Open(layer.source())
    if dataset is None:
        return None
    values = []
    for index in range(1, dataset.RasterCount + 1):
        value = dataset.GetRasterBand(index).GetMetadataItem("wavelength")
        if value is None:
            return None
        values.append(float(value))
    return values


def apply_true_colour(layer: QgsRasterLayer) -> bool:
    bands = true_colour_bands(layer_wavelengths(layer))
    if bands is None:
        return False
    renderer = QgsMultiBandColorRenderer(layer.dataProvider(), *bands)
    for band, setter in zip(bands, (renderer.setRedContrastEnhancement, renderer.setGreenContrastEnhancement, renderer.setBlueContrastEnhancement)):
        enhancement = QgsContrastEnhancement(layer.dataProvider().dataType(band))
        enhancement.setContrastEnhancementAlgorithm(QgsContrastEnhancement.ContrastEnhancementAlgorithm.StretchToMinimumMaximum)
        stats = layer.dataProvider().cumulativeCut(band, 0.02, 0.98, layer.extent(), 250000)
        enhancement.setMinimumValue(stats[0])
        enhancement.setMaximumValue(stats[1])
        setter(enhancement)
    layer.setRenderer(renderer)
    layer.triggerRepaint()
    return True


class TrueColourPostProcessor(QgsProcessingLayerPostProcessorInterface):
    # QGIS deletes a post-processor once it has run, so each run needs a new one; the class
    # keeps the latest alive on the Python side until then (Processing calls it after the
    # algorithm object that registered it is gone).
    latest = None

    @classmethod
    def create(cls):
        cls.latest = cls()
        return cls.latest

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802
        if isinstance(layer, QgsRasterLayer):
            apply_true_colour(layer)
