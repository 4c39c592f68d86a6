""""Hyperspectral Fusion": the Processing algorithm. It only maps QGIS parameters onto
``csakd_qgis.api.fuse_files`` and QGIS feedback onto its callbacks."""

from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsProcessingException,
    QgsProcessingParameterBand,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameters,
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


def unloaded_raster_source(value, context=None):
    """The GDAL data source a raster parameter's ``value`` names when it can be used without
    QGIS loading it as a layer: text GDAL opens (a file, /vsi… or a driver's connection string)
    that names no layer Processing already holds. None otherwise (a project layer, a layer
    object, or text only QGIS resolves), for which the layer is used as before.

    QGIS computes a histogram for a layer's default style (cumulative cut) when it loads one,
    and GDAL keeps that histogram in a .aux.xml written beside the user's file when the layer
    is closed; the fusion needs only the file's path, so nothing beside an input is written.
    """
    if not isinstance(value, str) or not value:
        return None
    if context is not None:
        from qgis.core import QgsProcessingUtils

        # Layers of the project or loaded earlier in this run; loads none.
        if QgsProcessingUtils.mapLayerFromString(value, context, False) is not None:
            return None
    return value if _gdal_can_open(value) else None


class RasterInput(QgsProcessingParameterRasterLayer):
    """A raster layer parameter that accepts a file GDAL opens without loading it as a layer:
    QGIS's own check loads the layer, which leaves a .aux.xml beside the file
    (unloaded_raster_source)."""

    def checkValueIsAcceptable(self, value, context=None):  # noqa: N802 (QGIS name)
        if unloaded_raster_source(value, context) is not None:
            return True
        return super().checkValueIsAcceptable(value, context)

    def clone(self):
        copy = RasterInput(self.name(), self.description(), self.defaultValue(), self.flags() & self.FlagOptional)
        copy.setFlags(self.flags())
        return copy


def raster_input_path(algorithm, parameters, name, context, role: str) -> str:
    """The GDAL data source of a RasterInput's value, loading no layer for a file."""
    source = unloaded_raster_source(parameters.get(name), context)
    if source is not None:
        return source
    return layer_path(algorithm.parameterAsRasterLayer(parameters, name, context), role)


class GeoTiffDestination(QgsProcessingParameterRasterDestination):
    """The fused image's destination: GeoTIFF only (the file picker offers .tif alone, and a
    name without an extension gets .tif)."""

    def defaultFileExtension(self):  # noqa: N802 (QGIS name)
        return "tif"

    def createFileFilter(self):  # noqa: N802
        return "GeoTIFF (*.tif *.tiff *.TIF *.TIFF)"

    def supportedOutputRasterLayerExtensions(self):  # noqa: N802
        return ["tif"]

    def isSupportedOutputValue(self, value, context):  # noqa: N802
        path = geotiff_output(QgsProcessingParameters.parameterAsOutputLayer(self, value, context))
        if Path(path).suffix.lower() not in (".tif", ".tiff"):
            return False, f"the output {path} must be a GeoTIFF (.tif)"
        return True, ""

    def clone(self):
        copy = GeoTiffDestination(self.name(), self.description(), self.defaultValue(), self.flags() & self.FlagOptional)
        copy.setFlags(self.flags())
        return copy


def geotiff_output(path: str) -> str:
    """``path`` with .tif appended when it has no extension."""
    return path + ".tif" if path and not Path(path).suffix else path


def band_numbers(value) -> list:
    """1-based band numbers from a BANDS value: a list, or text such as "44,28,11,130" or
    "44;28" as qgis_process and the modeler pass it."""
    if value is None or value == "":
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).replace(";", ",").replace(" ", ",").split(",")
    numbers = []
    for item in items:
        if str(item).strip() == "":
            continue
        try:
            numbers.append(int(str(item).strip()))
        except ValueError:
            raise QgsProcessingException(f"BANDS: '{item}' is not a band number; give numbers such as 44,28,11,130")
    return numbers


def result_layer_name(output: str) -> str:
    """The loaded layer's name: the output file's name without extension, as QGIS names layers it
    opens; a temporary output (no name chosen) keeps the parameter's description."""
    from qgis.core import QgsProcessingUtils

    temporary = Path(QgsProcessingUtils.tempFolder()).resolve()
    if temporary in Path(output).resolve().parents:
        return "Fused hyperspectral image"
    return Path(output).stem


def record_recipe(output: str, lr_path: str, hr_path: str, options: dict, log) -> None:
    """Writes what made ``output`` into its metadata (CSAKD_RECIPE: inputs, model and options,
    as the command line and batches record it, provenance.py), so that a Processing output says
    how it was made too. A failure to write it is said in the log; the output stays as written."""
    from ..csakd_qgis import provenance

    try:
        provenance.record_recipe(output, provenance.recipe(lr_path, hr_path, options))
    except Exception as error:  # the output is complete; only its record is missing
        log(f"warning: could not record what made the output in its metadata ({error})")


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
    SCENE_CORRECTION = "SCENE_CORRECTION"
    PSF = "PSF"
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
            "Wavelengths are read from band metadata, the ENVI header, netCDF, an EnMAP METADATA.XML beside the image or "
            "band names, and copied to the output; the log warns when there are none.\n"
            "<b>High-resolution multispectral image (HRMSI)</b>: e.g. Sentinel-2, WorldView, an aerial or drone "
            "image (trained on 3 to 13 bands; other counts fuse with a warning), co-registered with the hyperspectral "
            "image; any CRS.\n"
            "<b>Fused image (OUTPUT)</b>: GeoTIFF on the multispectral image's grid (CRS, pixel size, alignment) over "
            "the area both images cover; one band per hyperspectral band, with wavelength, FWHM and bad-band flag.\n"
            "<b>Model bundle (MODEL)</b>: a .json model card with its .pt weights beside it; empty = the bundled "
            "student, which accepts any sensor pair (its learned correction is still zero: the result is its "
            "classical subspace fusion, see the README).\n"
            "<b>Scene correction</b> (advanced, on by default): four small pixel-wise networks fitted on the scene's "
            "own reduced pair and averaged, applied only where a check one scale further down gains; the log and "
            "the output's CSAKD_SCENE_CORRECTION metadata say whether it was applied and what its check gained, or "
            "why not. A scene too small to be reduced twice by its own scale (under 54×54 hyperspectral pixels at ×3, "
            "64×64 at ×4, 256×256 at ×8) is reduced ×2 instead, and the log says so; under about 32×32 it is left "
            "as it is. About 4 s per scene on two cores. Off: "
            "SCENE_CORRECTION=false.\n"
            "<b>Tile size / overlap</b> (advanced): output pixels per tile and how far neighbouring tiles overlap "
            "and cross-fade; rounded to multiples of the working scale. Larger tiles are a little faster and use "
            "more memory.\n"
            "<b>Device</b> (advanced): auto uses a CUDA GPU when torch sees one, otherwise the CPU.\n"
            "<b>Bands</b> (advanced): fuse only these hyperspectral bands (default: all).\n"
            "<b>Output data type</b> (advanced): float32 (nodata −9999), or int16/uint16 in the input's encoding (its "
            "scale and offset written on the output bands).\n"
            "<b>Creation options</b> (advanced): extra GeoTIFF options, e.g. COMPRESS=ZSTD.\n"
            "<b>Scene adaptation (minutes)</b> (advanced): first fine-tune the model for this long on the scene's own "
            "pair degraded by the working scale (Wald protocol); the log reports the PSNR it gained on a held-out part "
            "of that pair, at the hyperspectral image's resolution, a step coarser than the fusion (in a probe on four "
            "laboratory scenes, what was learnt at that step held at full resolution only in part, on one scene of "
            "four: README, 'What learning can do on scenes it sees'). 0 = off (default).\n"
            "<b>PSF</b> (advanced): how the hyperspectral sensor blurs the scene relative to the multispectral pixels. "
            "auto (default) estimates it from the pair (Gaussian with σ per axis, pixel aggregation, or both) with "
            "the misregistration, and the log names it; or give it: box (pixel aggregation, e.g. an image made with "
            "gdalwarp -r average), gaussian:σ or gaussian:σrows,σcolumns (σ in hyperspectral pixels), or mtf:v "
            "(the MTF at Nyquist from the sensor's data sheet, e.g. mtf:0.3). Before writing, the fusion is checked "
            "on the scene's own pair degraded once more; if it is not ahead of bicubic upsampling there, the "
            "bicubic upsampling is written instead and the log says so.\n\n"
            "The resolution ratio need not be an integer: the hyperspectral image is resampled to round(ratio) × the "
            "multispectral pixel (30 m / 3.6 m = 8.33 → 8, a 28.8 m working pixel). It is resampled once into a "
            "scratch file beside the output (its size: the hyperspectral image on that grid in float32), which is "
            "deleted when the run ends."
        )

    def createInstance(self):  # noqa: N802
        return HyperspectralFusionAlgorithm()

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(RasterInput(self.LRHSI, "Low-resolution hyperspectral image"))
        self.addParameter(RasterInput(self.HRMSI, "High-resolution multispectral image"))
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
        self.addParameter(advanced(QgsProcessingParameterBoolean(
            self.SCENE_CORRECTION, "Scene correction (fitted on the scene's own reduced pairs, applied where its check passes)",
            defaultValue=True, optional=True)))
        self.addParameter(advanced(QgsProcessingParameterString(
            self.PSF, "PSF of the hyperspectral image (auto, box, gaussian:SIGMA, mtf:VALUE)", defaultValue="auto",
            optional=True)))
        self.addParameter(GeoTiffDestination(self.OUTPUT, "Fused hyperspectral image"))

    def scene_correction_wanted(self, parameters, context) -> bool:
        """SCENE_CORRECTION as a bool, reading on/off, yes/no, true/false and 1/0 given as text
        (qgis_process passes text; QGIS itself reads any text but false/0 as true)."""
        switch = parameters.get(self.SCENE_CORRECTION)
        if isinstance(switch, str) and switch.strip():
            from ..csakd_qgis.cli import parse_switch

            return parse_switch(switch)
        return self.parameterAsBool(parameters, self.SCENE_CORRECTION, context)

    def checkParameterValues(self, parameters, context):  # noqa: N802
        model = parameters.get(self.MODEL)
        if isinstance(model, str) and Path(model).suffix.lower() in (".pt", ".pth"):
            card = Path(model).with_suffix(".json")
            return False, (
                f"MODEL: {model} holds the weights only; choose the .json model card beside it ({card.name})"
                + ("" if card.is_file() else f", which is missing: {card} not found")
            )
        # QGIS reports a file that exists but that GDAL cannot open as "not found"; say what is wrong.
        for name, role in ((self.LRHSI, "hyperspectral image (LRHSI)"), (self.HRMSI, "multispectral image (HRMSI)")):
            value = parameters.get(name)
            if isinstance(value, str) and value and Path(value).is_file() and not _gdal_can_open(value):
                return False, (
                    f"the {role} {value} cannot be read: GDAL does not recognise it as a raster "
                    "(damaged or incomplete file, or not a raster format)"
                )
        # QGIS takes any text but false/0 as true for a boolean: "off" or "no" would leave it on.
        switch = parameters.get(self.SCENE_CORRECTION)
        if isinstance(switch, str) and switch.strip():
            from ..csakd_qgis.cli import parse_switch

            try:
                parse_switch(switch)
            except ValueError:
                return False, (f"SCENE_CORRECTION: '{switch}' is neither on nor off; give true or false "
                               "(on/off, yes/no and 1/0 are read too)")
        psf = parameters.get(self.PSF)
        if isinstance(psf, str) and psf.strip():
            from ..csakd_qgis.psf import parse_psf

            try:
                parse_psf(psf, 2)
            except ValueError as error:
                return False, str(error)
        return super().checkParameterValues(parameters, context)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        if not dependencies.torch_available():
            raise QgsProcessingException(dependencies.missing_torch_message())
        from ..csakd_qgis.threads import configure_torch_threads

        configure_torch_threads(feedback.pushInfo)
        from ..csakd_qgis.api import FusionCancelled, fuse_files
        from ..csakd_qgis.bundle import BundleError
        from ..csakd_qgis.georaster import FusionInputError

        lr_path = raster_input_path(self, parameters, self.LRHSI, context, "hyperspectral")
        hr_path = raster_input_path(self, parameters, self.HRMSI, context, "multispectral")
        requested = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        output = geotiff_output(requested)
        if output != requested and context.willLoadLayerOnCompletion(requested):
            # The layer to load is the file written, with its .tif.
            layers = context.layersToLoadOnCompletion()
            layers[output] = layers.pop(requested)
            context.setLayersToLoadOnCompletion(layers)
        if Path(output).suffix.lower() not in (".tif", ".tiff"):
            raise QgsProcessingException(f"the output {output} must be a GeoTIFF (.tif)")
        model = self.parameterAsFile(parameters, self.MODEL, context) or None
        options = dict(
            model=model,
            tile_size=self.parameterAsInt(parameters, self.TILE_SIZE, context),
            overlap=self.parameterAsInt(parameters, self.OVERLAP, context),
            device=DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)],
            bands=band_numbers(parameters.get(self.BANDS)) or None,
            output_dtype=OUTPUT_TYPES[self.parameterAsEnum(parameters, self.OUTPUT_TYPE, context)],
            creation_options=parse_creation_options(self.parameterAsString(parameters, self.CREATION_OPTIONS, context)),
            adapt_minutes=self.parameterAsDouble(parameters, self.ADAPT_MINUTES, context),
            scene_correction=self.scene_correction_wanted(parameters, context),
            psf=self.parameterAsString(parameters, self.PSF, context) or "auto",
        )
        try:
            report = fuse_files(
                lr_path,
                hr_path,
                output,
                progress=lambda fraction: feedback.setProgress(100.0 * fraction),
                cancelled=feedback.isCanceled,
                log=feedback.pushInfo,
                **options,
            )
        except FusionCancelled:
            raise QgsProcessingException("fusion cancelled; no output was written")
        except (FusionInputError, BundleError, ValueError) as error:
            raise QgsProcessingException(str(error))
        record_recipe(output, lr_path, hr_path, options, feedback.pushInfo)
        if context.willLoadLayerOnCompletion(output):
            details = context.layerToLoadOnCompletionDetails(output)
            details.name = result_layer_name(output)
            details.setPostProcessor(TrueColourPostProcessor.create())
        feedback.pushInfo(f"done in {report.seconds:.1f} s on {report.device}")
        return {self.OUTPUT: output}
