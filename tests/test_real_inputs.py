"""csakd:hyperspectralfusion on the input properties real rasters have: each kind either fuses
correctly (checked against the same pair without the property) or is refused with a message
that says what is wrong; nothing is lost silently.

Kinds: any GDAL geotransform orientation; no data in one band only (per-band no-data values,
mask bands, on either input); integer outputs of scaled inputs; wavelengths wherever products
and tools put them; outputs that would overwrite an input or cannot be written; and the
refusals and warnings a first-time user met (tiny overlaps, MSI band counts, BANDS as text, a
weights file as MODEL, misregistration messages).
"""

import hashlib
import os
import resource
import signal
import shutil

import numpy as np
import pytest
import rasterio
from affine import Affine
from osgeo import gdal
from qgis.core import QgsProcessingContext, QgsProcessingException, QgsProject

from csakd_qgis.raster_io import parse_wavelength_name, read_spectral_metadata
from csakd_qgis.psf import wald
from csakd_qgis.registration import DegradationEstimate
from tests.helpers import expect_refusal as refused

# --- helpers ------------------------------------------------------------------------------


def read_output(path):
    """(data float32 with nodata as NaN, the dataset's transform, per-band tags, scales, offsets)."""
    with rasterio.open(path) as ds:
        data = ds.read(masked=True).astype(np.float32).filled(np.nan)
        return {
            "data": data, "transform": ds.transform, "tags": [ds.tags(i) for i in range(1, ds.count + 1)],
            "scales": np.array(ds.scales), "offsets": np.array(ds.offsets), "dtype": ds.dtypes[0], "nodata": ds.nodata,
            "raw": ds.read(), "count": ds.count,
        }


def rewrite(source, destination, data=None, transform=None, dtype=None, nodata="keep", tags=True, descriptions=None,
            scales=None, offsets=None):
    """A GeoTIFF copy of ``source`` with any of its pixels, grid, type, no-data, band metadata
    and names replaced."""
    with rasterio.open(source) as src:
        values = src.read() if data is None else data
        profile = dict(src.profile, driver="GTiff", count=values.shape[0], height=values.shape[1], width=values.shape[2])
        band_tags = [src.tags(i) for i in range(1, src.count + 1)]
        names = src.descriptions
    profile.pop("blockxsize", None), profile.pop("blockysize", None), profile.pop("tiled", None)
    if transform is not None:
        profile["transform"] = transform
    if dtype is not None:
        profile["dtype"] = dtype
    if nodata != "keep":
        profile["nodata"] = nodata
    with rasterio.open(destination, "w", **profile) as dst:
        dst.write(values.astype(profile["dtype"]))
        for index in range(1, values.shape[0] + 1):
            if tags and index <= len(band_tags):
                dst.update_tags(index, **band_tags[index - 1])
            name = descriptions[index - 1] if descriptions is not None else (names[index - 1] if index <= len(names) else None)
            if name:
                dst.set_band_description(index, name)
        if scales is not None:
            dst.scales, dst.offsets = tuple(scales), tuple(offsets)
    return destination


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def reference(potsdam_wald_pair, module_fusion_runner, tmp_path_factory):
    """The Potsdam pair (north-up, float32, band metadata) fused as it is."""
    output = tmp_path_factory.mktemp("reference") / "fused.tif"
    module_fusion_runner(LRHSI=str(potsdam_wald_pair.lr_path), HRMSI=str(potsdam_wald_pair.hr_path), OUTPUT=str(output))
    return read_output(output)


def fuse(run_fusion, make_feedback, output, **parameters):
    feedback = make_feedback()
    run_fusion(feedback=feedback, OUTPUT=str(output), **parameters)
    return read_output(output), feedback.messages


# --- any GDAL geotransform orientation ------------------------------------------------------


def reoriented(path, destination, kind):
    """The same raster stored south-up, east-to-west, or on a grid rotated by 90°: every pixel
    keeps its place on the ground."""
    with rasterio.open(path) as src:
        data, t, height, width = src.read(), src.transform, src.height, src.width
    if kind == "south-up":
        return rewrite(path, destination, data[:, ::-1, :], Affine(t.a, 0, t.c, 0, -t.e, t.f + t.e * height))
    if kind == "east-to-west":
        return rewrite(path, destination, data[:, :, ::-1], Affine(-t.a, 0, t.c + t.a * width, 0, t.e, t.f))
    # Rotated: row i runs east, column j south (X = c + a·i, Y = f + e·j).
    return rewrite(path, destination, data.transpose(0, 2, 1), Affine(0, t.a, t.c, t.e, 0, t.f))


@pytest.mark.parametrize("role,kind", [
    ("HRMSI", "south-up"), ("LRHSI", "south-up"), ("HRMSI", "east-to-west"), ("LRHSI", "east-to-west"),
    ("HRMSI", "rotated"), ("LRHSI", "rotated"),
])
def test_any_orientation_fuses_like_the_north_up_pair(role, kind, potsdam_wald_pair, reference, run_fusion,
                                                      make_feedback, tmp_path):
    pair = potsdam_wald_pair
    inputs = {"LRHSI": str(pair.lr_path), "HRMSI": str(pair.hr_path)}
    inputs[role] = str(reoriented(inputs[role], tmp_path / f"{role}_{kind}.tif", kind))
    fused, log = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", **inputs)
    # The output sits on the MSI's grid made north-up: the reference's grid.
    assert fused["transform"] == reference["transform"]
    assert fused["data"].shape == reference["data"].shape
    both = np.isfinite(reference["data"])
    assert (np.isfinite(fused["data"]) == both).all()
    difference = np.abs(fused["data"][both] - reference["data"][both]).max()
    print(f"{role} {kind}: largest difference from the north-up pair {difference:.3g} (values up to "
          f"{np.nanmax(reference['data']):.0f})")
    # Flips are read exactly; a 90° rotation is warped by cubic interpolation onto the same
    # pixel centres, which reproduces the pixels up to rounding.
    assert difference < 1e-2
    orientation_lines = [m for m in log if kind.split("-")[0] in m or "flipped" in m]
    assert orientation_lines, log


def test_msi_rotated_by_30_degrees_fuses_on_a_north_up_grid(potsdam_wald_pair, run_fusion, make_feedback, tmp_path):
    """A rotation that is no quarter turn: the MSI is warped onto GDAL's north-up grid around
    it; the corners outside its footprint are no data, the centre is fused."""
    pair = potsdam_wald_pair
    with rasterio.open(pair.hr_path) as src:
        t, width, height = src.transform, src.width, src.height
    centre = t * (width / 2, height / 2)
    turned = Affine.rotation(30, pivot=centre) * t
    hr = rewrite(pair.hr_path, tmp_path / "msi_30.tif", transform=turned)
    fused, log = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", LRHSI=str(pair.lr_path), HRMSI=str(hr))
    out = fused["transform"]
    assert out.b == 0 and out.d == 0 and out.a > 0 and out.e < 0
    good = fused["data"][~pair.bad_bands]
    rows, cols = good.shape[1:]
    assert np.isnan(good[:, 0, 0]).all() and np.isnan(good[:, -1, -1]).all()
    assert np.isfinite(good[:, rows // 2 - 3 : rows // 2 + 3, cols // 2 - 3 : cols // 2 + 3]).all()
    assert any("rotated grid" in m and "cubic" in m for m in log), log


def test_orientation_is_measured_on_sorted_corners_not_bounds(potsdam_wald_pair, tmp_path):
    from csakd_qgis.georaster import plan_grid

    south_up = reoriented(potsdam_wald_pair.hr_path, tmp_path / "msi_south_up.tif", "south-up")
    with rasterio.open(potsdam_wald_pair.lr_path) as lr, rasterio.open(south_up) as hr, \
            rasterio.open(potsdam_wald_pair.hr_path) as north:
        grid = plan_grid(lr, hr)
        assert grid.transform == north.transform and (grid.width, grid.height) == (north.width, north.height)


# --- no data in one band only ---------------------------------------------------------------


def test_a_band_missing_in_most_pixels_is_set_aside_and_named(potsdam_wald_pair, reference, run_fusion,
                                                             make_feedback, tmp_path):
    pair = potsdam_wald_pair
    with rasterio.open(pair.lr_path) as src:
        data, nodata = src.read(), src.nodata
    band = 100  # 0-based: band 101
    gone = np.random.default_rng(1).random(data.shape[1:]) < 0.6
    data[band][gone] = nodata
    lr = rewrite(pair.lr_path, tmp_path / "lr_one_band_gaps.tif", data)
    fused, log = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", LRHSI=str(lr), HRMSI=str(pair.hr_path))
    assert fused["tags"][band]["bbl"] == "0" and np.isnan(fused["data"][band]).all()
    named = [m for m in log if f"band {band + 1} " in m and "set aside" in m]
    assert named, log
    others = np.ones(len(fused["data"]), bool)
    others[band] = False
    # Every other band has data wherever it had without the gaps.
    assert (np.isfinite(fused["data"][others]) == np.isfinite(reference["data"][others])).all()
    share_blank = float(np.isnan(fused["data"][others & ~pair.bad_bands]).all(0).mean())
    print(f"band {band + 1} missing in {gone.mean():.0%} of the pixels: {share_blank:.1%} of the output blank in all bands")
    assert share_blank < 0.05


def test_a_value_missing_in_one_band_costs_only_that_band_there(potsdam_wald_pair, reference, run_fusion,
                                                                make_feedback, tmp_path):
    pair = potsdam_wald_pair
    s = pair.scale
    with rasterio.open(pair.lr_path) as src:
        data, nodata = src.read(), src.nodata
    band, pixels = 50, [(5, 5), (12, 20), (15, 8)]
    for row, col in pixels:
        data[band, row, col] = nodata
    lr = rewrite(pair.lr_path, tmp_path / "lr_few_gaps.tif", data)
    fused, log = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", LRHSI=str(lr), HRMSI=str(pair.hr_path))
    expected = np.isfinite(reference["data"])
    for row, col in pixels:
        expected[band, row * s : (row + 1) * s, col * s : (col + 1) * s] = False
    assert (np.isfinite(fused["data"]) == expected).all()
    assert fused["tags"][band]["bbl"] == "1"


def test_msi_band_missing_in_a_patch_blanks_no_output_pixel(potsdam_wald_pair, reference, run_fusion, make_feedback,
                                                            tmp_path):
    pair = potsdam_wald_pair
    with rasterio.open(pair.hr_path) as src:
        msi = src.read()
    msi[0, 20:30, 20:30] = -9999.0  # blue only
    hr = rewrite(pair.hr_path, tmp_path / "msi_blue_gaps.tif", msi, nodata=-9999.0)
    fused, _ = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", LRHSI=str(pair.lr_path), HRMSI=str(hr))
    assert (np.isfinite(fused["data"]) == np.isfinite(reference["data"])).all()
    patch, whole = fused["data"][~pair.bad_bands, 20:30, 20:30], reference["data"][~pair.bad_bands, 20:30, 20:30]
    relative = np.abs(patch - whole).mean() / np.abs(whole).mean()
    print(f"MSI blue missing in a 10 × 10 patch: mean difference there {relative:.1%} of the signal")
    assert relative < 0.1


def test_msi_band_missing_in_most_pixels_is_set_aside_and_named(potsdam_wald_pair, reference, run_fusion,
                                                                make_feedback, tmp_path):
    pair = potsdam_wald_pair
    with rasterio.open(pair.hr_path) as src:
        msi = src.read()
    extra = msi[3:4] * 0.5 + msi[0:1] * 0.5  # a fifth band, without data in 70 % of the pixels
    extra[:, np.random.default_rng(2).random(msi.shape[1:]) < 0.7] = -9999.0
    hr = rewrite(pair.hr_path, tmp_path / "msi_5_bands.tif", np.concatenate([msi, extra]), nodata=-9999.0,
                 descriptions=[""] * 5)
    fused, log = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", LRHSI=str(pair.lr_path), HRMSI=str(hr))
    assert any("band 5 of the multispectral image" in m and "set aside" in m for m in log), log
    # The other four bands give what the 4-band MSI gives.
    both = np.isfinite(reference["data"])
    assert (np.isfinite(fused["data"]) == both).all()
    np.testing.assert_allclose(fused["data"][both], reference["data"][both], rtol=1e-4, atol=1e-2)


def test_per_band_nodata_values_and_mask_bands(potsdam_wald_pair, reference, run_fusion, make_feedback, tmp_path):
    """A VRT gives band 21 of the LR-HSI its own no-data value (GDAL's per-band no-data); an
    internal mask band on the MSI masks a corner in every band."""
    pair = potsdam_wald_pair
    s = pair.scale
    with rasterio.open(pair.lr_path) as src:
        data, nodata = src.read(), src.nodata
    data[20][data[20] == nodata] = -1.0  # band 21's own no-data value, at the pair's holes
    data[20, 4, 6] = -1.0  # and at one pixel more
    base = rewrite(pair.lr_path, tmp_path / "lr_base.tif", data)
    vrt = gdal.Translate(str(tmp_path / "lr_per_band.vrt"), str(base), format="VRT")
    vrt.GetRasterBand(21).SetNoDataValue(-1.0)
    vrt = None
    masked_msi = gdal.Translate(str(tmp_path / "msi_mask.tif"), str(pair.hr_path))
    masked_msi.CreateMaskBand(gdal.GMF_PER_DATASET)
    mask = np.full((masked_msi.RasterYSize, masked_msi.RasterXSize), 255, np.uint8)
    mask[:6, :6] = 0
    masked_msi.GetRasterBand(1).GetMaskBand().WriteArray(mask)
    masked_msi = None
    fused, _ = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", LRHSI=str(tmp_path / "lr_per_band.vrt"),
                    HRMSI=str(tmp_path / "msi_mask.tif"))
    expected = np.isfinite(reference["data"])
    expected[20, 4 * s : 5 * s, 6 * s : 7 * s] = False  # that band only
    expected[:, :6, :6] = False  # every band
    assert (np.isfinite(fused["data"]) == expected).all()


# --- integer outputs keep the input's encoding ---------------------------------------------


def test_int16_output_of_a_scaled_int16_input_keeps_its_scale(potsdam_wald_pair, run_fusion, make_feedback, tmp_path):
    pair = potsdam_wald_pair
    with rasterio.open(pair.lr_path) as src:
        dn = src.read()
    digital = np.where(np.isfinite(dn) & (dn != -32768), np.round(dn), -32768)
    lr = rewrite(pair.lr_path, tmp_path / "lr_int16.tif", digital, dtype="int16", nodata=-32768,
                 scales=[1e-4] * len(dn), offsets=[0.0] * len(dn))
    as_float, _ = fuse(run_fusion, make_feedback, tmp_path / "float.tif", LRHSI=str(lr), HRMSI=str(pair.hr_path))
    as_int, log = fuse(run_fusion, make_feedback, tmp_path / "int16.tif", LRHSI=str(lr), HRMSI=str(pair.hr_path),
                       OUTPUT_TYPE=1)
    assert as_int["dtype"] == "int16"
    np.testing.assert_allclose(as_int["scales"], 1e-4)
    np.testing.assert_allclose(as_int["offsets"], 0.0)
    physical = as_int["data"] * as_int["scales"][:, None, None] + as_int["offsets"][:, None, None]
    both = np.isfinite(as_float["data"])
    assert (np.isfinite(physical) == both).all()
    # Within half a DN of the float32 result (reflectance 0–0.5: thousands of distinct values).
    assert np.abs(physical[both] - as_float["data"][both]).max() <= 0.5e-4 + 1e-6
    assert len(np.unique(as_int["raw"])) > 1000
    assert any("scale 0.0001" in m for m in log), log


def test_int16_output_of_a_float_input_gets_a_power_of_ten_scale(potsdam_wald_pair, run_fusion, make_feedback,
                                                                 tmp_path):
    pair = potsdam_wald_pair
    with rasterio.open(pair.lr_path) as src:
        values, nodata = src.read(), src.nodata
    reflectance = np.where(values == nodata, nodata, values / 10000.0).astype(np.float32)
    lr = rewrite(pair.lr_path, tmp_path / "lr_reflectance.tif", reflectance)
    as_float, _ = fuse(run_fusion, make_feedback, tmp_path / "float.tif", LRHSI=str(lr), HRMSI=str(pair.hr_path))
    as_int, _ = fuse(run_fusion, make_feedback, tmp_path / "int16.tif", LRHSI=str(lr), HRMSI=str(pair.hr_path),
                     OUTPUT_TYPE=1)
    np.testing.assert_allclose(as_int["scales"], 1e-4)
    physical = as_int["data"] * 1e-4
    both = np.isfinite(as_float["data"])
    assert np.abs(physical[both] - as_float["data"][both]).max() <= 0.5e-4 + 1e-6


def test_negative_values_clipped_in_uint16_are_counted_in_the_log(potsdam_wald_pair, run_fusion, make_feedback,
                                                                  tmp_path):
    pair = potsdam_wald_pair
    with rasterio.open(pair.lr_path) as src:
        values, nodata = src.read(), src.nodata
    shifted = np.where(values == nodata, nodata, values - 1000.0).astype(np.float32)  # some below 0
    lr = rewrite(pair.lr_path, tmp_path / "lr_negative.tif", shifted)
    fused, log = fuse(run_fusion, make_feedback, tmp_path / "uint16.tif", LRHSI=str(lr), HRMSI=str(pair.hr_path),
                      OUTPUT_TYPE=2)
    assert fused["dtype"] == "uint16"
    clipped = [m for m in log if m.startswith("warning:") and "clipped" in m]
    assert clipped and "uint16" in clipped[0], log
    assert int(clipped[0].split("warning: ")[1].split()[0]) > 0


# --- wavelengths wherever products and tools put them --------------------------------------


@pytest.mark.parametrize("names,expected", [
    (["443.0 nm", "560.0 nm"], [443, 560]), (["0.44300", "0.56000"], [443, 560]), (["B1 443nm", "B2 560nm"], [443, 560]),
    (["band 7 (0.4554 Micrometers)", "band 8 (0.5600 Micrometers)"], [455.4, 560]), (["Rrs_443", "Rrs_560"], [443, 560]),
    (["2190 nanometers", "2200 nanometers"], [2190, 2200]), (["1.6 µm", "2.2 µm"], [1600, 2200]),
])
def test_wavelengths_from_band_names(names, expected, tmp_path):
    path = tmp_path / "named.tif"
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=len(names), dtype="float32") as dst:
        for index, name in enumerate(names, start=1):
            dst.set_band_description(index, name)
    with rasterio.open(path) as ds:
        meta = read_spectral_metadata(ds)
    assert meta.source == "band names"
    np.testing.assert_allclose(meta.wavelengths_nm, expected, rtol=1e-6)
    assert parse_wavelength_name(names[0])[0] > 0


def test_band_numbers_are_not_wavelengths(tmp_path):
    path = tmp_path / "numbered.tif"
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=3, dtype="float32") as dst:
        for i in range(1, 4):
            dst.set_band_description(i, f"Band {i}")
    with rasterio.open(path) as ds:
        assert read_spectral_metadata(ds).wavelengths_nm is None


def test_wavelengths_from_the_imagery_domain(tmp_path):
    path = tmp_path / "imagery.tif"
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=3, dtype="float32") as dst:
        for i, (centre, width) in enumerate(((0.443, 0.02), (0.56, 0.035), (0.665, 0.03)), start=1):
            dst.update_tags(i, ns="IMAGERY", CENTRAL_WAVELENGTH_UM=str(centre), FWHM_UM=str(width))
    with rasterio.open(path) as ds:
        meta = read_spectral_metadata(ds)
    np.testing.assert_allclose(meta.wavelengths_nm, [443, 560, 665])
    np.testing.assert_allclose(meta.fwhm_nm, [20, 35, 30])


def test_wavelengths_from_a_netcdf_wavelength_dimension(tmp_path):
    path = str(tmp_path / "cube.nc")
    driver = gdal.GetDriverByName("netCDF")
    dataset = driver.CreateMultiDimensional(path)
    group = dataset.GetRootGroup()
    dims = [group.CreateDimension(name, None, None, size) for name, size in (("wavelength", 3), ("y", 4), ("x", 5))]
    float64 = gdal.ExtendedDataType.Create(gdal.GDT_Float64)
    coordinate = group.CreateMDArray("wavelength", [dims[0]], float64)
    coordinate.Write(np.array([443.0, 560.0, 665.0]))
    coordinate.CreateAttribute("units", [], gdal.ExtendedDataType.CreateString()).WriteString("nm")
    for name, size in (("y", 4), ("x", 5)):
        group.CreateMDArray(name, [d for d in dims if d.GetName() == name], float64).Write(np.arange(size, dtype=float))
    group.CreateMDArray("reflectance", dims, gdal.ExtendedDataType.Create(gdal.GDT_Float32)).Write(
        np.ones((3, 4, 5), np.float32))
    dataset = None
    with rasterio.open(f'NETCDF:"{path}":reflectance') as ds:
        meta = read_spectral_metadata(ds)
    assert meta.source and "netCDF" in meta.source
    np.testing.assert_allclose(meta.wavelengths_nm, [443, 560, 665])


def test_wavelengths_from_prisma_and_emit_attributes(tmp_path):
    for sensor, tags, expected in (
        ("prisma", {"List_Cw_Vnir": "443.1 560.2 665.3", "List_Fwhm_Vnir": "10 11 12"}, [443.1, 560.2, 665.3]),
        ("emit", {"sensor_band_parameters_wavelengths": "{443.1,560.2,665.3}", "good_wavelengths": "{1,1,0}"},
         [443.1, 560.2, 665.3]),
    ):
        path = tmp_path / f"{sensor}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=3, dtype="float32") as dst:
            dst.update_tags(**tags)
        with rasterio.open(path) as ds:
            meta = read_spectral_metadata(ds)
        np.testing.assert_allclose(meta.wavelengths_nm, expected)
        if sensor == "emit":
            assert meta.bad_bands.tolist() == [False, False, True]
        else:
            np.testing.assert_allclose(meta.fwhm_nm, [10, 11, 12])


def write_enmap_product(pair, folder):
    """An EnMAP L2A delivery: int16 SPECTRAL_IMAGE.TIF (DN, no spectral metadata, no scale)
    beside a METADATA.XML with each band's centre, FWHM, gain 0.0001 and offset."""
    stem = "ENMAP01-____L2A-DT0000000001_20240101T100000Z_001_V010400_20240102T000000Z"
    folder.mkdir()
    with rasterio.open(pair.lr_path) as src:
        values, nodata = src.read(), src.nodata
        tags = [src.tags(i) for i in range(1, src.count + 1)]
    digital = np.where(values == nodata, -32768, np.round(values)).astype(np.int16)
    tif = rewrite(pair.lr_path, folder / f"{stem}-SPECTRAL_IMAGE.TIF", digital, dtype="int16", nodata=-32768,
                  tags=False, descriptions=[""] * len(digital))
    bands = "\n".join(
        f'<bandID number="{i}"><wavelengthCenterOfBand>{t["wavelength"]}</wavelengthCenterOfBand>'
        f'<FWHMOfBand>{t["fwhm"]}</FWHMOfBand><GainOfBand>0.0001</GainOfBand><OffsetOfBand>0</OffsetOfBand></bandID>'
        for i, t in enumerate(tags, start=1)
    )
    (folder / f"{stem}-METADATA.XML").write_text(
        f'<?xml version="1.0" encoding="UTF-8"?>\n<level_X><specific><bandCharacterisation>\n{bands}\n'
        "</bandCharacterisation></specific></level_X>\n"
    )
    return tif, np.array([float(t["wavelength"]) for t in tags])


def test_enmap_product_gets_wavelengths_fwhm_and_gain_from_its_metadata_xml(potsdam_wald_pair, reference, run_fusion,
                                                                             make_feedback, tmp_path):
    pair = potsdam_wald_pair
    tif, wavelengths = write_enmap_product(pair, tmp_path / "enmap")
    fused, log = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", LRHSI=str(tif), HRMSI=str(pair.hr_path))
    np.testing.assert_allclose([float(t["wavelength"]) for t in fused["tags"]], wavelengths, atol=1e-3)
    assert all("fwhm" in t for t in fused["tags"])
    # Reflectance: the DN times the gain, i.e. the reference's values / 10000.
    both = np.isfinite(reference["data"]) & np.isfinite(fused["data"])
    ratio = np.nanmedian(fused["data"][both] / np.where(reference["data"][both] == 0, np.nan, reference["data"][both]))
    assert ratio == pytest.approx(1e-4, rel=0.01)
    assert any("METADATA.XML" in m and "gain" in m for m in log), log


def test_wavelengths_in_band_names_reach_the_output(potsdam_wald_pair, run_fusion, make_feedback, tmp_path):
    pair = potsdam_wald_pair
    with rasterio.open(pair.lr_path) as src:
        wavelengths = np.array([float(src.tags(i)["wavelength"]) for i in range(1, src.count + 1)])
    lr = rewrite(pair.lr_path, tmp_path / "lr_named.tif", tags=False,
                 descriptions=[f"B{i} {w:.1f}nm" for i, w in enumerate(wavelengths, start=1)])
    fused, log = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", LRHSI=str(lr), HRMSI=str(pair.hr_path))
    np.testing.assert_allclose([float(t["wavelength"]) for t in fused["tags"]], wavelengths, atol=0.06)
    assert any("wavelengths" in m and "band names" in m for m in log), log


def test_no_wavelengths_is_a_warning_in_the_log(potsdam_wald_pair, run_fusion, make_feedback, tmp_path):
    pair = potsdam_wald_pair
    lr = rewrite(pair.lr_path, tmp_path / "lr_bare.tif", tags=False, descriptions=[""] * 224)
    fused, log = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", LRHSI=str(lr), HRMSI=str(pair.hr_path))
    assert all("wavelength" not in t for t in fused["tags"])
    warning = [m for m in log if "no wavelengths" in m]
    assert warning and "true-colour" in warning[0] and "wavelength_units" in warning[0], log


# --- outputs that would overwrite an input, or cannot be written ----------------------------


def test_output_equal_to_an_input_is_refused_and_the_input_unchanged(potsdam_wald_pair, run_fusion, tmp_path):
    pair = potsdam_wald_pair
    lr = shutil.copy(pair.lr_path, tmp_path / "lr.tif")
    hr = shutil.copy(pair.hr_path, tmp_path / "hr.tif")
    (tmp_path / "links").mkdir()
    os.symlink(lr, tmp_path / "links" / "symlink.tif")
    os.link(lr, tmp_path / "links" / "hardlink.tif")
    before = {p: sha256(p) for p in (lr, hr)}
    for output in (lr, hr, tmp_path / "links" / "symlink.tif", tmp_path / "links" / "hardlink.tif"):
        refused(run_fusion, "would overwrite the input", "choose another output",
                LRHSI=str(lr), HRMSI=str(hr), OUTPUT=str(output))
    assert {p: sha256(p) for p in (lr, hr)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hr.tif", "links", "lr.tif"]


def test_output_onto_an_envi_input_file_is_refused(potsdam_wald_pair, fusion_model, tmp_path):
    """An ENVI input is two files (data and .hdr): an output onto either is refused."""
    from csakd_qgis.api import fuse_files
    from csakd_qgis.georaster import FusionInputError

    pair = potsdam_wald_pair
    gdal.Translate(str(tmp_path / "lr.bsq"), str(pair.lr_path), format="ENVI")
    files = [tmp_path / "lr.bsq", tmp_path / "lr.hdr"]
    before = [sha256(p) for p in files]
    for output in files:
        with pytest.raises(FusionInputError, match="would overwrite the input"):
            fuse_files(files[0], pair.hr_path, output, model=fusion_model)
    assert [sha256(p) for p in files] == before


def test_unwritable_output_location_is_a_clear_message(potsdam_wald_pair, run_fusion):
    pair = potsdam_wald_pair
    output = "/proc/csakd-no-such-folder/fused.tif"
    refused(run_fusion, "cannot write the output", output, LRHSI=str(pair.lr_path), HRMSI=str(pair.hr_path),
            OUTPUT=output)
    assert not os.path.exists("/proc/csakd-no-such-folder")


def test_not_enough_disk_space_is_refused_before_starting(potsdam_wald_pair, run_fusion, tmp_path, monkeypatch):
    pair = potsdam_wald_pair
    free = shutil.disk_usage(tmp_path)
    # The folder's file system reports 1 MB free; the 224-band output alone needs 5.4 MB.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free._replace(free=1_000_000))
    out = tmp_path / "out"
    refused(run_fusion, "not enough disk space", "5.4 MB", "1.0 MB free", LRHSI=str(pair.lr_path),
            HRMSI=str(pair.hr_path), OUTPUT=str(out / "fused.tif"))
    assert not out.exists()


def test_output_size_is_logged(reference, potsdam_wald_pair, run_fusion, make_feedback, tmp_path):
    _, log = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", LRHSI=str(potsdam_wald_pair.lr_path),
                  HRMSI=str(potsdam_wald_pair.hr_path))
    assert any("output size up to 5.4 MB" in m and "free in" in m for m in log), log


@pytest.mark.parametrize("limit,fragment", [(200_000, "scratch file"), (2_000_000, "the output")])
def test_a_failed_write_is_a_clear_message_and_leaves_nothing(limit, fragment, potsdam_wald_pair, run_fusion,
                                                              tmp_path):
    """A real write failure: the process may write files of ``limit`` bytes at most (EFBIG
    beyond), smaller than the 0.6 MB scratch file or than the 5 MB output."""
    pair = potsdam_wald_pair
    out = tmp_path / "out"
    out.mkdir()
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
    try:
        with pytest.raises(QgsProcessingException) as caught:
            run_fusion(LRHSI=str(pair.lr_path), HRMSI=str(pair.hr_path), OUTPUT=str(out / "fused.tif"),
                       CREATION_OPTIONS="COMPRESS=NONE")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)
    message = str(caught.value)
    print(f"QgsProcessingException: {message}")
    assert "cannot" in message and fragment in message and "fused.tif" in message, message
    assert sorted(p.name for p in out.iterdir()) == []


# --- what a first-time user met -------------------------------------------------------------


def test_a_tiny_overlap_is_refused(potsdam_wald_pair, run_fusion, tmp_path):
    pair = potsdam_wald_pair
    with rasterio.open(pair.lr_path) as src:
        t, width, height = src.transform, src.width, src.height
    # Moved so that only 2 × 2 hyperspectral pixels cover the MSI.
    moved = rewrite(pair.lr_path, tmp_path / "lr_corner.tif",
                    transform=Affine.translation(t.a * (width - 2), t.e * (height - 2)) * t)
    refused(run_fusion, "at least 4×4 hyperspectral pixels", LRHSI=str(moved), HRMSI=str(pair.hr_path),
            OUTPUT=str(tmp_path / "fused.tif"))
    assert not (tmp_path / "fused.tif").exists()


def test_a_small_overlap_fuses_with_a_warning(potsdam_wald_pair, run_fusion, make_feedback, tmp_path):
    pair = potsdam_wald_pair
    with rasterio.open(pair.lr_path) as src:
        t, width, height = src.transform, src.width, src.height
    moved = rewrite(pair.lr_path, tmp_path / "lr_corner.tif",
                    transform=Affine.translation(t.a * (width - 6), t.e * (height - 6)) * t)
    fused, log = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", LRHSI=str(moved), HRMSI=str(pair.hr_path))
    assert fused["data"].shape[1:] == (18, 18)
    assert any("only 6×6 hyperspectral pixels" in m for m in log), log


@pytest.mark.parametrize("bands", [1, 2, 20])
def test_msi_band_counts_outside_the_trained_range_fuse_with_a_warning(bands, potsdam_wald_pair, run_fusion,
                                                                        make_feedback, tmp_path):
    pair = potsdam_wald_pair
    good = ~pair.bad_bands
    weights = np.random.default_rng(bands).random((bands, int(good.sum())))
    msi = np.tensordot(weights / weights.sum(1, keepdims=True), pair.reference[good], 1).astype(np.float32)
    hr = rewrite(pair.hr_path, tmp_path / f"msi_{bands}.tif", msi, tags=False, descriptions=[""] * bands)
    fused, log = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", LRHSI=str(pair.lr_path), HRMSI=str(hr))
    assert np.isfinite(fused["data"][good]).mean() > 0.9
    assert any(f"has {bands} band(s)" in m and "trained on 3 to 13" in m for m in log), log


def test_destination_is_geotiff_only_and_tif_is_appended(potsdam_wald_pair, run_fusion, csakd_provider, tmp_path):
    from qgis.core import QgsApplication

    algorithm = QgsApplication.processingRegistry().algorithmById("csakd:hyperspectralfusion")
    destination = algorithm.parameterDefinition("OUTPUT")
    assert destination.supportedOutputRasterLayerExtensions() == ["tif"]
    assert "*.tif" in destination.createFileFilter() and "*.img" not in destination.createFileFilter()
    # Twice, each run with its own context that loads the result (as the QGIS window does): the
    # first context, once gone, must not take the second run's rendering with it.
    for name in ("fused", "second"):
        context = QgsProcessingContext()
        context.setProject(QgsProject.instance())
        context.addLayerToLoadOnCompletion(str(tmp_path / name),
                                           QgsProcessingContext.LayerDetails(name, QgsProject.instance(), "OUTPUT"))
        results, _ = run_fusion(context=context, LRHSI=str(potsdam_wald_pair.lr_path),
                                HRMSI=str(potsdam_wald_pair.hr_path), OUTPUT=str(tmp_path / name))
        assert results["OUTPUT"] == str(tmp_path / f"{name}.tif")
        assert context.willLoadLayerOnCompletion(str(tmp_path / f"{name}.tif"))
        assert not context.willLoadLayerOnCompletion(str(tmp_path / name))
        assert context.layerToLoadOnCompletionDetails(str(tmp_path / f"{name}.tif")).postProcessor() is not None
        del context
    with rasterio.open(tmp_path / "fused.tif") as ds:
        assert ds.driver == "GTiff"
    refused(run_fusion, "must be a GeoTIFF", LRHSI=str(potsdam_wald_pair.lr_path),
            HRMSI=str(potsdam_wald_pair.hr_path), OUTPUT=str(tmp_path / "fused.img"))
    assert not (tmp_path / "fused.img").exists()


def test_bands_given_as_text_as_qgis_process_passes_them(potsdam_wald_pair, run_fusion, make_feedback, tmp_path):
    pair = potsdam_wald_pair
    fused, _ = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", LRHSI=str(pair.lr_path),
                    HRMSI=str(pair.hr_path), BANDS="44,28,11,130,60")
    with rasterio.open(pair.lr_path) as src:
        expected = [src.tags(b)["wavelength"] for b in (44, 28, 11, 130, 60)]
    assert fused["count"] == 5
    np.testing.assert_allclose([float(t["wavelength"]) for t in fused["tags"]], [float(w) for w in expected], atol=1e-3)


def test_too_few_chosen_bands_say_so_not_swapped_inputs(potsdam_wald_pair, run_fusion, tmp_path):
    pair = potsdam_wald_pair
    message = refused(run_fusion, "4 hyperspectral band(s) chosen", "choose more than 4", LRHSI=str(pair.lr_path),
                      HRMSI=str(pair.hr_path), BANDS=[44, 28, 11, 60], OUTPUT=str(tmp_path / "fused.tif"))
    assert "swapped" not in message


def test_weights_file_as_model_points_to_the_card(potsdam_wald_pair, run_fusion, fusion_model, tmp_path):
    pair = potsdam_wald_pair
    weights = fusion_model.with_suffix(".pt")
    assert weights.is_file()
    refused(run_fusion, "choose the .json model card", fusion_model.name, LRHSI=str(pair.lr_path),
            HRMSI=str(pair.hr_path), MODEL=str(weights), OUTPUT=str(tmp_path / "fused.tif"))


def test_misregistration_messages_do_not_contradict_themselves():
    rejected = DegradationEstimate(wald(3), (-1.0, -0.75), 0.93, False).describe()
    assert "no misregistration compensated" in rejected and "best offset tried (-1.00 rows, -0.75 columns" in rejected
    assert "taken as aligned" in rejected
    none = DegradationEstimate(wald(3), (0.0, 0.0), 1.0, False).describe()
    assert "no misregistration found" in none and "best offset" not in none
    accepted = DegradationEstimate(wald(3, (1.0, 1.0)), (1.0, 1.0), 0.3, True).describe()
    assert "offset by +1.00 rows and +1.00 columns" in accepted


def test_misregistration_is_measured_on_the_valid_part_of_an_msi_with_a_nodata_collar(
        wald_pair_factory, run_fusion, make_feedback, tmp_path):
    pair = wald_pair_factory("enmap_potsdam_blockA_96x64.tif", lr_holes=(), shift=(1.0, 1.0))
    with rasterio.open(pair.hr_path) as src:
        msi = src.read()
    collar = np.zeros(msi.shape[1:], bool)
    collar[:4], collar[-4:], collar[:, :4], collar[:, -4:] = True, True, True, True  # ~20 % of the pixels
    msi[:, collar] = -9999.0
    hr = rewrite(pair.hr_path, tmp_path / "msi_collar.tif", msi, nodata=-9999.0)
    _, log = fuse(run_fusion, make_feedback, tmp_path / "fused.tif", LRHSI=str(pair.lr_path), HRMSI=str(hr))
    lines = [m for m in log if "misregistration" in m or "offset by" in m]
    print("\n".join(lines))
    assert any("measured on the" in m and "where both images have data" in m for m in lines), lines
    assert any("+1.00 rows and +1.00 columns" in m for m in lines), lines


def test_misregistration_gap_message_names_the_image_and_the_remedy():
    from csakd_qgis.pipeline import valid_part

    lr = np.ones((3, 20, 20), np.float32)
    hr = np.ones((2, 60, 60), np.float32)
    hr[:, ::7, :] = np.nan  # every 7th MSI row missing: no 12 × 12 block has data in both
    messages = []
    assert valid_part(lr, hr, 3, messages.append) == (None, None)
    assert "the multispectral image has no data" in messages[0] and "hyperspectral image has" not in messages[0]
    assert "co-register them first" in messages[0]



def test_largest_valid_window_is_the_largest_all_valid_rectangle():
    from csakd_qgis.registration import largest_valid_window

    rng = np.random.default_rng(0)
    for _ in range(100):
        mask = rng.random((7, 9)) < 0.8
        row, col, rows, cols = largest_valid_window(mask)
        assert mask[row : row + rows, col : col + cols].all()
        largest = max(
            (r1 - r0) * (c1 - c0)
            for r0 in range(7) for r1 in range(r0 + 1, 8) for c0 in range(9) for c1 in range(c0 + 1, 10)
            if mask[r0:r1, c0:c1].all()
        ) if mask.any() else 0
        assert rows * cols == largest
