"""One pipeline for arrays and files, the blind PSF in real rasters, and the safety net:
checked on EnMAP Potsdam block C (a validation cube never trained on) written as GeoTIFFs, and
through Processing in headless QGIS where the user meets it."""

import json

import numpy as np
import pytest
import rasterio
from affine import Affine

from csakd_qgis import metrics
from csakd_qgis.api import fuse_arrays, fuse_files, load_model
from csakd_qgis.baselines import bicubic_upsample, gsa
from csakd_qgis.datasets import make_wald_case, validation_sensors
from csakd_qgis.psf import SpatialDegradation

SCALE = 4
CRS = "EPSG:32633"
HR_TRANSFORM = Affine(10.0, 0, 368000.0, 0, -10.0, 5808000.0)


def _write(path, array, transform):
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype="float32", crs=CRS, transform=transform) as dst:
        dst.write(array.astype(np.float32))
    return path


@pytest.fixture(scope="module")
def box_case(potsdam_c):
    """Potsdam C ×4 with Sentinel-2 10 m bands, LR-HSI made by pixel aggregation (box PSF),
    what `gdalwarp -r average` gives."""
    return make_wald_case(potsdam_c, validation_sensors()["Sentinel-2 10 m"], SCALE,
                          psf=SpatialDegradation(SCALE, "box", (0.0, 0.0)))


@pytest.fixture(scope="module")
def box_files(box_case, tmp_path_factory):
    folder = tmp_path_factory.mktemp("box_pair")
    lr = _write(folder / "lr_hsi.tif", box_case.lr_hsi, HR_TRANSFORM * Affine.scale(SCALE))
    hr = _write(folder / "hr_msi.tif", box_case.hr_msi, HR_TRANSFORM)
    return lr, hr


def test_files_and_arrays_run_the_same_pipeline(box_case, box_files, tmp_path):
    """An aligned pair at an integer ratio: fuse_files (the QGIS path) equals fuse_arrays to
    float precision (they used to differ by up to 1.4 dB: the file path approximated the MSI's
    degradation)."""
    model, _ = load_model()
    logs = []
    from_arrays = fuse_arrays(box_case.lr_hsi, box_case.hr_msi, model=model)
    fuse_files(*box_files, tmp_path / "fused.tif", model=model, log=logs.append)
    with rasterio.open(tmp_path / "fused.tif") as fused:
        from_files = fused.read()
    scale = np.abs(box_case.reference).max()
    assert np.abs(from_files - from_arrays).max() <= 1e-4 * scale
    assert any("pixel aggregation" in line for line in logs), logs


def test_blind_psf_on_a_box_hsi_beats_gsa_and_matches_the_told_psf(box_case):
    """Before the blind estimate, this case was fused at 23.3 dB (×3) with the Wald Gaussian
    assumed, behind bicubic. Measured now at ×4: blind 36.76 dB, told 36.76, GSA 29.57."""
    model, _ = load_model()
    blind = fuse_arrays(box_case.lr_hsi, box_case.hr_msi, model=model)
    told = fuse_arrays(box_case.lr_hsi, box_case.hr_msi, model=model, psf="box")
    reference = box_case.reference
    assert metrics.psnr(reference, blind) >= metrics.psnr(reference, gsa(box_case.lr_hsi, box_case.hr_msi, SCALE)) + 1.0
    assert metrics.psnr(reference, blind) >= metrics.psnr(reference, told) - 0.3
    assert metrics.sam(reference, blind) <= metrics.sam(reference, gsa(box_case.lr_hsi, box_case.hr_msi, SCALE))


def test_output_records_the_psf_it_assumed(box_files, tmp_path):
    fuse_files(*box_files, tmp_path / "fused.tif", psf="gaussian:0.45,0.6")
    with rasterio.open(tmp_path / "fused.tif") as fused:
        recorded = json.loads(fused.tags()["CSAKD_PSF"])
    assert recorded["family"] == "gaussian"
    assert recorded["sigma"] == [0.45, 0.6]
    assert recorded["scale"] == SCALE


def test_an_msi_of_another_scene_falls_back_to_bicubic(box_case, tmp_path):
    """The MSI of another place (the scene flipped): fusion would paint the wrong edges. The
    check on the scene's own reduced pair sees it, the log says so, and the output is the
    bicubic upsampling of the HSI."""
    model, _ = load_model()
    logs = []
    wrong_msi = np.ascontiguousarray(box_case.hr_msi[:, ::-1, ::-1])
    fused = fuse_arrays(box_case.lr_hsi, wrong_msi, model=model, log=logs.append, psf="box")
    assert any("NOT ahead of bicubic" in line for line in logs), logs
    from csakd_qgis.interpolation import upsample_lr
    import torch

    bicubic = upsample_lr(torch.from_numpy(box_case.lr_hsi)[None], SpatialDegradation(SCALE, "box", (0.0, 0.0)))[0].numpy()
    expected = np.maximum(bicubic, 0) if min(box_case.lr_hsi.min(), wrong_msi.min()) >= 0 else bicubic
    assert np.abs(fused - expected).max() <= 1e-4 * np.abs(expected).max()


def test_no_negative_output_from_non_negative_inputs(box_case):
    """Ringing of the interpolators must not produce negative reflectance (one Potsdam pair
    had 9.4 % of its samples negative)."""
    lr = np.clip(box_case.lr_hsi, 0, None)
    msi = np.clip(box_case.hr_msi, 0, None)
    fused = fuse_arrays(lr, msi, psf="gaussian:0.3")
    assert np.nanmin(fused) >= 0.0


def test_processing_psf_parameter_and_its_errors(box_files, run_fusion, make_feedback, tmp_path):
    """PSF through Processing: a given PSF is used and named in the log; a wrong text is refused
    with the accepted forms."""
    from qgis.core import QgsProcessingException

    feedback = make_feedback()
    lr, hr = box_files
    run_fusion(feedback=feedback, LRHSI=str(lr), HRMSI=str(hr), OUTPUT=str(tmp_path / "fused.tif"), PSF="box")
    assert any("PSF as given: pixel aggregation" in m for m in feedback.messages), feedback.messages
    with pytest.raises(QgsProcessingException, match="gaussian:SIGMA"):
        run_fusion(LRHSI=str(lr), HRMSI=str(hr), OUTPUT=str(tmp_path / "other.tif"), PSF="lorentzian")
    assert not (tmp_path / "other.tif").exists()


def test_msi_in_degrees_is_fused_on_ground_distances(potsdam_c, tmp_path):
    """An MSI delivered in EPSG:4326 with square-degree pixels (about 6.2 m × 10 m on the
    ground at Potsdam's 52° N) fuses about as well as the same MSI in UTM: the working grid
    follows ground distances (before: one scale from the geometric mean, 2.4× the error).
    Measured: RMSE 135.8 against 131.4 (×1.03)."""
    from rasterio.warp import Resampling, reproject, transform_bounds

    case = make_wald_case(potsdam_c, validation_sensors()["Sentinel-2 10 m"], SCALE)
    lr = _write(tmp_path / "lr_hsi.tif", case.lr_hsi, HR_TRANSFORM * Affine.scale(SCALE))
    utm = _write(tmp_path / "msi_utm.tif", case.hr_msi, HR_TRANSFORM)
    rows, cols = case.hr_msi.shape[1:]
    left, top = HR_TRANSFORM.c, HR_TRANSFORM.f
    bounds = transform_bounds(CRS, "EPSG:4326", left, top - 10.0 * rows, left + 10.0 * cols, top)
    pixel = 0.00009
    geo_transform = Affine(pixel, 0, bounds[0], 0, -pixel, bounds[3])
    geo = np.full((case.hr_msi.shape[0], int((bounds[3] - bounds[1]) / pixel), int((bounds[2] - bounds[0]) / pixel)),
                  np.nan, np.float32)
    reproject(case.hr_msi, geo, src_transform=HR_TRANSFORM, src_crs=CRS, dst_transform=geo_transform,
              dst_crs="EPSG:4326", resampling=Resampling.average, dst_nodata=np.nan)
    with rasterio.open(tmp_path / "msi_4326.tif", "w", driver="GTiff", width=geo.shape[2], height=geo.shape[1],
                       count=geo.shape[0], dtype="float32", crs="EPSG:4326", transform=geo_transform, nodata=np.nan) as dst:
        dst.write(geo)

    errors, logs = {}, []
    for name, msi in (("utm", utm), ("degrees", tmp_path / "msi_4326.tif")):
        out = tmp_path / f"fused_{name}.tif"
        fuse_files(lr, msi, out, log=logs.append)
        with rasterio.open(out) as fused_ds:
            fused = fused_ds.read(masked=True).filled(np.nan)
            assert fused_ds.crs.to_string() == CRS  # on the HSI's metric grid, not in degrees
            reference = np.full(fused.shape, np.nan, np.float32)
            reproject(case.reference, reference, src_transform=HR_TRANSFORM, src_crs=CRS,
                      dst_transform=fused_ds.transform, dst_crs=fused_ds.crs, resampling=Resampling.nearest,
                      dst_nodata=np.nan)
        valid = np.isfinite(fused).all(0) & np.isfinite(reference).all(0)
        errors[name] = float(np.sqrt(np.mean((fused[:, valid] - reference[:, valid]) ** 2)))
    assert any("not square" in line for line in logs), logs
    assert errors["degrees"] <= 1.3 * errors["utm"], errors


def test_band_centres_must_match_the_hyperspectral_bands(box_case):
    """fuse_arrays's band centres (for a model on the wavelength grid) are one per LR-HSI band."""
    bands = box_case.lr_hsi.shape[0]
    with pytest.raises(ValueError, match=f"3 band centres for {bands} hyperspectral bands"):
        fuse_arrays(box_case.lr_hsi, box_case.hr_msi, wavelengths_nm=[500.0, 600.0, 700.0])


def test_a_grid_model_without_band_centres_says_it_is_not_applied(box_case):
    """A model on the wavelength grid cannot run without the LR-HSI's band centres: fusion
    gives the base and the log says so, with what to do (a user picked that model)."""
    import torch

    from csakd_qgis.model import SubspaceFusionModel
    from csakd_qgis.train import student_config
    from tests.helpers import randomise_head

    torch.manual_seed(0)
    grid = randomise_head(SubspaceFusionModel(student_config(representation="grid", unshuffle=1, width=8))).eval()
    base = SubspaceFusionModel(student_config(representation="grid", unshuffle=1, width=8)).eval()
    said = []
    fused = fuse_arrays(box_case.lr_hsi, box_case.hr_msi, model=grid, log=said.append)
    np.testing.assert_array_equal(fused, fuse_arrays(box_case.lr_hsi, box_case.hr_msi, model=base))
    assert any("band centres are unknown: its network is not applied" in line for line in said), said
    centres = np.linspace(450.0, 2400.0, box_case.lr_hsi.shape[0])
    said.clear()
    corrected = fuse_arrays(box_case.lr_hsi, box_case.hr_msi, model=grid, wavelengths_nm=centres, log=said.append)
    assert not np.array_equal(corrected, fused)
    assert not any("its network is not applied" in line for line in said)
