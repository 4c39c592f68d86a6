"""csakd:hyperspectralfusion by the routes other than one processing.run call: inside a graphical
model saved to and loaded from a .model3 file, batch-style over several inputs, and from the
command line with qgis_process after ``make install``."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import rasterio

from tests.helpers import clean_env, run_command

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PLUGIN_NAME = "csakd_fusion"
QGIS_PROCESS = "/usr/bin/qgis_process.bin"
UTM33N = "EPSG:32633"


def read_raster(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.profile, [ds.tags(i) for i in range(1, ds.count + 1)], ds.bounds


def _fill_defaults(child):
    """What the modeler dialog does: every parameter not set explicitly gets its default."""
    from qgis.core import QgsApplication, QgsProcessingModelChildParameterSource

    algorithm = QgsApplication.processingRegistry().algorithmById(child.algorithmId())
    assert algorithm is not None, child.algorithmId()
    for parameter in algorithm.parameterDefinitions():
        if parameter.isDestination() or parameter.name() in child.parameterSources():
            continue
        child.addParameterSources(
            parameter.name(), [QgsProcessingModelChildParameterSource.fromStaticValue(parameter.defaultValue())]
        )


def build_clip_and_fuse_model(extent_text, fusion_model):
    """Two children: GDAL's clip by extent on the HR-MSI, then fusion with the clipped MSI."""
    from qgis.core import (
        QgsProcessingModelAlgorithm,
        QgsProcessingModelChildAlgorithm,
        QgsProcessingModelChildParameterSource,
        QgsProcessingModelOutput,
        QgsProcessingModelParameter,
        QgsProcessingParameterRasterLayer,
    )

    model = QgsProcessingModelAlgorithm("Clip and fuse", "CSAKD tests")
    for name, description in (("lrhsi", "Hyperspectral image"), ("hrmsi", "Multispectral image")):
        model.addModelParameter(QgsProcessingParameterRasterLayer(name, description), QgsProcessingModelParameter(name))

    clip = QgsProcessingModelChildAlgorithm("gdal:cliprasterbyextent")
    clip.setChildId("clip_msi")
    clip.setDescription("Clip the multispectral image")
    clip.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromModelParameter("hrmsi")])
    clip.addParameterSources("PROJWIN", [QgsProcessingModelChildParameterSource.fromStaticValue(extent_text)])
    clip.addParameterSources("DATA_TYPE", [QgsProcessingModelChildParameterSource.fromStaticValue(0)])
    _fill_defaults(clip)
    model.addChildAlgorithm(clip)

    fuse = QgsProcessingModelChildAlgorithm("csakd:hyperspectralfusion")
    fuse.setChildId("fuse")
    fuse.setDescription("Hyperspectral Fusion")
    fuse.addParameterSources("LRHSI", [QgsProcessingModelChildParameterSource.fromModelParameter("lrhsi")])
    fuse.addParameterSources("HRMSI", [QgsProcessingModelChildParameterSource.fromChildOutput("clip_msi", "OUTPUT")])
    fuse.addParameterSources("MODEL", [QgsProcessingModelChildParameterSource.fromStaticValue(str(fusion_model))])
    fuse.addParameterSources("TILE_SIZE", [QgsProcessingModelChildParameterSource.fromStaticValue(128)])
    output = QgsProcessingModelOutput("fused", "Fused image")
    output.setChildId("fuse")
    output.setChildOutputName("OUTPUT")
    fuse.setModelOutputs({"fused": output})
    _fill_defaults(fuse)
    model.addChildAlgorithm(fuse)
    model.updateDestinationParameters()
    return model


def test_graphical_model_saved_loaded_and_run(potsdam_wald_pair, csakd_provider, fusion_model, tmp_path, make_feedback):
    import processing
    from qgis.core import QgsProcessingModelAlgorithm

    pair = potsdam_wald_pair
    with rasterio.open(pair.hr_path) as hr:
        left, top = hr.bounds.left, hr.bounds.top
    # 60×45 MSI pixels (1800 m × 1350 m) from the MSI's 4th column and 3rd row, on its grid.
    xmin, xmax = left + 3 * 30, left + 63 * 30
    ymax, ymin = top - 2 * 30, top - 47 * 30
    model = build_clip_and_fuse_model(f"{xmin},{xmax},{ymin},{ymax} [{UTM33N}]", fusion_model)
    ok, problems = model.validate()
    assert ok, problems

    path = tmp_path / "clip_and_fuse.model3"
    assert model.toFile(str(path))
    loaded = QgsProcessingModelAlgorithm()
    assert loaded.fromFile(str(path))
    assert sorted(loaded.childAlgorithms()) == ["clip_msi", "fuse"]
    assert loaded.childAlgorithm("fuse").algorithmId() == "csakd:hyperspectralfusion"
    destinations = [p.name() for p in loaded.destinationParameterDefinitions()]
    assert len(destinations) == 1, destinations

    output = tmp_path / "model_output.tif"
    results = processing.run(
        loaded, {"lrhsi": str(pair.lr_path), "hrmsi": str(pair.hr_path), destinations[0]: str(output)},
        feedback=make_feedback(),
    )
    assert results[destinations[0]] == str(output)
    data, profile, tags, bounds = read_raster(output)
    assert profile["count"] == 224
    assert (profile["width"], profile["height"]) == (60, 45)
    assert profile["crs"].to_string() == UTM33N
    assert np.allclose(tuple(bounds), (xmin, ymin, xmax, ymax), atol=1e-6)
    good = ~pair.bad_bands
    assert [t["bbl"] for t in tags] == ["0" if b else "1" for b in pair.bad_bands]
    assert np.isfinite(data[good]).all()


def test_batch_style_runs_write_separate_outputs(potsdam_wald_pair, wald_pair_factory, run_fusion, tmp_path):
    """Batch mode runs the algorithm once per row with its own parameters and output."""
    second = wald_pair_factory("enmap_potsdam_blockC_64x128.tif", lr_holes=())
    rows = [
        (potsdam_wald_pair, tmp_path / "batch_A.tif"),
        (second, tmp_path / "batch_C.tif"),
    ]
    for pair, output in rows:
        results, feedback = run_fusion(LRHSI=str(pair.lr_path), HRMSI=str(pair.hr_path), OUTPUT=str(output))
        assert results["OUTPUT"] == str(output)
    shapes = []
    for pair, output in rows:
        data, profile, tags, _ = read_raster(output)
        with rasterio.open(pair.hr_path) as hr:
            assert profile["transform"] == hr.transform and (profile["width"], profile["height"]) == (hr.width, hr.height)
        assert profile["count"] == 224
        good = ~pair.bad_bands
        assert np.isfinite(data[good]).all()
        shapes.append(data.shape)
    assert shapes == [(224, 63, 96), (224, 126, 63)]
    assert sorted(p.name for p in tmp_path.glob("batch_*")) == ["batch_A.tif", "batch_C.tif"]


def test_qgis_process_runs_the_installed_plugin(potsdam_wald_pair, fusion_model, tmp_path):
    """`make install` into a throw-away profile, then the command line; QGIS's own Python has no
    torch here, so this also proves that python_path.txt leads the plugin to the venv's torch."""
    profile = tmp_path / "qgis-config"
    env = clean_env(QGIS_CUSTOM_CONFIG_PATH=profile)
    run_command(["make", "--no-print-directory", f"VENV={sys.prefix}", "install", f"DIST_DIR={tmp_path / 'dist'}"], cwd=PROJECT_ROOT, env=env)
    installed = profile / "profiles" / "default" / "python" / "plugins" / PLUGIN_NAME
    recorded = (installed / "python_path.txt").read_text().split()
    assert recorded and all(os.path.isdir(p) for p in recorded)

    pair = potsdam_wald_pair
    output = tmp_path / "cli" / "fused.tif"
    result = run_command(
        [QGIS_PROCESS, "--json", "run", "csakd:hyperspectralfusion", "--",
         f"LRHSI={pair.lr_path}", f"HRMSI={pair.hr_path}", f"MODEL={fusion_model}", f"OUTPUT={output}"],
        env=env, cwd=tmp_path,
    )
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["results"]["OUTPUT"] == str(output)
    assert any("on cpu" in line for line in report["log"]["info"]), report["log"]
    data, profile_out, tags, _ = read_raster(output)
    with rasterio.open(pair.hr_path) as hr:
        assert profile_out["transform"] == hr.transform and profile_out["crs"] == hr.crs
    assert profile_out["count"] == 224
    good = ~pair.bad_bands
    assert np.isfinite(data[good]).all()
    assert [t["bbl"] for t in tags] == ["0" if b else "1" for b in pair.bad_bands]
