""""Train Fusion Model (teacher + student)": maps QGIS parameters onto
``csakd_qgis.user_training`` and QGIS feedback onto its callbacks."""

from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
)

from . import dependencies
from .base import HOMEPAGE, CsakdAlgorithm, advanced
from .fusion_algorithm import layer_path, unloaded_raster_source

SIZES = ["small", "medium", "paper"]
PAIR_SUFFIXES = ("_lrhsi", "_hrmsi")


def pairs_in_folder(folder: Path):
    """(LR-HSI, HR-MSI) paths of files named <name>_lrhsi.<ext> and <name>_hrmsi.<ext>."""
    pairs = []
    for lr in sorted(folder.glob(f"*{PAIR_SUFFIXES[0]}.*")):
        if lr.suffix.lower() in (".hdr", ".aux", ".xml", ".ovr"):
            continue
        stem = lr.name[: lr.name.index(PAIR_SUFFIXES[0])]
        matches = [p for p in folder.glob(f"{stem}{PAIR_SUFFIXES[1]}.*") if p.suffix.lower() not in (".hdr", ".aux", ".xml", ".ovr")]
        if not matches:
            raise QgsProcessingException(f"{lr.name} has no partner {stem}{PAIR_SUFFIXES[1]}.* in {folder}")
        pairs.append((str(lr), str(matches[0])))
    if not pairs:
        raise QgsProcessingException(
            f"no pairs in {folder}: name them <name>{PAIR_SUFFIXES[0]}.tif and <name>{PAIR_SUFFIXES[1]}.tif"
        )
    return pairs


class RasterInputs(QgsProcessingParameterMultipleLayers):
    """Raster layers that accept files GDAL opens without loading them as layers: QGIS's own
    check loads each one, which leaves a .aux.xml beside the file (unloaded_raster_source)."""

    def __init__(self, name, description, optional=False):
        super().__init__(name, description, QgsProcessing.SourceType.TypeRaster, None, optional)

    def checkValueIsAcceptable(self, value, context=None):  # noqa: N802 (QGIS name)
        if _unloaded_sources(value, context) is not None:
            return True
        return super().checkValueIsAcceptable(value, context)

    def clone(self):
        copy = RasterInputs(self.name(), self.description(), bool(self.flags() & self.FlagOptional))
        copy.setFlags(self.flags())
        copy.setDefaultValue(self.defaultValue())
        copy.setMinimumNumberInputs(self.minimumNumberInputs())
        return copy


def _unloaded_sources(value, context):
    """The GDAL data sources a RasterInputs value lists when each is usable without loading a
    layer (unloaded_raster_source); None otherwise."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        return None
    sources = [unloaded_raster_source(item, context) for item in items]
    return None if None in sources else sources


def raster_inputs(algorithm, parameters, name, context, role: str) -> list:
    """(name, GDAL data source) of each raster a RasterInputs value lists, loading no layer for files."""
    sources = _unloaded_sources(parameters.get(name), context)
    if sources is not None:
        return [(Path(source).stem, source) for source in sources]
    return [(layer.name(), layer_path(layer, role)) for layer in algorithm.parameterAsLayerList(parameters, name, context)]


class TrainFusionModelAlgorithm(CsakdAlgorithm):
    LRHSI_LAYERS = "LRHSI_LAYERS"
    HRMSI_LAYERS = "HRMSI_LAYERS"
    PAIRS_FOLDER = "PAIRS_FOLDER"
    CUBES = "CUBES"
    SRF = "SRF"
    SRF_BANDS = "SRF_BANDS"
    SCALE = "SCALE"
    MINUTES = "MINUTES"
    STUDENT_SIZE = "STUDENT_SIZE"
    START_MODEL = "START_MODEL"
    FROM_SCRATCH = "FROM_SCRATCH"
    OUTPUT_MODEL = "OUTPUT_MODEL"
    REPORT = "REPORT"

    def name(self):
        return "trainfusionmodel"

    def displayName(self):  # noqa: N802
        return "Train Fusion Model (teacher + student)"

    def tags(self):
        return ["hyperspectral", "multispectral", "fusion", "training", "distillation", "CSAKD"]

    def shortDescription(self):  # noqa: N802
        return "Trains a fusion model for your own sensors: a CSAKD teacher and student, co-trained with distillation."

    def helpUrl(self):  # noqa: N802
        return f"{HOMEPAGE}#train-a-model-for-your-own-sensors"

    def shortHelpString(self):  # noqa: N802
        return (
            "Co-trains a teacher and a student network with CSAKD's knowledge-distillation loss on your own data, on "
            "the CPU, and writes the student as a model bundle that <i>Hyperspectral Fusion</i> accepts in MODEL.\n\n"
            "Training pairs come from your data by the Wald protocol: the last fifth of every scene is held out and "
            "used only to validate (teacher, student, GSA and bicubic are compared after every epoch).\n\n"
            "<b>LR-HSI layers / HR-MSI layers</b>: real co-registered pairs, matched by their order in the two lists. "
            "The hyperspectral image is the reference; the model learns from it degraded by the resolution ratio, "
            "so it learns and is validated at the hyperspectral image's resolution, a step coarser than the fusion it "
            "serves (in a probe on four laboratory scenes, what a student learnt at that step held at full resolution "
            "only in part, on one scene of four: README, 'What learning can do on scenes it sees'). Where you have "
            "high-resolution hyperspectral cubes at the output's pixel size, train on those instead.\n"
            "<b>Folder of pairs</b>: instead of layers, a folder with files named &lt;name&gt;_lrhsi.tif and "
            "&lt;name&gt;_hrmsi.tif.\n"
            "<b>High-resolution hyperspectral cubes</b> + <b>SRF</b>: cubes whose MSI is simulated through a sensor's "
            "spectral response (a CSV: wavelength_nm, then one column per band); <b>SRF bands</b> picks some of its "
            "columns (e.g. B2,B3,B4,B8); <b>Scale</b> is the resolution ratio to train for.\n"
            "<b>Time budget</b>: minutes of training; the best student validated so far is written when it ends, "
            "and also when you cancel.\n"
            "<b>Student size</b>: small (the bundled student's size, fastest), medium, or the paper's layout "
            "(much slower on a CPU).\n"
            "<b>Starting model</b>: continue from this bundle (default: the bundled student, when the size is "
            "small); <b>Train from scratch</b> ignores it. The networks work in the scene's principal components "
            "rotated towards fixed spectral shapes (the aligned representation); a starting model that has already "
            "learnt a correction in the unrotated components keeps them.\n"
            "<b>Model bundle</b>: the .json model card to write (the .pt weights go beside it).\n"
            "<b>Training report</b>: an HTML page with loss and validation curves and the metrics table."
        )

    def createInstance(self):  # noqa: N802
        return TrainFusionModelAlgorithm()

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(RasterInputs(self.LRHSI_LAYERS, "LR-HSI layers (real pairs)", optional=True))
        self.addParameter(RasterInputs(self.HRMSI_LAYERS, "HR-MSI layers (same order as the LR-HSI layers)", optional=True))
        self.addParameter(QgsProcessingParameterFile(
            self.PAIRS_FOLDER, "Folder of pairs (<name>_lrhsi / <name>_hrmsi)", QgsProcessingParameterFile.Behavior.Folder,
            optional=True))
        self.addParameter(RasterInputs(
            self.CUBES, "High-resolution hyperspectral cubes (MSI simulated through the SRF)", optional=True))
        self.addParameter(QgsProcessingParameterFile(self.SRF, "Sensor SRF for the cubes (.csv)", extension="csv", optional=True))
        self.addParameter(QgsProcessingParameterString(self.SRF_BANDS, "SRF bands to use (comma-separated; empty = all)", optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.SCALE, "Scale for the cubes", QgsProcessingParameterNumber.Type.Integer, 3, False, 2, 10))
        self.addParameter(QgsProcessingParameterNumber(
            self.MINUTES, "Time budget (minutes)", QgsProcessingParameterNumber.Type.Double, 20.0, False, 0.01, 24 * 60))
        self.addParameter(QgsProcessingParameterEnum(self.STUDENT_SIZE, "Student size", SIZES, defaultValue=0))
        self.addParameter(QgsProcessingParameterFile(
            self.START_MODEL, "Starting model (.json; empty = the bundled student)", extension="json", optional=True))
        self.addParameter(advanced(QgsProcessingParameterBoolean(self.FROM_SCRATCH, "Train from scratch", False)))
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT_MODEL, "Model bundle", "Model card (*.json)"))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.REPORT, "Training report", "HTML files (*.html)", optional=True, createByDefault=True))

    def _scenes(self, parameters, context, feedback):
        from ..csakd_qgis.srf import load_srf
        from ..csakd_qgis.user_training import scene_from_cube, scene_from_pair

        lr_layers = raster_inputs(self, parameters, self.LRHSI_LAYERS, context, "hyperspectral")
        hr_layers = raster_inputs(self, parameters, self.HRMSI_LAYERS, context, "multispectral")
        if len(lr_layers) != len(hr_layers):
            raise QgsProcessingException(
                f"{len(lr_layers)} LR-HSI layer(s) but {len(hr_layers)} HR-MSI layer(s): pairs are matched by order, "
                "so give the same number of each"
            )
        pairs = [(lr, hr) for (_, lr), (_, hr) in zip(lr_layers, hr_layers)]
        folder = self.parameterAsFile(parameters, self.PAIRS_FOLDER, context)
        if folder:
            pairs += pairs_in_folder(Path(folder))
        scenes = []
        for lr, hr in pairs:
            feedback.pushInfo(f"pair: {Path(lr).name} + {Path(hr).name}")
            scenes.append(scene_from_pair(lr, hr))
        cubes = raster_inputs(self, parameters, self.CUBES, context, "hyperspectral cube")
        if cubes:
            srf_path = self.parameterAsFile(parameters, self.SRF, context)
            if not srf_path:
                raise QgsProcessingException("hyperspectral cubes need a sensor SRF (.csv) to simulate the MSI from")
            sensor = load_srf(srf_path)
            bands = [b.strip() for b in self.parameterAsString(parameters, self.SRF_BANDS, context).split(",") if b.strip()]
            if bands:
                sensor = sensor.subset(bands)
            scale = self.parameterAsInt(parameters, self.SCALE, context)
            for cube_name, cube in cubes:
                feedback.pushInfo(f"cube: {cube_name} with {sensor.name} {sensor.band_names} at scale {scale}")
                scenes.append(scene_from_cube(cube, sensor, scale))
        return scenes

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        if not dependencies.torch_available():
            raise QgsProcessingException(dependencies.missing_torch_message())
        from ..csakd_qgis.threads import configure_torch_threads

        configure_torch_threads(feedback.pushInfo)
        from ..csakd_qgis.bundle import BundleError, default_model_path
        from ..csakd_qgis.train import BudgetTooShort
        from ..csakd_qgis.user_training import train_on_scenes

        output = Path(self.parameterAsFileOutput(parameters, self.OUTPUT_MODEL, context))
        if output.suffix.lower() != ".json":
            output = output.with_suffix(".json")
        report = self.parameterAsFileOutput(parameters, self.REPORT, context) or None
        size = SIZES[self.parameterAsEnum(parameters, self.STUDENT_SIZE, context)]
        start = None
        if not self.parameterAsBool(parameters, self.FROM_SCRATCH, context):
            start = self.parameterAsFile(parameters, self.START_MODEL, context) or (default_model_path() if size == "small" else None)
        try:
            scenes = self._scenes(parameters, context, feedback)
            result = train_on_scenes(
                scenes,
                output,
                minutes=self.parameterAsDouble(parameters, self.MINUTES, context),
                student_size=size,
                start_model=start,
                report_path=report,
                log=feedback.pushInfo,
                cancelled=feedback.isCanceled,
                progress=lambda fraction: feedback.setProgress(100.0 * fraction),
            )
        except (BudgetTooShort, BundleError, ValueError) as error:
            raise QgsProcessingException(str(error))
        best = result.state["best"]
        feedback.pushInfo(
            f"best student: epoch {best['epoch']}, held-out PSNR {best['student']['psnr']:.2f} dB, "
            f"SAM {best['student']['sam']:.2f}° → {result.student_card}"
        )
        return {self.OUTPUT_MODEL: str(result.student_card), self.REPORT: str(result.report) if result.report else None}
