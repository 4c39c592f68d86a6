"""The fused layer as users get it: added to the project with a true-colour rendering, and
integer inputs with a scale/offset read in their physical units."""

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp


@pytest.fixture
def result_loading_without_a_layer_tree_view(monkeypatch):
    """Result loading as headless QGIS does it. From QGIS 3.44 on, Processing hands the layer tree
    view of ``iface`` to C++ (QgsProcessingGuiUtils.addResultLayers), which refuses the stand-in
    view of pytest-qgis's mock iface; without a view the layers go to the project's root."""
    import processing.gui.Postprocessing as postprocessing

    monkeypatch.setattr(postprocessing, "iface", None, raising=False)


def test_output_is_loaded_with_a_true_colour_rendering(
    potsdam_wald_pair, csakd_provider, fusion_model, tmp_path, qgis_new_project, result_loading_without_a_layer_tree_view
):
    """What the toolbox does: run, then load the result into the project with its post-processor."""
    import processing
    from qgis.core import QgsMultiBandColorRenderer, QgsProject

    output = tmp_path / "fused.tif"
    pair = potsdam_wald_pair
    processing.runAndLoadResults(
        "csakd:hyperspectralfusion",
        {"LRHSI": str(pair.lr_path), "HRMSI": str(pair.hr_path), "MODEL": str(fusion_model), "OUTPUT": str(output)},
    )
    layers = [l for l in QgsProject.instance().mapLayers().values() if l.source() == str(output)]
    assert len(layers) == 1, [l.source() for l in QgsProject.instance().mapLayers().values()]
    layer = layers[0]
    # Named after the file, so that several results can be told apart in the layer panel.
    assert layer.name() == "fused"
    # Bands read by wavelength in the layer panel and Identify ("Band 035: 640.0 nm"), not cut off.
    provider = layer.dataProvider()
    with rasterio.open(pair.lr_path) as lr:
        input_wavelengths = [float(lr.tags(i)["wavelength"]) for i in range(1, lr.count + 1)]
    for band in (1, 35, provider.bandCount()):
        expected = f"Band {band:03d}: {input_wavelengths[band - 1]:.1f} nm"
        if band == 1 and not _gdal_stores_undefined_on_band_1(tmp_path):
            # GDAL (3.6 to 3.13 at least) makes the first band of every GeoTIFF grey; QGIS shows it.
            expected += " (Gray)"
        assert provider.displayBandName(band) == expected
    with rasterio.open(output) as fused:
        assert set(fused.colorinterp[1:]) == {ColorInterp.undefined}


def _gdal_stores_undefined_on_band_1(folder):
    """Whether this GDAL keeps ColorInterp=Undefined on the first band of a GeoTIFF it writes."""
    probe = folder / "colorinterp_probe.tif"
    georeferenced = {"transform": rasterio.transform.from_origin(0.0, 1.0, 1.0, 1.0)}
    with rasterio.open(probe, "w", driver="GTiff", count=2, width=1, height=1, dtype="float32", **georeferenced) as dst:
        dst.colorinterp = [ColorInterp.undefined] * 2
    with rasterio.open(probe) as src:
        return src.colorinterp[0] == ColorInterp.undefined
    renderer = layer.renderer()
    assert isinstance(renderer, QgsMultiBandColorRenderer)
    with rasterio.open(output) as fused:
        wavelengths = np.array([float(fused.tags(i)["wavelength"]) for i in range(1, fused.count + 1)])
    chosen = [renderer.redBand(), renderer.greenBand(), renderer.blueBand()]
    for band, target in zip(chosen, (640.0, 550.0, 470.0)):
        assert abs(wavelengths[band - 1] - target) == pytest.approx(np.abs(wavelengths - target).min())
    for enhancement in (renderer.redContrastEnhancement(), renderer.greenContrastEnhancement(), renderer.blueContrastEnhancement()):
        assert enhancement is not None and enhancement.maximumValue() > enhancement.minimumValue()


def test_a_temporary_output_keeps_the_descriptive_layer_name(
    potsdam_wald_pair, csakd_provider, fusion_model, qgis_new_project, result_loading_without_a_layer_tree_view
):
    import processing
    from qgis.core import QgsProject

    pair = potsdam_wald_pair
    results = processing.runAndLoadResults(
        "csakd:hyperspectralfusion",
        {"LRHSI": str(pair.lr_path), "HRMSI": str(pair.hr_path), "MODEL": str(fusion_model), "OUTPUT": "TEMPORARY_OUTPUT"},
    )
    layers = [l for l in QgsProject.instance().mapLayers().values() if l.source() == results["OUTPUT"]]
    assert [l.name() for l in layers] == ["Fused hyperspectral image"]


def test_integer_input_with_scale_and_offset_is_fused_in_physical_units(potsdam_wald_pair, run_fusion, tmp_path):
    """An LR-HSI stored as int16 digital numbers with GDAL scale/offset (reflectance = DN·1e-4 − 0.01)
    and an MSI in reflectance: the output is reflectance, close to the float run's result / 10000."""
    pair = potsdam_wald_pair
    scaled = tmp_path / "lr_int16_scaled.tif"
    with rasterio.open(pair.lr_path) as src:
        data = src.read(masked=True).astype(np.float64)
        profile = src.profile
        tags = [src.tags(i) for i in range(1, src.count + 1)]
    reflectance = data / 10000.0
    digital = np.round((reflectance + 0.01) / 1e-4).filled(-32768).astype(np.int16)
    profile.update(dtype="int16", nodata=-32768)
    with rasterio.open(scaled, "w", **profile) as dst:
        dst.write(digital)
        dst.scales = [1e-4] * src.count
        dst.offsets = [-0.01] * src.count
        for index, band_tags in enumerate(tags, start=1):
            dst.update_tags(index, **band_tags)
    msi_reflectance = tmp_path / "msi_reflectance.tif"
    with rasterio.open(pair.hr_path) as src:
        msi_profile = src.profile
        msi = src.read().astype(np.float32) / 10000.0
    with rasterio.open(msi_reflectance, "w", **msi_profile) as dst:
        dst.write(msi)

    reference_out = tmp_path / "float.tif"
    scaled_out = tmp_path / "scaled.tif"
    run_fusion(LRHSI=str(pair.lr_path), HRMSI=str(pair.hr_path), OUTPUT=str(reference_out))
    run_fusion(LRHSI=str(scaled), HRMSI=str(msi_reflectance), OUTPUT=str(scaled_out))
    with rasterio.open(reference_out) as a, rasterio.open(scaled_out) as b:
        expected = a.read(masked=True).astype(np.float64) / 10000.0
        actual = b.read(masked=True).astype(np.float64)
    good = ~pair.bad_bands
    assert np.array_equal(expected.mask[good], actual.mask[good])
    difference = np.abs(actual[good] - expected[good])
    # Quantisation to 1e-4 reflectance is the only difference between the two inputs.
    assert float(difference.mean()) < 2e-4, float(difference.mean())
    assert float(np.ma.median(actual[good])) == pytest.approx(float(np.ma.median(expected[good])), rel=0.01)


def test_band_descriptions_give_the_wavelength_and_keep_the_inputs_own_names(potsdam_wald_pair, run_fusion, tmp_path):
    """Input bands named by their producer keep the name after the wavelength; names that only
    restate a band number or a wavelength (GDAL's ENVI "band 8 (0.460000 Micrometers)") do not."""
    from csakd_qgis.api import band_description

    pair = potsdam_wald_pair
    named = tmp_path / "named_lr.tif"
    with rasterio.open(pair.lr_path) as src:
        profile, data = src.profile, src.read()
        tags = [src.tags(i) for i in range(1, src.count + 1)]
    own = ["" if i % 2 else f"detector A/{i:03d}" for i in range(1, len(tags) + 1)]
    with rasterio.open(named, "w", **profile) as dst:
        dst.write(data)
        for index, (band_tags, name) in enumerate(zip(tags, own), start=1):
            dst.update_tags(index, **band_tags)
            dst.set_band_description(index, name)
    output = tmp_path / "fused_named.tif"
    run_fusion(LRHSI=str(named), HRMSI=str(pair.hr_path), OUTPUT=str(output))
    with rasterio.open(output) as fused:
        descriptions = fused.descriptions
    wavelengths = [float(t["wavelength"]) for t in tags]
    assert descriptions[1] == f"{wavelengths[1]:.1f} nm (detector A/002)"
    assert descriptions[0] == f"{wavelengths[0]:.1f} nm"
    assert all(d.startswith(f"{w:.1f} nm") for d, w in zip(descriptions, wavelengths))
    assert band_description(8, 460.0, "band 8 (0.460000 Micrometers)") == "460.0 nm"
    assert band_description(3, 404.6, "404.600 nm") == "404.6 nm"
    assert band_description(3, None, "") == "band 3"
