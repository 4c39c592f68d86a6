"""The training set packed into one file for a long run elsewhere (training_set.py), and the
training loop's parts that let such a run use a GPU and many cores (train.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from csakd_qgis import datasets, train, training_set
from csakd_qgis.bundle import load_bundle
from tests.test_training import few_validation_cases

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_set(shared_data_dir):
    """The five training cubes (two with wavelengths from MATLAB files), one corpus cube without
    band centres, the validation cubes and every sensor."""
    full = training_set.load_training_set(shared_data_dir, corpus=False)
    hydice = next(c for c in datasets.corpus_cubes(shared_data_dir) if c.name == "hydice_urban_80x100")
    assert hydice.wavelengths_nm is None
    full.training.append(hydice)
    return full


@pytest.fixture(scope="module")
def pack(small_set, tmp_path_factory):
    path = tmp_path_factory.mktemp("pack") / "set.npz"
    manifest = training_set.write_pack(small_set, path, psnr_db=60.0)
    return path, manifest


def test_a_pack_gives_back_every_cube_and_sensor_within_its_psnr(small_set, pack):
    path, manifest = pack
    packed = training_set.read_pack(path)
    assert [c.name for c in packed.training] == [c.name for c in small_set.training]
    assert [c.name for c in packed.validation] == [c.name for c in small_set.validation]
    for before, after in zip(small_set.training + small_set.validation, packed.training + packed.validation):
        assert after.data.shape == before.data.shape and after.data.dtype == np.float32
        assert after.weight == before.weight
        if before.wavelengths_nm is None:
            assert after.wavelengths_nm is None
        else:
            np.testing.assert_array_equal(after.wavelengths_nm, before.wavelengths_nm)
        # Rounding to a step Δ errs by at most Δ/2, i.e. 20·log10(√12/2) = 4.8 dB below the
        # target; uniform rounding error averages Δ/√12, the target itself.
        band = training_set.band_psnr(before.data, after.data)
        assert band.min() >= 60.0 - 4.8, (before.name, band.min())
        assert abs(np.median(band) - 60.0) < 1.5, (before.name, np.median(band))
    recorded = {c["name"]: c["worst_band_psnr_db"] for c in manifest["cubes"]}
    assert recorded["HyMap02 Berlin"] == pytest.approx(
        training_set.band_psnr(small_set.validation[1].data, packed.validation[1].data).min(), abs=0.01)
    assert [s.name for s in packed.sensors] == [s.name for s in small_set.sensors]
    assert list(packed.validation_sensors) == list(small_set.validation_sensors)
    for before, after in zip(small_set.sensors + list(small_set.validation_sensors.values()),
                             packed.sensors + list(packed.validation_sensors.values())):
        assert after.band_names == before.band_names
        np.testing.assert_array_equal(after.responses, before.responses)
        np.testing.assert_array_equal(after.wavelengths_nm, before.wavelengths_nm)
    # Smaller than the cubes as float16, the smallest lossless-looking alternative.
    raw16 = sum(c.data.size * 2 for c in small_set.training + small_set.validation)
    assert path.stat().st_size < 0.5 * raw16
    assert "pack set.npz (60 dB" in packed.source


def test_a_pack_is_read_and_trained_from_without_gdal_rasterio_or_scipy(pack, tmp_path):
    """The machine a long run goes to has NumPy and torch, not GDAL: reading the pack, making
    the validation cases and drawing a training batch must not import them."""
    path, _ = pack
    script = f"""
import sys
for name in ("rasterio", "osgeo", "scipy"):
    sys.modules[name] = None
import numpy as np
from csakd_qgis import datasets, training_set
data = training_set.read_pack({str(path)!r})
cases = datasets.validation_cases(scales=(8,), cubes_=data.validation, sensors=data.validation_sensors)
batch = datasets.training_batch(data.training, data.sensors, np.random.default_rng(3), 2, 32)
print(len(cases), len(batch))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["9", "2"]


def test_bad_packs_and_cubes_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m csakd_qgis.training_set"):
        training_set.read_pack(tmp_path / "missing.npz")
    np.savez_compressed(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a training-set pack"):
        training_set.read_pack(tmp_path / "other.npz")
    np.savez_compressed(tmp_path / "old.npz", manifest=np.array(json.dumps({"format": "csakd-training-set", "version": 0})))
    with pytest.raises(ValueError, match="version 0; this code reads .* version 1: write it again"):
        training_set.read_pack(tmp_path / "old.npz")
    cube = np.ones((3, 4, 4))
    cube[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        training_set.quantise(cube, 60.0)
    with pytest.raises(ValueError, match="between 20 and 90 dB"):
        training_set.quantise(np.ones((3, 4, 4)), 120.0)


def test_a_failed_pack_write_leaves_nothing_behind(small_set, tmp_path, monkeypatch):
    target = tmp_path / "set.npz"
    target.write_bytes(b"an older pack")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", broken)
    with pytest.raises(OSError, match="disk full"):
        training_set.write_pack(small_set, target)
    assert target.read_bytes() == b"an older pack"
    assert [p.name for p in tmp_path.iterdir()] == ["set.npz"]


def test_step_batches_are_the_same_from_workers_and_after_a_resume(small_set):
    """Step n's batch depends on (seed, n) alone: worker processes and a resumed run draw what
    the run in one process draws."""
    whole = datasets.WholeSceneStatistics(16)
    sensors = small_set.sensors

    def sample(rng):
        return datasets.training_batch(small_set.training, sensors, rng, 2, 32, statistics=whole)

    def steps(workers, first, count):
        run = train.TrainingRun(sample_batch=sample, validation=[], teacher=train.student_config(),
                                student=train.student_config(), minutes=1, checkpoint=None, workers=workers)
        stream = train.batch_stream(run, first)
        out = [next(stream) for _ in range(count)]
        stream.close()
        return out

    def assert_same(ours, theirs):
        for a, b in zip(ours[:2] + ours[3:], theirs[:2] + theirs[3:]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert ours[2].keys() == theirs[2].keys()
        for key, value in ours[2].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, theirs[2][key], rtol=0, atol=0)
            else:
                assert value == theirs[2][key], key

    in_process = steps(0, 3, 3)
    for ours, theirs in zip(in_process, steps(2, 3, 3)):
        assert_same(ours, theirs)
    for ours, theirs in zip(in_process[1:], steps(0, 4, 2)):  # resumed at step 4
        assert_same(ours, theirs)
    # Different steps draw different crops.
    assert not torch.equal(in_process[0][3][..., :16, :16], in_process[1][3][..., :16, :16])


def test_make_train_runs_from_a_pack_with_worker_processes(pack, tmp_path, monkeypatch, capsys):
    path, _ = pack
    monkeypatch.setattr(train, "validation_cases", few_validation_cases)
    args = ["--pack", str(path), "--workers", "2", "--minutes", "0.15", "--fresh", "--steps-per-epoch", "2",
            "--batch-size", "2", "--crop", "32", "--output", str(tmp_path), "--checkpoint", str(tmp_path / "ck.pt"),
            "--threads", "1", "--log-every", "1", "--no-control"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert f"from the pack {path}" in out
    assert "step      1" in out
    _, card = load_bundle(tmp_path / "csakd_student.json")
    assert card["training"]["data"].startswith("the pack set.npz (60 dB")
    assert card["training"]["device"] == "cpu"
    assert card["training"]["command"].startswith("python -m csakd_qgis.train --pack ")
    assert "training_set.npz" not in card["training"]["sensors"] and "the pack set.npz" in card["training"]["sensors"]
    assert len(card["training"]["cubes"]) == 6
    # The shipping decision is said, and the card records what the best trained epoch reached.
    reached = card["training"]["best_trained"]
    history = card["history"]
    assert reached["epoch"] >= 1 and reached["gain_db"] == pytest.approx(
        max(h["student"]["psnr"] for h in history[1:]) - history[0]["student"]["psnr"], abs=1e-4)
    shipped = card["training"]["best_epoch"]
    if shipped == 0:
        assert (f"no trained epoch beat it by {train.MIN_GAIN_DB} dB (best: epoch {reached['epoch']}" in out
                and f"the last trained weights are in the checkpoint {tmp_path / 'ck.pt'}" in out)
    else:
        assert f"the student bundle holds epoch {shipped}" in out


def test_make_train_refuses_a_gpu_torch_cannot_see_and_negative_workers(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        train.main(["--device", "cuda"])
    assert "--device cuda: device 'cuda' was asked for but torch sees no CUDA GPU here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--workers", "-1"])
    assert "--workers must be 0 or more, got -1" in capsys.readouterr().err


def test_make_train_refuses_a_missing_pack_and_no_corpus_with_a_pack(pack, capsys):
    """A pack holds what it was written with: --no-corpus cannot apply to it, and a missing pack
    is a usage error that says how to write one, not a traceback."""
    path, _ = pack
    with pytest.raises(SystemExit):
        train.main(["--pack", str(path.parent / "missing.npz")])
    assert "no such file; write it with `make pack`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--pack", str(path), "--no-corpus"])
    assert "--no-corpus chooses what is read from the shared data" in capsys.readouterr().err


def test_make_train_in_the_layout_that_carries_writes_grid_bundles(pack, tmp_path, monkeypatch, capsys):
    """--representation grid --unshuffle 1: the cube without band centres is left out and named,
    and the bundles (whose card counts the network's cost on the grid's channels) are written,
    load, and say that band centres are required."""
    path, _ = pack
    monkeypatch.setattr(train, "validation_cases", few_validation_cases)
    args = ["--pack", str(path), "--minutes", "0.1", "--fresh", "--steps-per-epoch", "2", "--batch-size", "2",
            "--crop", "32", "--output", str(tmp_path), "--checkpoint", str(tmp_path / "ck.pt"), "--threads", "1",
            "--no-control", "--representation", "grid", "--unshuffle", "1", "--student-width", "8"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "left out of the wavelength grid's training (no band centres): hydice_urban_80x100" in out
    for role in ("student", "teacher"):
        model, card = load_bundle(tmp_path / f"csakd_{role}.json")
        assert model.config.representation == "grid" and model.config.network.unshuffle == 1
        assert card["inputs"]["wavelengths_required"] is True and card["macs_per_256_tile"] > 0
        assert card["training"]["cubes"] and not any(c.startswith("hydice") for c in card["training"]["cubes"])
    assert load_bundle(tmp_path / "csakd_student.json")[0].config.network.width == 8
