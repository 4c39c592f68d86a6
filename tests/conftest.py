"""Shared fixtures. QGIS itself is started headless by pytest-qgis (see pytest.ini)."""

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import recording_feedback

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The name QGIS imports the plugin under once installed. A checkout's folder can be
# called anything (CI clones into "main"), so tests never rely on that name.
PLUGIN_NAME = "csakd_fusion"
PROVIDER_ID = "csakd"


def import_plugin_package(folder, name):
    """Import the plugin in ``folder`` as package ``name`` without touching sys.path."""
    spec = importlib.util.spec_from_file_location(
        name, Path(folder) / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    # Registered before execution so that the package's relative imports resolve.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@pytest.fixture(scope="session")
def project_root():
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def csakd_plugin_package():
    """The plugin package, imported from the project root as ``csakd_fusion``."""
    if PLUGIN_NAME in sys.modules:
        return sys.modules[PLUGIN_NAME]
    return import_plugin_package(PROJECT_ROOT, PLUGIN_NAME)


@pytest.fixture
def csakd_provider(qgis_processing, csakd_plugin_package):
    """The plugin's provider, registered in the running QGIS's Processing registry.

    Function-scoped so that tests which register the provider through the plugin
    itself start from a registry that does not hold it yet.
    """
    from qgis.core import QgsApplication

    from csakd_fusion.processing_provider.provider import CsakdProvider

    registry = QgsApplication.processingRegistry()
    stale = registry.providerById(PROVIDER_ID)
    if stale is not None:
        registry.removeProvider(stale)
    provider = CsakdProvider()
    assert registry.addProvider(provider), "Processing refused the csakd provider"
    yield provider
    if registry.providerById(PROVIDER_ID) is not None:
        registry.removeProvider(PROVIDER_ID)


@pytest.fixture(scope="session")
def shared_data_dir():
    """The project's shared data, checked out beside the repository."""
    path = PROJECT_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        # A failure, not a skip: a run without the data would silently test less.
        pytest.fail(
            f"shared data folder not found at {path}: the tests expect the 'shared' "
            "folder (with data/ inside) next to the repository checkout"
        )
    return path


@pytest.fixture(scope="session")
def potsdam_c(shared_data_dir):
    """EnMAP Potsdam block C (218 bands, 128 × 64 pixels of 30 m): a validation cube, never
    trained on (csakd_qgis.datasets)."""
    from csakd_qgis.datasets import load_potsdam_block

    return load_potsdam_block("C", shared_data_dir)


# --- the fusion algorithm: model, inputs, running it through Processing -------------

FUSION_ALGORITHM_ID = f"{PROVIDER_ID}:hyperspectralfusion"
BUNDLED_MODEL = PROJECT_ROOT / "resources" / "models" / "csakd_student.json"


@pytest.fixture(scope="session")
def fusion_model():
    """The bundled student: the model the fusion algorithm uses by default."""
    if not BUNDLED_MODEL.is_file():
        pytest.fail(f"the bundled model {BUNDLED_MODEL} is missing; run `make train` to produce it")
    return BUNDLED_MODEL


@pytest.fixture(scope="session")
def make_feedback():
    return recording_feedback


@pytest.fixture(scope="session")
def fusion_algorithm_id():
    return FUSION_ALGORITHM_ID


def run_fusion_algorithm(model, feedback=None, context=None, **parameters):
    """processing.run of the fusion algorithm (its provider must be registered)."""
    import processing

    parameters.setdefault("MODEL", str(model))
    feedback = feedback if feedback is not None else recording_feedback()
    return processing.run(FUSION_ALGORITHM_ID, parameters, feedback=feedback, context=context), feedback


@pytest.fixture
def run_fusion(csakd_provider, fusion_model):
    """Run csakd:hyperspectralfusion through processing.run; MODEL defaults to ``fusion_model``.

    Returns (results, feedback). Exceptions from the algorithm propagate unchanged.
    """

    def run(feedback=None, context=None, **parameters):
        return run_fusion_algorithm(fusion_model, feedback, context, **parameters)

    return run


@pytest.fixture(scope="module")
def module_fusion_runner(qgis_processing, csakd_plugin_package, fusion_model):
    """Like ``run_fusion`` for module-scoped fixtures (expensive runs shared by several tests):
    registers the provider while a run lasts if no test registered it."""
    from qgis.core import QgsApplication

    from csakd_fusion.processing_provider.provider import CsakdProvider

    def run(feedback=None, context=None, **parameters):
        registry = QgsApplication.processingRegistry()
        added = None
        if registry.providerById(PROVIDER_ID) is None:
            added = CsakdProvider()
            assert registry.addProvider(added)
        try:
            return run_fusion_algorithm(fusion_model, feedback, context, **parameters)
        finally:
            if added is not None:
                registry.removeProvider(PROVIDER_ID)

    return run


@dataclass
class WaldPair:
    """A Wald-protocol pair written as GeoTIFFs, with the arrays it was made from."""

    lr_path: Path
    hr_path: Path
    reference: "np.ndarray"  # (B, H, W) float32, NaN in the bad bands
    lr: "np.ndarray"  # (B, h, w) float32 before the nodata holes were punched
    lr_holes: list  # [(row, col)] LR pixels set to nodata in every band
    bad_bands: "np.ndarray"  # (B,) bool
    scale: int


def write_potsdam_wald_pair(
    block_path, folder, srf_dir, scale=3, lr_holes=((2, 3), (10, 17), (19, 30)), shift=(0.0, 0.0), psf=None
):
    """LR-HSI (GeoTIFF, ``scale`` × 30 m) and Sentinel-2 10 m-band HR-MSI (30 m) from an EnMAP block.

    Reference = the block cropped to multiples of ``scale``; LR-HSI = its degradation under
    ``psf`` (a csakd_qgis.psf.SpatialDegradation at ``scale``; default the Wald protocol's
    Gaussian), on a grid aligned with the block, with the block's band metadata (wavelength,
    FWHM, bbl), nodata and a few nodata pixels; HR-MSI = the reference through Sentinel-2A's B2,
    B3, B4, B8 responses. ``shift`` (rows, cols of HR pixels) moves the LR-HSI's footprints while
    keeping its georeference: a misregistered pair.
    """
    import numpy as np
    import rasterio
    from affine import Affine

    from csakd_qgis.degradation import blur_and_decimate, crop_to_multiple, simulate_msi
    from csakd_qgis.psf import wald
    from csakd_qgis.srf import load_srf, spectral_response_matrix
    from csakd_qgis.transforms import compose

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with rasterio.open(block_path) as src:
        cube = src.read(masked=True).astype(np.float32).filled(np.nan)
        band_tags = [src.tags(i) for i in range(1, src.count + 1)]
        descriptions = src.descriptions
        nodata, crs, transform = src.nodata, src.crs, src.transform
    bad = np.array([float(t.get("bbl", 1)) == 0 for t in band_tags])
    reference = crop_to_multiple(cube, scale)
    assert np.isfinite(reference[~bad]).all(), "the block should be gap-free in its good bands"
    lr = np.full((cube.shape[0], reference.shape[1] // scale, reference.shape[2] // scale), np.nan, np.float32)
    degradation = (psf if psf is not None else wald(scale)).with_offset(shift)
    lr[~bad] = blur_and_decimate(reference[~bad], degradation)
    lr_written = np.where(np.isfinite(lr), lr, nodata).astype(np.float32)
    for row, col in lr_holes:
        lr_written[:, row, col] = nodata
    lr_path = folder / "lr_hsi.tif"
    profile = dict(driver="GTiff", dtype="float32", nodata=nodata, crs=crs)
    with rasterio.open(lr_path, "w", count=lr.shape[0], width=lr.shape[2], height=lr.shape[1],
                       transform=compose(transform, Affine.scale(scale)), **profile) as dst:
        dst.write(lr_written)
        for index, (tags, description) in enumerate(zip(band_tags, descriptions), start=1):
            dst.update_tags(index, **tags)
            dst.set_band_description(index, description or f"band {index}")

    wavelengths = np.array([float(t["wavelength"]) for t in band_tags])
    msi_bands = ["B2", "B3", "B4", "B8"]
    srf = load_srf("sentinel2a_msi_srf", srf_dir=srf_dir).subset(msi_bands)
    response, kept = spectral_response_matrix(srf, wavelengths[~bad])
    assert kept == msi_bands
    msi = simulate_msi(reference[~bad], response).astype(np.float32)
    hr_path = folder / "hr_msi.tif"
    with rasterio.open(hr_path, "w", count=msi.shape[0], width=msi.shape[2], height=msi.shape[1],
                       transform=transform, driver="GTiff", dtype="float32", crs=crs) as dst:
        dst.write(msi)
        for index, name in enumerate(msi_bands, start=1):
            dst.set_band_description(index, f"Sentinel-2 {name}")
    return WaldPair(lr_path, hr_path, reference, lr, list(lr_holes), bad, scale)


@pytest.fixture(scope="session")
def potsdam_wald_pair(wald_pair_factory):
    """Wald pair (scale 3: 90 m EnMAP-like LR-HSI, 30 m Sentinel-2-like HR-MSI) from Potsdam block A."""
    return wald_pair_factory("enmap_potsdam_blockA_96x64.tif")


@pytest.fixture(scope="session")
def wald_pair_factory(shared_data_dir, tmp_path_factory):
    """make(block_file_name, **options) -> WaldPair written into a fresh folder."""

    def make(block_name, **options):
        return write_potsdam_wald_pair(
            shared_data_dir / "enmap_potsdam" / block_name,
            tmp_path_factory.mktemp("wald_" + Path(block_name).stem),
            shared_data_dir / "srf",
            **options,
        )

    return make


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test, restored afterwards.

    The engine's test models are tiny: on a 2-core machine that is busy with anything else,
    two torch threads spend most of their time waiting for each other (measured: up to ten
    times slower than one thread).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

