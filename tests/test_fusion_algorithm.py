"""csakd:hyperspectralfusion run through QGIS Processing on real data; the output is read
back and its numbers, grid and metadata checked.

Quality is measured as in the project's protocol: on the real Berlin pair (no reference)
by spectral consistency with the LR-HSI and spatial consistency with the HR-MSI; on real
EnMAP Potsdam data by the Wald protocol (a reference exists), against bicubic upsampling.
"""

import gc
import math
import shutil

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import calculate_default_transform, reproject
from rasterio.windows import Window

from csakd_qgis import metrics
from csakd_qgis.baselines import bicubic_upsample
from csakd_qgis.raster_io import read_spectral_metadata
from tests.helpers import folder_listing

BERLIN_LR = "EnMAP_BerlinUrbanGradient_177b_30m.bsq"
BERLIN_HR = "HighResolution_BerlinUrbanGradient_HyMap4b_3m6.bsq"
HYMAP_BANDS_NM = (484.3, 558.4, 646.5, 804.6)
FLOAT_NODATA = -9999.0

# Bounds. Each comment gives the value measured with the bundled student (whose learned residual
# is still zero, see the README); a student that learns one is expected to do at least as well.
#
# Berlin, spectral consistency: the output averaged back onto the LR-HSI's 30 m grid vs the
# LR-HSI, relative RMSE (RMSE / RMS of the LR-HSI) over the LR pixels the output covers fully.
# A box average is not this pair's PSF: the PSF estimated from the pair is a Gaussian of σ ≈ 0.56
# HSI pixels (as wide as a box blurred by a Gaussian of 0.47), so an output consistent under it
# departs further from a box average. Measured 0.130 (0.093 when the Wald Gaussian was assumed
# and the MSI approximated by averaging; bicubic 0.045). The consistency the fusion promises is
# the next test's, under the estimated PSF; this one bounds the departure.
MAX_SPECTRAL_RELATIVE_RMSE = 0.15
# Berlin, consistency under the PSF the fusion estimated (consistency.psf_consistency): the fused
# image degraded with it is at least as close to the LR-HSI as bicubic upsampling degraded the
# same way. Measured 0.032 against 0.069.
# Berlin, spatial consistency, per HyMap band: RMSE against the HR-MSI of the fused band nearest
# in wavelength (gain and offset fitted at 30 m) divided by the same for bicubic upsampling.
# Measured 0.33–0.40 (0.21–0.27 with the earlier base, which injected the MSI's detail without
# leaving out what the LR-HSI already fixes).
MAX_SPATIAL_RMSE_RATIO_TO_BICUBIC = 0.6
# Tile size 128 vs 256 (Berlin crop of 200×200 output pixels): RMS of the difference relative
# to the output's RMS, and the largest difference relative to the output's value range.
# Measured 6e-9 and 2e-7: with a zero residual the base is composed exactly from any tiling;
# tests/test_tiling.py bounds the difference with a network that does move the result.
MAX_TILE_RELATIVE_RMS_DIFFERENCE = 2e-3
MAX_TILE_DIFFERENCE_FRACTION_OF_RANGE = 0.01
# Potsdam Wald pair (scale 3): PSNR gain over bicubic upsampling, dB. Measured 10.5 dB (36.1 vs
# 25.6 dB) with both inputs in UTM, 3.8 dB (29.4 vs 25.6) with the LR-HSI warped to EPSG:3035.
MIN_PSNR_GAIN_OVER_BICUBIC_DB = 3.0
MIN_PSNR_GAIN_OVER_BICUBIC_TWO_CRS_DB = 2.0


def read_raster(path):
    with rasterio.open(path) as ds:
        return {
            "data": ds.read(),
            "crs": ds.crs,
            "transform": ds.transform,
            "width": ds.width,
            "height": ds.height,
            "count": ds.count,
            "nodata": ds.nodata,
            "dtypes": ds.dtypes,
            "tags": [ds.tags(i) for i in range(1, ds.count + 1)],
            "descriptions": ds.descriptions,
            "profile": ds.profile,
        }


def expected_output_grid(lr_path, hr_path):
    """The HR-MSI's whole pixels inside both footprints (inputs in one CRS):
    (transform, width, height, (row0, col0) in the HR-MSI), computed without the plugin."""
    with rasterio.open(lr_path) as lr, rasterio.open(hr_path) as hr:
        assert lr.crs == hr.crs
        t = hr.transform
        left, right = max(lr.bounds.left, hr.bounds.left), min(lr.bounds.right, hr.bounds.right)
        bottom, top = max(lr.bounds.bottom, hr.bounds.bottom), min(lr.bounds.top, hr.bounds.top)
        col0 = math.ceil(round((left - t.c) / t.a, 6))
        col1 = math.floor(round((right - t.c) / t.a, 6))
        row0 = math.ceil(round((top - t.f) / t.e, 6))
        row1 = math.floor(round((bottom - t.f) / t.e, 6))
        transform = rasterio.Affine(t.a, 0.0, t.c + col0 * t.a, 0.0, t.e, t.f + row0 * t.e)
        return transform, col1 - col0, row1 - row0, (row0, col0)


def assert_same_transform(actual, expected, tolerance=1e-6):
    assert np.allclose(tuple(actual)[:6], tuple(expected)[:6], rtol=0, atol=tolerance), (actual, expected)


# --- the real Berlin pair (EnMAP-simulated 30 m + HyMap 3.6 m, ratio 8.33) ------------------


@pytest.fixture(scope="module")
def berlin_paths(shared_data_dir):
    folder = shared_data_dir / "berlin"
    return folder / BERLIN_LR, folder / BERLIN_HR


@pytest.fixture(scope="module")
def berlin_fused(berlin_paths, module_fusion_runner, tmp_path_factory):
    """One run over the whole Berlin pair (659×493×177 output; ~40 s on two busy cores)."""
    lr_path, hr_path = berlin_paths
    output = tmp_path_factory.mktemp("berlin") / "fused.tif"
    results, feedback = module_fusion_runner(LRHSI=str(lr_path), HRMSI=str(hr_path), OUTPUT=str(output))
    assert results["OUTPUT"] == str(output)
    return output, feedback, read_raster(output)


def test_berlin_output_is_the_msi_grid_over_the_common_area(berlin_paths, berlin_fused):
    lr_path, hr_path = berlin_paths
    output, feedback, fused = berlin_fused
    transform, width, height, _ = expected_output_grid(lr_path, hr_path)
    with rasterio.open(hr_path) as hr:
        assert fused["crs"] == hr.crs
        assert fused["crs"].to_epsg() == 32633
    assert (fused["width"], fused["height"]) == (width, height) == (493, 659)
    assert_same_transform(fused["transform"], transform)
    assert fused["count"] == 177
    assert fused["dtypes"] == ("float32",) * 177
    # Tiled and compressed, as large rasters need.
    assert fused["profile"]["tiled"] and fused["profile"]["compress"] == "deflate"
    log = "\n".join(feedback.messages)
    assert "working scale 8" in log and "cpu" in log, log
    assert feedback.progress_values and feedback.progress_values[-1] == pytest.approx(100.0)


def test_berlin_band_metadata_is_copied_in_nanometres_in_order(berlin_paths, berlin_fused):
    lr_path, _ = berlin_paths
    _, _, fused = berlin_fused
    with rasterio.open(lr_path) as lr:
        envi = lr.tags(ns="ENVI")
    assert envi["wavelength_units"].lower() == "micrometers"
    wavelengths_um = [float(v) for v in envi["wavelength"].strip("{} ").split(",")]
    fwhm_um = [float(v) for v in envi["fwhm"].strip("{} ").split(",")]
    assert len(wavelengths_um) == len(fwhm_um) == fused["count"] == 177
    written = np.array([float(t["wavelength"]) for t in fused["tags"]])
    np.testing.assert_allclose(written, np.array(wavelengths_um) * 1000.0, atol=1e-3)
    np.testing.assert_allclose([float(t["fwhm"]) for t in fused["tags"]], np.array(fwhm_um) * 1000.0, atol=1e-3)
    assert {t["wavelength_units"] for t in fused["tags"]} == {"Nanometers"}
    assert {t["bbl"] for t in fused["tags"]} == {"1"}
    assert written[0] == pytest.approx(460.0) and written[-1] == pytest.approx(2409.0)
    # GDAL-based tools (and the plugin itself) read the same numbers back.
    with rasterio.open(berlin_fused[0]) as ds:
        np.testing.assert_allclose(read_spectral_metadata(ds).wavelengths_nm, written)


def test_berlin_output_has_no_nan_and_no_nodata_where_the_inputs_have_data(berlin_paths, berlin_fused):
    lr_path, hr_path = berlin_paths
    _, _, fused = berlin_fused
    _, _, _, (row0, col0) = expected_output_grid(lr_path, hr_path)
    with rasterio.open(lr_path) as lr, rasterio.open(hr_path) as hr:
        assert lr.nodata == hr.nodata == -99
        # Inputs without a single nodata pixel: the output may have none either.
        assert not (lr.read() == lr.nodata).any()
        hr_window = hr.read(window=Window(col0, row0, fused["width"], fused["height"]))
        assert not (hr_window == hr.nodata).any()
    data = fused["data"]
    assert fused["nodata"] == FLOAT_NODATA
    assert np.isfinite(data).all()
    assert not (data == fused["nodata"]).any()
    # Reflectance ×10000 (inputs 21–10000): no value below 0 (both inputs are non-negative, so
    # negative values could only be ringing, which the fusion clips), and hardly any above
    # 10000. Measured: none negative (0.16 % before the clipping); 0.002 % above 10000, the
    # largest 14350 (a single sharpened pixel's overshoot, which moves with the estimated PSF:
    # 11725–15294 in runs with different estimates, so the share is bounded, not the maximum).
    assert not (data < 0).any()
    assert np.mean(data > 10000) < 1e-4


def test_berlin_spectrally_consistent_with_the_lr_hsi(berlin_paths, berlin_fused):
    """The output averaged back onto the 30 m grid matches the LR-HSI (protocol: consistency)."""
    lr_path, _ = berlin_paths
    _, _, fused = berlin_fused
    with rasterio.open(lr_path) as lr:
        lr_data = lr.read().astype(np.float32)
        lr_transform, lr_crs = lr.transform, lr.crs
    degraded = np.full(lr_data.shape, np.nan, np.float32)
    reproject(
        fused["data"], degraded, src_transform=fused["transform"], src_crs=fused["crs"],
        dst_transform=lr_transform, dst_crs=lr_crs, resampling=Resampling.average,
        src_nodata=fused["nodata"], dst_nodata=np.nan,
    )
    # LR pixels that lie wholly inside the output.
    out_left, out_top = fused["transform"].c, fused["transform"].f
    out_right = out_left + fused["width"] * fused["transform"].a
    out_bottom = out_top + fused["height"] * fused["transform"].e
    cols = np.arange(lr_data.shape[2])
    rows = np.arange(lr_data.shape[1])
    col_ok = (lr_transform.c + cols * lr_transform.a >= out_left) & (lr_transform.c + (cols + 1) * lr_transform.a <= out_right)
    row_ok = (lr_transform.f + rows * lr_transform.e <= out_top) & (lr_transform.f + (rows + 1) * lr_transform.e >= out_bottom)
    inside = row_ok[:, None] & col_ok[None, :]
    assert inside.sum() >= 0.9 * inside.size
    assert np.isfinite(degraded[:, inside]).all()
    difference = degraded[:, inside] - lr_data[:, inside]
    relative_rmse = float(np.sqrt(np.mean(difference**2)) / np.sqrt(np.mean(lr_data[:, inside] ** 2)))
    print(f"Berlin spectral consistency: relative RMSE {relative_rmse:.4f}")
    assert relative_rmse < MAX_SPECTRAL_RELATIVE_RMSE
    # No band is far off either (the last SWIR bands are the noisiest).
    per_band = np.sqrt(np.mean(difference**2, axis=1)) / np.sqrt(np.mean(lr_data[:, inside] ** 2, axis=1))
    assert per_band.max() < 1.5 * MAX_SPECTRAL_RELATIVE_RMSE, per_band.max()


def test_berlin_consistent_under_the_estimated_psf_and_the_log_names_it(berlin_paths, berlin_fused):
    """The issue's criterion on the real pair: degraded with the PSF it estimated (recorded in
    the output), the fused image is at least as close to the LR-HSI as bicubic upsampling, and
    the log names the estimate."""
    from csakd_qgis.consistency import psf_consistency

    lr_path, _ = berlin_paths
    output, feedback, fused = berlin_fused
    assert any(m.startswith("estimated PSF:") for m in feedback.messages), feedback.messages
    good = [i + 1 for i, tags in enumerate(fused["tags"]) if tags.get("bbl", "1") != "0"]
    fused_error, bicubic_error = psf_consistency(lr_path, output, good)
    print(f"Berlin consistency under the estimated PSF: fused {fused_error:.4f}, bicubic {bicubic_error:.4f}")
    assert fused_error <= bicubic_error


def test_berlin_carries_the_msi_detail_better_than_bicubic(berlin_paths, berlin_fused):
    """Spatial consistency: the fused bands nearest to HyMap's four bands, mapped onto the MSI's
    radiometry by a gain and offset fitted at 30 m, are compared with the HR-MSI; the same
    for a bicubic upsampling (GDAL cubic) of the LR-HSI onto the output grid."""
    lr_path, hr_path = berlin_paths
    _, _, fused = berlin_fused
    _, _, _, (row0, col0) = expected_output_grid(lr_path, hr_path)
    with rasterio.open(lr_path) as lr, rasterio.open(hr_path) as hr:
        wavelengths = read_spectral_metadata(lr).wavelengths_nm
        nearest = [int(np.argmin(np.abs(wavelengths - w))) for w in HYMAP_BANDS_NM]
        lr_bands = lr.read([i + 1 for i in nearest]).astype(np.float32)
        lr_transform, crs = lr.transform, lr.crs
        msi = hr.read(window=Window(col0, row0, fused["width"], fused["height"])).astype(np.float32)
        msi_at_lr = np.full(lr_bands.shape, np.nan, np.float32)
        reproject(hr.read().astype(np.float32), msi_at_lr, src_transform=hr.transform, src_crs=crs,
                  dst_transform=lr_transform, dst_crs=crs, resampling=Resampling.average,
                  src_nodata=hr.nodata, dst_nodata=np.nan)
    bicubic = np.full(msi.shape, np.nan, np.float32)
    reproject(lr_bands, bicubic, src_transform=lr_transform, src_crs=crs, dst_transform=fused["transform"],
              dst_crs=crs, resampling=Resampling.cubic, dst_nodata=np.nan)
    assert np.isfinite(bicubic).all()
    ratios = []
    for k, band in enumerate(nearest):
        # Edge LR pixels are only partly covered by the MSI: fit on the interior.
        x = lr_bands[k, 1:-1, 1:-1].ravel()
        y = msi_at_lr[k, 1:-1, 1:-1].ravel()
        gain, offset = np.polyfit(x, y, 1)
        fused_error = np.sqrt(np.mean((gain * fused["data"][band] + offset - msi[k]) ** 2))
        bicubic_error = np.sqrt(np.mean((gain * bicubic[k] + offset - msi[k]) ** 2))
        ratios.append(fused_error / bicubic_error)
        print(f"HyMap {HYMAP_BANDS_NM[k]} nm ← fused band {band + 1} ({wavelengths[band]:.0f} nm): "
              f"RMSE fused {fused_error:.1f}, bicubic {bicubic_error:.1f}")
    assert max(ratios) < MAX_SPATIAL_RMSE_RATIO_TO_BICUBIC, ratios


def test_nothing_is_written_beside_the_inputs(berlin_paths, run_fusion, tmp_path):
    """The user's folders are read, never written: no file appears or changes beside the inputs.

    ENVI files given by path: were they loaded as QGIS layers, the histogram QGIS computes for a
    layer's default style would be kept by GDAL in a .aux.xml beside each input once the layer is
    closed (the run's context is deleted below, which closes every layer it holds)."""
    from processing.tools import dataobjects

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in berlin_paths:
        for part in (path, path.with_suffix(".hdr")):
            shutil.copyfile(part, inputs / part.name)  # writable copies, as a user's files are
    before = folder_listing(inputs)
    assert sorted(before) == sorted(p.name for path in berlin_paths for p in (path, path.with_suffix(".hdr")))

    context = dataobjects.createContext()  # what processing.run makes when given none
    output = tmp_path / "fused.tif"
    results, _ = run_fusion(context=context, LRHSI=str(inputs / berlin_paths[0].name),
                            HRMSI=str(inputs / berlin_paths[1].name), OUTPUT=str(output))
    assert results["OUTPUT"] == str(output) and output.is_file()
    del context
    gc.collect()
    assert folder_listing(inputs) == before


@pytest.fixture(scope="module")
def berlin_crop(berlin_paths, tmp_path_factory):
    """The Berlin HR-MSI cut to 200×200 pixels (GeoTIFF), with the whole LR-HSI: a small real pair."""
    lr_path, hr_path = berlin_paths
    folder = tmp_path_factory.mktemp("berlin_crop")
    window = Window(100, 150, 200, 200)
    with rasterio.open(hr_path) as hr:
        profile = dict(driver="GTiff", dtype=hr.dtypes[0], count=hr.count, width=200, height=200,
                       crs=hr.crs, transform=hr.window_transform(window), nodata=hr.nodata)
        data = hr.read(window=window)
    crop = folder / "hymap_crop.tif"
    with rasterio.open(crop, "w", **profile) as dst:
        dst.write(data)
    return lr_path, crop


def test_tile_size_changes_the_result_only_slightly(berlin_crop, run_fusion, tmp_path):
    lr_path, hr_path = berlin_crop
    outputs = {}
    for tile_size in (256, 128):
        output = tmp_path / f"fused_tile{tile_size}.tif"
        run_fusion(LRHSI=str(lr_path), HRMSI=str(hr_path), OUTPUT=str(output), TILE_SIZE=tile_size, OVERLAP=32)
        outputs[tile_size] = read_raster(output)
    a, b = outputs[256], outputs[128]
    assert (a["width"], a["height"], a["count"]) == (b["width"], b["height"], b["count"]) == (200, 200, 177)
    assert a["transform"] == b["transform"]
    assert np.isfinite(a["data"]).all() and np.isfinite(b["data"]).all()
    difference = np.abs(a["data"].astype(np.float64) - b["data"])
    relative_rms = float(np.sqrt(np.mean(difference**2)) / np.sqrt(np.mean(a["data"].astype(np.float64) ** 2)))
    fraction_of_range = float(difference.max() / (a["data"].max() - a["data"].min()))
    print(f"tile 128 vs 256: relative RMS difference {relative_rms:.2e}, max {difference.max():.2f} "
          f"({fraction_of_range:.2e} of the value range)")
    assert relative_rms < MAX_TILE_RELATIVE_RMS_DIFFERENCE
    assert fraction_of_range < MAX_TILE_DIFFERENCE_FRACTION_OF_RANGE


# --- real EnMAP (Potsdam) under the Wald protocol -----------------------------------------


def output_valid_mask(pair, shape):
    """Output pixels the fusion must fill: all but the footprints of the LR nodata holes."""
    valid = np.ones(shape, bool)
    s = pair.scale
    for row, col in pair.lr_holes:
        valid[row * s : (row + 1) * s, col * s : (col + 1) * s] = False
    return valid


def bicubic_psnr(pair, valid):
    good = ~pair.bad_bands
    upsampled = bicubic_upsample(pair.lr[good], pair.scale, out_shape=pair.reference.shape[1:])
    return metrics.psnr(pair.reference[good], upsampled, valid=valid)


@pytest.fixture(scope="module")
def potsdam_fused(potsdam_wald_pair, module_fusion_runner, tmp_path_factory):
    output = tmp_path_factory.mktemp("potsdam") / "fused.tif"
    module_fusion_runner(LRHSI=str(potsdam_wald_pair.lr_path), HRMSI=str(potsdam_wald_pair.hr_path),
                         OUTPUT=str(output))
    return read_raster(output)


def test_potsdam_output_grid_bands_and_bad_bands(potsdam_wald_pair, potsdam_fused):
    pair, fused = potsdam_wald_pair, potsdam_fused
    with rasterio.open(pair.hr_path) as hr, rasterio.open(pair.lr_path) as lr:
        assert (fused["width"], fused["height"]) == (hr.width, hr.height) == (96, 63)
        assert fused["transform"] == hr.transform and fused["crs"] == hr.crs
        lr_tags = [lr.tags(i) for i in range(1, lr.count + 1)]
    assert fused["count"] == 224
    bad = pair.bad_bands
    assert np.flatnonzero(bad).tolist() == list(range(129, 135))  # bands 130–135
    assert [t["bbl"] for t in fused["tags"]] == ["0" if b else "1" for b in bad]
    np.testing.assert_allclose([float(t["wavelength"]) for t in fused["tags"]],
                               [float(t["wavelength"]) for t in lr_tags], atol=1e-3)
    np.testing.assert_allclose([float(t["fwhm"]) for t in fused["tags"]],
                               [float(t["fwhm"]) for t in lr_tags], atol=1e-3)
    data = fused["data"]
    assert (data[bad] == fused["nodata"]).all()
    valid = output_valid_mask(pair, data.shape[1:])
    good = data[~bad]
    assert np.isfinite(good).all()
    # nodata exactly where the LR-HSI had none to give: the 3×3 footprints of its holes.
    assert ((good == fused["nodata"]).all(axis=0) == ~valid).all()
    assert not (good[:, valid] == fused["nodata"]).any()


def test_potsdam_quality_beats_bicubic(potsdam_wald_pair, potsdam_fused):
    pair, data = potsdam_wald_pair, potsdam_fused["data"]
    good = ~pair.bad_bands
    valid = output_valid_mask(pair, data.shape[1:])
    fused_psnr = metrics.psnr(pair.reference[good], data[good], valid=valid)
    floor = bicubic_psnr(pair, valid)
    fused_sam = metrics.sam(pair.reference[good], data[good], valid=valid)
    floor_sam = metrics.sam(pair.reference[good], bicubic_upsample(pair.lr[good], 3, pair.reference.shape[1:]), valid=valid)
    print(f"Potsdam Wald ×3: PSNR fused {fused_psnr:.2f} dB, bicubic {floor:.2f} dB; "
          f"SAM fused {fused_sam:.2f}°, bicubic {floor_sam:.2f}°")
    assert fused_psnr > floor + MIN_PSNR_GAIN_OVER_BICUBIC_DB


def test_a_misregistered_lr_hsi_is_measured_and_compensated(wald_pair_factory, run_fusion, make_feedback, tmp_path):
    """The LR-HSI's footprints one MSI pixel down and right of where its georeference says: the
    log reports the offset, and the result is as good as the aligned pair's. (Measured 37.55 dB
    shifted and 37.58 dB aligned; uncompensated, the shifted pair's PSNR was 27.0 dB.)"""
    psnrs, logs = {}, {}
    for name, shift in (("aligned", (0.0, 0.0)), ("shifted", (1.0, 1.0))):
        pair = wald_pair_factory("enmap_potsdam_blockA_96x64.tif", lr_holes=(), shift=shift)
        output = tmp_path / f"{name}.tif"
        feedback = make_feedback()
        run_fusion(feedback=feedback, LRHSI=str(pair.lr_path), HRMSI=str(pair.hr_path), OUTPUT=str(output))
        good = ~pair.bad_bands
        psnrs[name] = metrics.psnr(pair.reference[good], read_raster(output)["data"][good])
        logs[name] = [m for m in feedback.messages if "offset by" in m or "images are aligned" in m]
    print(f"Potsdam Wald ×3: PSNR aligned {psnrs['aligned']:.2f} dB, LR-HSI shifted by 1 MSI pixel {psnrs['shifted']:.2f} dB")
    assert "+1.00 rows and +1.00 columns" in logs["shifted"][0], logs
    assert logs["aligned"] and "no misregistration" in logs["aligned"][0], logs
    assert "compensated (" not in logs["aligned"][0], logs
    assert psnrs["shifted"] > psnrs["aligned"] - 0.5


def test_two_crs_output_on_the_msi_grid_and_better_than_bicubic(potsdam_wald_pair, run_fusion, tmp_path):
    """The LR-HSI reprojected to ETRS89-LAEA (EPSG:3035): the output stays on the MSI's UTM grid."""
    pair = potsdam_wald_pair
    warped = tmp_path / "lr_hsi_3035.tif"
    with rasterio.open(pair.lr_path) as src:
        transform, width, height = calculate_default_transform(
            src.crs, "EPSG:3035", src.width, src.height, *src.bounds, resolution=90.0)
        profile = dict(src.profile, crs="EPSG:3035", transform=transform, width=width, height=height)
        with rasterio.open(warped, "w", **profile) as dst:
            for index in range(1, src.count + 1):
                reproject(rasterio.band(src, index), rasterio.band(dst, index), resampling=Resampling.bilinear,
                          src_nodata=src.nodata, dst_nodata=src.nodata)
                dst.update_tags(index, **src.tags(index))
    output = tmp_path / "fused.tif"
    run_fusion(LRHSI=str(warped), HRMSI=str(pair.hr_path), OUTPUT=str(output))
    fused = read_raster(output)
    with rasterio.open(pair.hr_path) as hr:
        assert fused["crs"] == hr.crs and fused["crs"].to_epsg() == 32633
        assert fused["transform"] == hr.transform
        assert (fused["width"], fused["height"]) == (hr.width, hr.height)
    assert fused["count"] == 224
    good = ~pair.bad_bands
    data = fused["data"][good]
    # Reprojection widens the holes by a pixel or so; compare where the output has data.
    filled = (data != fused["nodata"]).all(axis=0) & np.isfinite(data).all(axis=0)
    valid = output_valid_mask(pair, filled.shape)
    assert filled[valid].mean() > 0.9
    compare = filled & valid
    fused_psnr = metrics.psnr(pair.reference[good], data, valid=compare)
    floor = bicubic_psnr(pair, compare)
    print(f"Potsdam Wald ×3, LR-HSI in EPSG:3035: PSNR fused {fused_psnr:.2f} dB, "
          f"bicubic of the UTM LR-HSI {floor:.2f} dB; filled {filled[valid].mean():.3f}")
    assert fused_psnr > floor + MIN_PSNR_GAIN_OVER_BICUBIC_TWO_CRS_DB


def _grid_bundle(path, zero_head: bool):
    """A small model on the wavelength grid (model.REPRESENTATIONS), saved as a bundle: with a
    random output convolution, as a trained one has, or with the zero one of the untrained base."""
    import torch

    from csakd_qgis.bundle import save_bundle
    from csakd_qgis.train import student_config
    from csakd_qgis.model import SubspaceFusionModel
    from tests.helpers import randomise_head

    torch.manual_seed(0)
    model = SubspaceFusionModel(student_config(representation="grid", unshuffle=1, width=8))
    if not zero_head:
        randomise_head(model, seed=1)
    return save_bundle(path, model.eval(), {"name": path.stem})


def test_a_grid_model_reads_the_band_centres_from_the_rasters_metadata(berlin_crop, run_fusion, tmp_path):
    """A model on the wavelength grid needs the LR-HSI's band centres; fusion reads them from the
    raster's metadata (the EnMAP Berlin cube's ENVI header here), also for a subset of the bands,
    so that the network's correction reaches the output (without them it would be the base)."""
    lr_path, hr_path = berlin_crop
    outputs = {}
    for name, zero_head, bands in (("base", True, None), ("grid", False, None), ("grid_subset", False, list(range(1, 61)))):
        bundle = _grid_bundle(tmp_path / f"{name}.json", zero_head)
        parameters = {"LRHSI": str(lr_path), "HRMSI": str(hr_path), "MODEL": str(bundle), "OUTPUT": str(tmp_path / f"{name}.tif")}
        if bands:
            parameters["BANDS"] = bands
        results, _ = run_fusion(**parameters)
        raster = read_raster(results["OUTPUT"])
        data = raster["data"].astype(np.float64)
        if raster["nodata"] is not None:
            data[data == raster["nodata"]] = np.nan
        outputs[name] = data
    base, grid, subset = outputs["base"], outputs["grid"], outputs["grid_subset"]
    assert subset.shape[0] == 60 and grid.shape == base.shape
    valid = np.isfinite(base).all(0) & np.isfinite(grid).all(0) & np.isfinite(subset).all(0)
    assert valid.mean() > 0.5
    scale = np.abs(base[:, valid]).max()
    assert np.abs(grid[:, valid] - base[:, valid]).max() > 1e-3 * scale
    # The subset's first 60 bands hold the same band centres: its correction is of the same kind.
    assert np.abs(subset[:, valid] - base[:60, valid]).max() > 1e-3 * scale
