"""The command line and batches on a Dask cluster: `python -m csakd_qgis fuse|batch`.

Four small real pairs (Wald pairs from the EnMAP Potsdam blocks, one with its inputs swapped)
are fused on a LocalCluster of two single-threaded workers; every output is compared with
what `fuse_files` writes alone.
"""

import csv
import inspect
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from tests.helpers import clean_env

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BLOCKS = {
    "a": ("enmap_potsdam_blockA_96x64.tif", {}),
    "b": ("enmap_potsdam_blockB_128x64.tif", {}),
    # Block C is 64 pixels wide: its LR-HSI (scale 3) has 21 columns, holes inside them.
    "c": ("enmap_potsdam_blockC_64x128.tif", {"lr_holes": ((2, 3), (30, 17))}),
}


@pytest.fixture(scope="module")
def pairs(wald_pair_factory):
    """name → WaldPair for three good scenes."""
    return {name: wald_pair_factory(block, **options) for name, (block, options) in BLOCKS.items()}


@pytest.fixture(scope="module")
def references(pairs, fusion_model, tmp_path_factory):
    """name → output of fuse_files run alone, in a process of one thread as a batch worker is:
    Dask's nanny starts each worker with OMP_NUM_THREADS, MKL_NUM_THREADS and
    OPENBLAS_NUM_THREADS at 1. Limiting torch alone is not enough: with OpenBLAS on two threads
    numpy's linear algebra rounds differently in the last bit."""
    import subprocess

    folder = tmp_path_factory.mktemp("alone")
    code = "import sys; from csakd_qgis.api import fuse_files; fuse_files(*sys.argv[1:4], model=sys.argv[4])"
    single = clean_env(OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1)
    for name, pair in pairs.items():
        done = subprocess.run([sys.executable, "-c", code, str(pair.lr_path), str(pair.hr_path), str(folder / f"{name}.tif"),
                               str(fusion_model)], cwd=PROJECT_ROOT, env=single, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    return {name: folder / f"{name}.tif" for name in pairs}


def _write_pairs(path, rows, extra_columns=()):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lrhsi", "hrmsi", "output", *extra_columns])
        writer.writerows(rows)
    return path


def _results(out_dir):
    with open(out_dir / "results.csv", newline="") as handle:
        return {Path(row["output"]).stem: row for row in csv.DictReader(handle)}


def assert_same_raster(path, reference):
    with rasterio.open(path) as out, rasterio.open(reference) as ref:
        assert (out.crs, out.transform, out.shape, out.count, out.dtypes) == (ref.crs, ref.transform, ref.shape,
                                                                              ref.count, ref.dtypes)
        assert out.descriptions == ref.descriptions
        assert [out.tags(i) for i in range(1, out.count + 1)] == [ref.tags(i) for i in range(1, ref.count + 1)]
        assert np.array_equal(out.read(), ref.read(), equal_nan=True)


def _recipe(path):
    with rasterio.open(path) as dataset:
        return dataset.tags().get("CSAKD_RECIPE")


def _run_cli(*args, cwd=PROJECT_ROOT):
    import subprocess

    return subprocess.run([sys.executable, "-m", "csakd_qgis", *map(str, args)], cwd=cwd, env=clean_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)


def test_batch_on_two_workers_then_resumes(pairs, references, fusion_model, tmp_path):
    """3 good scenes + 1 with swapped inputs: 3 outputs identical to fuse_files alone, 1 clear
    failure in results.csv, exit status 1; run again: the 3 are skipped, untouched."""
    a = pairs["a"]
    pairs_csv = _write_pairs(tmp_path / "pairs.csv", [
        *[(p.lr_path, p.hr_path, f"{name}.tif") for name, p in pairs.items()],
        (a.hr_path, a.lr_path, "swapped.tif"),
    ])
    out_dir = tmp_path / "fused"
    first = _run_cli("batch", pairs_csv, "--out-dir", out_dir, "--workers", 2, "--model", fusion_model)
    assert first.returncode == 1, first.stderr
    assert "4 scene(s) on 2 worker(s)" in first.stderr
    results = _results(out_dir)
    assert sorted(results) == ["a", "b", "c", "swapped"]
    for name, reference in references.items():
        row = results[name]
        assert row["status"] == "done", row
        assert row["message"].startswith("fused ") and row["message"].endswith(str(out_dir / f"{name}.tif"))
        assert float(row["seconds"]) > 0 and row["worker"].startswith("tcp://")
        assert int(row["output_bytes"]) == (out_dir / f"{name}.tif").stat().st_size
        assert_same_raster(out_dir / f"{name}.tif", reference)
        assert _recipe(out_dir / f"{name}.tif")
    swapped = results["swapped"]
    assert swapped["status"] == "failed" and swapped["output_bytes"] == ""
    assert "give the high-resolution image as HRMSI" in swapped["message"]
    assert "give the high-resolution image as HRMSI" in first.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.tif", "b.tif", "c.tif", "results.csv"]
    made = {name: (out_dir / f"{name}.tif").stat().st_mtime_ns for name in references}

    again = _run_cli("batch", pairs_csv, "--out-dir", out_dir, "--workers", 2, "--model", fusion_model)
    assert again.returncode == 1, again.stderr
    results = _results(out_dir)
    assert {name: results[name]["status"] for name in results} == {
        "a": "skipped", "b": "skipped", "c": "skipped", "swapped": "failed"}
    assert made == {name: (out_dir / f"{name}.tif").stat().st_mtime_ns for name in references}
    assert "3 skipped, 1 failed" in again.stderr


def test_changed_option_or_input_redoes_only_that_scene(pairs, fusion_model, tmp_path, one_torch_thread):
    """The recipe (inputs, model, options) decides: a scene whose tile size changed is fused
    again, one whose LR-HSI was rewritten too, the third is skipped. No cluster: fuse_scene
    is what a worker runs."""
    import shutil

    from csakd_qgis.batch import fuse_scene, read_pairs

    names = ["a", "b", "c"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in names:  # copies, so that one can be rewritten
        shutil.copy(pairs[name].lr_path, inputs / f"{name}_lr.tif")
    rows = [(f"inputs/{name}_lr.tif", pairs[name].hr_path, "", "") for name in names]
    out_dir = tmp_path / "fused"
    first = [fuse_scene(s) for s in read_pairs(_write_pairs(tmp_path / "p.csv", rows, ["tile_size"]), out_dir,
                                               {"model": str(fusion_model)})]
    assert [r["status"] for r in first] == ["done"] * 3
    assert [Path(r["output"]).name for r in first] == [f"{name}_lr_fused.tif" for name in names]

    rows[0] = rows[0][:3] + ("64",)
    os.utime(inputs / "b_lr.tif", ns=(time.time_ns(), time.time_ns() + 5 * 10**9))
    scenes = read_pairs(_write_pairs(tmp_path / "p.csv", rows, ["tile_size"]), out_dir, {"model": str(fusion_model)})
    assert scenes[0].options["tile_size"] == 64
    assert [fuse_scene(s)["status"] for s in scenes] == ["done", "done", "skipped"]


def test_a_worker_killed_during_a_scene(pairs, references, fusion_model, tmp_path):
    """A worker process is killed while it fuses a scene: the scene is retried on a worker
    that lives, every scene is done, no partial file is left; each worker loaded the model once."""
    from distributed import Client, LocalCluster

    from csakd_qgis.batch import run_batch
    from csakd_qgis.provenance import partial_folder

    # Scene c with small tiles takes seconds instead of a fraction of one: time to kill it.
    pairs_csv = _write_pairs(tmp_path / "pairs.csv", [
        (pairs["a"].lr_path, pairs["a"].hr_path, "a.tif", ""),
        (pairs["c"].lr_path, pairs["c"].hr_path, "c.tif", "24"),
        (pairs["b"].lr_path, pairs["b"].hr_path, "b.tif", ""),
    ], ["tile_size"])
    out_dir = tmp_path / "fused"
    killed = {}

    def kill_the_worker_fusing_c(client, pids):
        deadline = time.time() + 300
        while not partial_folder(out_dir / "c.tif").exists():
            if time.time() > deadline:
                return
            time.sleep(0.02)
        for address, keys in client.processing().items():
            if any(str(key).startswith("fuse-c-") for key in keys):
                os.kill(pids[address], signal.SIGKILL)
                killed.update(address=address, output_there=(out_dir / "c.tif").exists())
                return

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)
        killer = threading.Thread(target=kill_the_worker_fusing_c, args=(client, pids), daemon=True)
        killer.start()
        results = run_batch(pairs_csv, out_dir, {"model": str(fusion_model)}, client=client, progress_bar=False)
        killer.join(timeout=10)
        loads = client.run(lambda: sys.modules["csakd_qgis.api"]._cached_bundle.cache_info().misses
                           if "csakd_qgis.api" in sys.modules else 0)

    assert killed.get("address"), "the worker fusing scene c was not found while it fused"
    assert killed["output_there"] is False, "the kill came after scene c was finished"
    assert {Path(r["output"]).stem: r["status"] for r in results} == {"a": "done", "b": "done", "c": "done"}
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.tif", "b.tif", "c.tif", "results.csv"]
    assert_same_raster(out_dir / "a.tif", references["a"])
    assert_same_raster(out_dir / "b.tif", references["b"])
    with rasterio.open(out_dir / "c.tif") as fused:
        assert fused.shape == rasterio.open(references["c"]).shape
        assert np.isfinite(fused.read(50)).mean() > 0.9
    assert _recipe(out_dir / "c.tif")
    assert set(loads.values()) <= {0, 1} and sum(loads.values()) >= 1, loads


def test_fuse_command_writes_what_fuse_files_writes(pairs, references, fusion_model, tmp_path):
    output = tmp_path / "out" / "a.tif"
    done = _run_cli("fuse", pairs["a"].lr_path, pairs["a"].hr_path, output, "--model", fusion_model)
    assert done.returncode == 0, done.stderr
    assert_same_raster(output, references["a"])
    # The algorithm's log lines, naming the output (not where it was made).
    assert "model csakd_student" in done.stderr and f"→ {output}" in done.stderr
    assert "done in" in done.stderr
    assert sorted(p.name for p in output.parent.iterdir()) == ["a.tif"]


def test_fuse_command_bad_input_fails_clearly(pairs, fusion_model, tmp_path):
    output = tmp_path / "swapped.tif"
    failed = _run_cli("fuse", pairs["a"].hr_path, pairs["a"].lr_path, output, "--model", fusion_model, "--quiet")
    assert failed.returncode == 1
    assert failed.stderr.startswith("error: the multispectral image is not sharper than the hyperspectral one")
    assert list(tmp_path.iterdir()) == []

    wrong = _run_cli("fuse", pairs["a"].lr_path, pairs["a"].hr_path, output, "--bands", "1-x")
    assert wrong.returncode == 2 and "--bands: '1-x' is not a band number or range" in wrong.stderr


def test_psf_option_follows_the_engine(pairs, fusion_model, tmp_path):
    """--psf reaches fuse_files where the engine has the option, and is refused clearly where not."""
    from csakd_qgis.api import fuse_files

    output = tmp_path / "a.tif"
    run = _run_cli("fuse", pairs["a"].lr_path, pairs["a"].hr_path, output, "--model", fusion_model,
                   "--psf", "auto", "--quiet")
    if "psf" in inspect.signature(fuse_files).parameters:
        assert run.returncode == 0, run.stderr
        assert '"psf": "auto"' in _recipe(output)
    else:
        assert run.returncode == 2
        assert "--psf: this version of the engine has no 'psf' option" in run.stderr
        assert not output.exists()


def test_pairs_file_errors_name_file_and_line(tmp_path):
    from csakd_qgis.batch import BatchError, read_pairs

    bad_header = _write_pairs(tmp_path / "header.csv", [("x.tif", "y.tif", "")], ["colour"])
    with pytest.raises(BatchError, match="unknown column.*colour"):
        read_pairs(bad_header, tmp_path)
    same_output = _write_pairs(tmp_path / "same.csv", [("x.tif", "y.tif", "o.tif"), ("z.tif", "y.tif", "o.tif")])
    with pytest.raises(BatchError, match="lines 2 and 3 write the same output"):
        read_pairs(same_output, tmp_path)
    bad_value = _write_pairs(tmp_path / "value.csv", [("x.tif", "y.tif", "", "big")], ["tile_size"])
    with pytest.raises(BatchError, match=r"value.csv line 2: --tile-size: invalid literal"):
        read_pairs(bad_value, tmp_path)


def test_plugin_never_imports_dask(tmp_path):
    """dask.distributed belongs to the batch command: loading the plugin, its algorithms, the
    engine and the fuse command imports none of it."""
    code = textwrap.dedent(
        f"""
        import importlib, importlib.util, sys
        root = {str(PROJECT_ROOT)!r}
        spec = importlib.util.spec_from_file_location("csakd_fusion", root + "/__init__.py",
                                                      submodule_search_locations=[root])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        module.classFactory(None)
        importlib.import_module("csakd_fusion.processing_provider.algorithms").available_algorithms()
        for name in ("api", "cli", "provenance"):
            importlib.import_module("csakd_fusion.csakd_qgis." + name)
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & {{"dask", "distributed"}})
        assert not loaded, loaded
        print("ok")
        """
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
