""""Hyperspectral Fusion": the Processing algorithm. It only maps QGIS parameters onto
``csakd_qgis.api.fuse_files`` and QGIS feedback onto its callbacks."""

from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsProcessingException,
    QgsProcessingParameterBand,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
)

from . import dependencies
from .base import HOMEPAGE, CsakdAlgorithm, advanced
from .styling import TrueColourPostProcessor

DEVICES = ["auto", "cpu", "cuda"]
OUTPUT_TYPES = ["float32", "int16", "uint16"]



def layer_path(layer, role: str) -> str:
    """The GDAL data source behind a raster layer."""
    if layer is None:
        raise QgsProcessingException(f"the {role} layer could not be opened; choose a raster layer or file")
    if layer.providerType() != "gdal":
        raise QgsProcessingException(
            f"the {role} layer '{layer.name()}' is served by the '{layer.providerType()}' provider; "
            "fusion reads files through GDAL: save the layer as a GeoTIFF first (Export ▸ Save As)"
        )
    return layer.source()


def _gdal_can_open(path: str) -> bool:
    from osgeo import gdal

    with_exceptions = gdal.GetUseExceptions()
    gdal.DontUseExceptions()
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        return gdal.OpenEx(path, gdal.OF_RASTER) is not None
    finally:
        gdal.PopErrorHandler()
        if with_exceptions:
            gdal.UseExceptions()


def result_layer_name(output: str) -> str:
    """The loaded layer's name: the output file's name without extension, as QGIS names layers it
    opens; a temporary output (no name chosen) keeps the parameter's description."""
    from qgis.core import QgsProcessingUtils

    temporary = Path(QgsProcessingUtils.tempFolder()).resolve()
    if temporary in Path(output).resolve().parents:
        return "Fused hyperspectral image"
    return Path(output).stem


def parse_creation_options(text: str) -> dict:
    options = {}
    for item in filter(None, (part.strip() for part in (text or "").replace(";", " ").split())):
        if "=" not in item:
            raise QgsProcessingException(
                f"creation option '{item}' is not of the form KEY=VALUE (e.g. COMPRESS=ZSTD ZSTD_LEVEL=9)"
            )
        key, value = item.split("=", 1)
        options[key.strip().upper()] = value.strip()
    return options


class HyperspectralFusionAlgorithm(CsakdAlgorithm):
    LRHSI = "LRHSI"
    HRMSI = "HRMSI"
    MODEL = "MODEL"
    TILE_SIZE = "TILE_SIZE"
    OVERLAP = "OVERLAP"
    DEVICE = "DEVICE"
    BANDS = "BANDS"
    OUTPUT_TYPE = "OUTPUT_TYPE"
    CREATION_OPTIONS = "CREATION_OPTIONS"
    ADAPT_MINUTES = "ADAPT_MINUTES"
    OUTPUT = "OUTPUT"

    def name(self):
        return "hyperspectralfusion"

    def displayName(self):  # noqa: N802
        return "Hyperspectral Fusion"

    def tags(self):
        return ["hyperspectral", "multispectral", "fusion", "pansharpening", "super-resolution", "EnMAP", "PRISMA", "CSAKD"]

    def shortDescription(self):  # noqa: N802
        return "Sharpens a hyperspectral image with a multispectral image of the same place (CSAKD network, on the CPU)."

    def helpUrl(self):  # noqa: N802
        return f"{HOMEPAGE}#use-it"

    def shortHelpString(self):  # noqa: N802
        return (
            "Fuses a coarse hyperspectral image with a sharp multispectral image of the same place into a sharp "
            "hyperspectral image, with the CSAKD student network (runs on the CPU, tile by tile).\n\n"
            "<b>Low-resolution hyperspectral image (LRHSI)</b>: e.g. EnMAP, PRISMA, AVIRIS, HyMap; any GDAL raster. "
            "Wavelengths are read from band metadata or the ENVI header and copied to the output.\n"
            "<b>High-resolution multispectral image (HRMSI)</b>: e.g. Sentinel-2, WorldView, an aerial or drone "
            "image (3 to 13 bands), co-registered with the hyperspectral image; any CRS.\n"
            "<b>Fused image (OUTPUT)</b>: GeoTIFF on the multispectral image's grid (CRS, pixel size, alignment) over "
            "the area both images cover; one band per hyperspectral band, with wavelength, FWHM and bad-band flag.\n"
            "<b>Model bundle (MODEL)</b>: a .json model card with its .pt weights beside it; empty = the bundled "
            "student, which accepts any sensor pair.\n"
            "<b>Tile size / overlap</b> (advanced): output pixels per tile and how far neighbouring tiles overlap "
            "and cross-fade; rounded to multiples of the working scale. Larger tiles are a little faster and use "
            "more memory.\n"
            "<b>Device</b> (advanced): auto uses a CUDA GPU when torch sees one, otherwise the CPU.\n"
            "<b>Bands</b> (advanced): fuse only these hyperspectral bands (default: all).\n"
            "<b>Output data type</b> (advanced): float32 (nodata −9999) or integer types in the input's units.\n"
            "<b>Creation options</b> (advanced): extra GeoTIFF options, e.g. COMPRESS=ZSTD.\n"
            "<b>Scene adaptation (minutes)</b> (advanced): first fine-tune the model for this long on the scene's own "
            "pair degraded by the working scale (Wald protocol); the log reports the PSNR it gained on a held-out part. "
            "0 = off.\n\n"
            "The resolution ratio need not be an integer: the hyperspectral image is resampled to round(ratio) × the "
            "multispectral pixel (30 m / 3.6 m = 8.33 → 8, a 28.8 m working pixel). It is resampled once into a "
            "scratch file beside the output (its size: the hyperspectral image on that grid in float32), which is "
            "deleted when the run ends."
        )

    def createInstance(self):  # noqa: N802
        return HyperspectralFusionAlgorithm()

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.LRHSI, "Low-resolution hyperspectral image"))
        self.addParameter(QgsProcessingParameterRasterLayer(self.HRMSI, "High-resolution multispectral image"))
        self.addParameter(
            QgsProcessingParameterFile(
                self.MODEL, "Model bundle (.json; empty = bundled student)", extension="json", optional=True
            )
        )
        self.addParameter(advanced(QgsProcessingParameterNumber(
            self.TILE_SIZE, "Tile size (output pixels)", QgsProcessingParameterNumber.Type.Integer, 256, False, 32, 4096)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            self.OVERLAP, "Tile overlap (output pixels)", QgsProcessingParameterNumber.Type.Integer, 32, False, 0, 1024)))
        self.addParameter(advanced(QgsProcessingParameterEnum(self.DEVICE, "Device", DEVICES, defaultValue=0)))
        self.addParameter(advanced(QgsProcessingParameterBand(
            self.BANDS, "Hyperspectral bands to fuse (default: all)", parentLayerParameterName=self.LRHSI,
            optional=True, allowMultiple=True)))
        self.addParameter(advanced(QgsProcessingParameterEnum(
            self.OUTPUT_TYPE, "Output data type", OUTPUT_TYPES, defaultValue=0)))
        self.addParameter(advanced(QgsProcessingParameterString(
            self.CREATION_OPTIONS, "GeoTIFF creation options (KEY=VALUE separated by spaces)", optional=True)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            self.ADAPT_MINUTES, "Scene adaptation before fusing (minutes, 0 = off)", QgsProcessingParameterNumber.Type.Double,
            0.0, False, 0.0, 600.0)))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Fused hyperspectral image"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        # QGIS reports a file that exists but that GDAL cannot open as "not found"; say what is wrong.
        for name, role in ((self.LRHSI, "hyperspectral image (LRHSI)"), (self.HRMSI, "multispectral image (HRMSI)")):
            value = parameters.get(name)
            if isinstance(value, str) and value and Path(value).is_file() and not _gdal_can_open(value):
                return False, (
                    f"the {role} {value} cannot be read: GDAL does not recognise it as a raster "
                    "(damaged or incomplete file, or not a raster format)"
                )
        return super().checkParameterValues(parameters, context)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        if not dependencies.torch_available():
            raise QgsProcessingException(dependencies.missing_torch_message())
        from ..csakd_qgis.threads import configure_torch_threads

        configure_torch_threads(feedback.pushInfo)
        from ..csakd_qgis.api import FusionCancelled, fuse_files
        from ..csakd_qgis.bundle import BundleError
        from ..csakd_qgis.georaster import FusionInputError

        lr_path = layer_path(self.parameterAsRasterLayer(parameters, self.LRHSI, context), "hyperspectral")
        hr_path = layer_path(self.parameterAsRasterLayer(parameters, self.HRMSI, context), "multispectral")
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        if Path(output).suffix.lower() not in (".tif", ".tiff"):
            raise QgsProcessingException(f"the output {output} must be a GeoTIFF (.tif)")
        model = self.parameterAsFile(parameters, self.MODEL, context) or None
        try:
            report = fuse_files(
                lr_path,
                hr_path,
                output,
                model=model,
                tile_size=self.parameterAsInt(parameters, self.TILE_SIZE, context),
                overlap=self.parameterAsInt(parameters, self.OVERLAP, context),
                device=DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)],
                bands=self.parameterAsInts(parameters, self.BANDS, context) or None,
                output_dtype=OUTPUT_TYPES[self.parameterAsEnum(parameters, self.OUTPUT_TYPE, context)],
                creation_options=parse_creation_options(self.parameterAsString(parameters, self.CREATION_OPTIONS, context)),
                progress=lambda fraction: feedback.setProgress(100.0 * fraction),
                cancelled=feedback.isCanceled,
                log=feedback.pushInfo,
                adapt_minutes=self.parameterAsDouble(parameters, self.ADAPT_MINUTES, context),
            )
        except FusionCancelled:
            raise QgsProcessingException("fusion cancelled; no output was written")
        except (FusionInputError, BundleError, ValueError) as error:
            raise QgsProcessingException(str(error))
        if context.willLoadLayerOnCompletion(output):
            details = context.layerToLoadOnCompletionDetails(output)
            details.name = result_layer_name(output)
            details.setPostProcessor(TrueColourPostProcessor.create())
        feedback.pushInfo(f"done in {report.seconds:.1f} s on {report.device}")
        return {self.OUTPUT: output}
