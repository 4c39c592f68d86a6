"""The fused layer as users get it: added to the project with a true-colour rendering, and
integer inputs with a scale/offset read in their physical units."""

import numpy as np
import pytest
import rasterio


def test_output_is_loaded_with_a_true_colour_rendering(potsdam_wald_pair, csakd_provider, fusion_model, tmp_path, qgis_new_project):
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
    assert layer.name() == "Fused hyperspectral image"
    renderer = layer.renderer()
    assert isinstance(renderer, QgsMultiBandColorRenderer)
    with rasterio.open(output) as fused:
        wavelengths = np.array([float(fused.tags(i)["wavelength"]) for i in range(1, fused.count + 1)])
    chosen = [renderer.redBand(), renderer.greenBand(), renderer.blueBand()]
    for band, target in zip(chosen, (640.0, 550.0, 470.0)):
        assert abs(wavelengths[band - 1] - target) == pytest.approx(np.abs(wavelengths - target).min())
    for enhancement in (renderer.redContrastEnhancement(), renderer.greenContrastEnhancement(), renderer.blueContrastEnhancement()):
        assert enhancement is not None and enhancement.maximumValue() > enhancement.minimumValue()


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
