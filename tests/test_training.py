import math
import re

import numpy as np
import pytest
import torch

from csakd_qgis import datasets, train
from csakd_qgis.bundle import load_bundle
from csakd_qgis.network import count_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def few_validation_cases(data_dir=None, scales=None, cubes_=None, sensors=None):
    """One Wald case per validation cube (scale 8, Sentinel-2 10 m): the full 27 cases cost
    ~30 s per run on a busy 2-core machine, and every case goes through the same code."""
    cases = datasets.validation_cases(data_dir, scales=(8,), cubes_=cubes_, sensors=sensors)
    return [c for c in cases if c.sensor == "Sentinel-2 10 m"]


def _checkpoint_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state"]


def _check_card(card, role, steps):
    assert card["role"] == role
    assert set(card["config"]) == {"network", "subspace_dim", "representation"}
    summary = card["validation"]["summary"]
    assert set(summary) == {role, "bicubic", "gsa"}
    for name in (role, "bicubic", "gsa"):
        for metric in ("psnr", "sam", "ergas"):
            assert math.isfinite(summary[name][metric]), (name, metric)
    assert {c["cube"] for c in card["validation"]["cases"]} == {
        "EnMAP Potsdam block C",
        "HyMap02 Berlin",
        "AVIRIS Jasper Ridge",
    }
    training = card["training"]
    assert training["steps"] == steps
    assert training["batch_size"] == 2 and training["crop"] == 32
    assert training["learning_rate"] == pytest.approx(5e-5) and "cosine" in training["schedule"]
    assert training["best_epoch"] >= 0 and training["minutes"] >= 0
    # The budget and what training bought over the untrained base (epoch 0) are on record.
    assert training["budget_minutes"] > 0
    history = card["history"]
    best = max(h["student"]["psnr"] for h in history if h["epoch"] == training["best_epoch"])
    assert training["gain_over_base_db"] == pytest.approx(best - history[0]["student"]["psnr"], abs=1e-4)
    # The five training cubes and the whole corpus (the ones without band centres included).
    corpus = sorted(p.stem for p in (datasets.default_data_dir() / "corpus").glob("*.tif"))
    assert len(corpus) >= 20
    assert len(training["cubes"]) == 5 + len(corpus)
    assert all(any(entry.startswith(name) for entry in training["cubes"]) for name in corpus)


def test_train_writes_bundles_and_resumes(tmp_path, shared_data_dir, monkeypatch, capsys):
    monkeypatch.setattr(train, "validation_cases", few_validation_cases)
    checkpoint = tmp_path / "ck.pt"
    common = ["--steps-per-epoch", "2", "--batch-size", "2", "--crop", "32", "--output", str(tmp_path)]
    common += ["--checkpoint", str(checkpoint), "--data", str(shared_data_dir), "--threads", "1", "--log-every", "1"]

    assert train.main(["--minutes", "0.05", "--fresh"] + common) == 0
    first = capsys.readouterr().out
    assert "resumed" not in first
    state = _checkpoint_state(checkpoint)
    assert state["step"] >= 1 and len(state["history"]) >= 2  # epoch 0 (the start) and at least one more

    student, student_card = load_bundle(tmp_path / "csakd_student.json")
    teacher, teacher_card = load_bundle(tmp_path / "csakd_teacher.json")
    assert student.config == train.student_config()
    assert teacher.config == train.teacher_config()
    control, control_card = load_bundle(tmp_path / train.CONTROL_BUNDLE)
    _check_card(student_card, "student", state["step"])
    _check_card(teacher_card, "teacher", state["step"])
    _check_card(control_card, "control", state["step"])
    # The control is the student's architecture, trained from the same start without the teacher.
    assert control.config == student.config
    assert [h["control"]["psnr"] for h in state["history"]][0] == pytest.approx(state["history"][0]["student"]["psnr"], abs=1e-9)
    assert student_card["parameters"] == count_parameters(student)
    assert teacher_card["parameters"] == count_parameters(teacher)
    assert teacher_card["parameters"] > student_card["parameters"]
    # The shipped student is the one that was validated: its card's numbers are reproduced.
    rows = train.validate(student, few_validation_cases(shared_data_dir))
    assert np.mean([r["psnr"] for r in rows]) == pytest.approx(student_card["validation"]["summary"]["student"]["psnr"], abs=1e-6)

    # A larger budget without --fresh continues the same run. The budget counts time already
    # spent, so it is set just above what the checkpoint holds: at least one more step.
    minutes = state["elapsed"] / 60 + 0.03
    assert train.main(["--minutes", f"{minutes:.4f}"] + common) == 0
    second = capsys.readouterr().out
    assert f"resumed from {checkpoint} at step {state['step']}" in second
    resumed = _checkpoint_state(checkpoint)
    assert resumed["step"] > state["step"]
    assert len(resumed["history"]) > len(state["history"])
    assert resumed["history"][: len(state["history"])] == state["history"]
    _, student_card = load_bundle(tmp_path / "csakd_student.json")
    assert student_card["training"]["steps"] == resumed["step"]
    # Its weights would load into the aligned representation (same shapes) and mean something
    # else there: a run of other models refuses the checkpoint and leaves it as it was.
    before = checkpoint.read_bytes()
    with pytest.raises(SystemExit, match="written by another run's models: its teacher or student differs"):
        train.main(["--minutes", f"{minutes + 0.03:.4f}", "--representation", "aligned"] + common)
    assert checkpoint.read_bytes() == before


def test_training_crops_carry_the_whole_cube_statistics(shared_data_dir):
    # Fusion fits the scene statistics on a whole scene; training crops must see the same ones,
    # not statistics fitted on their own few dozen LR pixels.
    from csakd_qgis.degradation import blur_and_decimate
    from csakd_qgis.model import SceneStatistics

    cube = datasets.load_potsdam_block("A", shared_data_dir)
    sensor = datasets.load_srf("sentinel2a_msi_srf").subset(["B2", "B3", "B4", "B8"])
    whole_scene = datasets.WholeSceneStatistics(subspace_dim=8)
    batch = datasets.training_batch([cube], [sensor], np.random.default_rng(3), batch_size=3, crop=32,
                                    scales=(4,), statistics=whole_scene)
    # One PSF per batch, drawn for training (datasets.training_psf); the whole cube's statistics
    # are those of the whole cube degraded under that PSF, carried with it.
    psf = batch[0].degradation
    assert psf.scale == 4 and all(case.degradation == psf for case in batch)
    whole = datasets.make_wald_case(cube, sensor, 4, psf=psf)
    expected = SceneStatistics.estimate(whole.lr_hsi, blur_and_decimate(whole.hr_msi, psf), 8)
    assert all(case.statistics is batch[0].statistics for case in batch)
    assert batch[0].statistics.degradation == psf
    np.testing.assert_allclose(batch[0].statistics.basis, expected.basis, atol=1e-6)
    np.testing.assert_allclose(batch[0].statistics.regression, expected.regression, atol=1e-6)
    assert whole_scene(cube, sensor, psf) is batch[0].statistics, "cached per cube, sensor and PSF"
    _, _, stats, _ = train.prepare_batch(batch, 8)
    for tensor in stats["basis"]:
        np.testing.assert_allclose(tensor.numpy(), expected.basis, atol=1e-5)
    # A crop's own statistics differ: this is what the whole-scene ones replace.
    own = SceneStatistics.estimate(batch[0].lr_hsi, blur_and_decimate(batch[0].hr_msi, psf), 8)
    assert np.abs(own.regression - expected.regression).max() > 1e-2


def test_scene_adaptation_trains_under_the_scenes_estimated_psf(potsdam_c):
    # fuse_files hands scene adaptation the statistics with the scene's degradation (here a box
    # PSF, as pixel aggregation gives); a few steps of it must run on them and report.
    from csakd_qgis.api import fit_scene
    from csakd_qgis.degradation import blur_and_decimate
    from csakd_qgis.model import SubspaceFusionModel
    from csakd_qgis.psf import SpatialDegradation
    from csakd_qgis.user_training import adapt_to_scene

    box = SpatialDegradation(2, "box", (0.0, 0.0))
    case = datasets.make_wald_case(potsdam_c, datasets.validation_sensors()["Sentinel-2 10 m"], 2, psf=box)
    msi_at_hsi = blur_and_decimate(case.hr_msi, box)
    model = SubspaceFusionModel(train.student_config()).eval()
    statistics = fit_scene(case.lr_hsi, msi_at_hsi, model.config.subspace_dim)
    statistics.degradation = box
    lines = []
    adapted, report = adapt_to_scene(model, case.lr_hsi, msi_at_hsi, 2, 0.02, log=lines.append, statistics=statistics)
    assert report.steps >= 1, report
    assert np.isfinite(report.psnr_before) and np.isfinite(report.psnr_after), report
    assert adapted is not None


def test_corpus_cubes_are_read_with_their_scale_and_band_centres(shared_data_dir):
    import rasterio

    cubes = {c.name: c for c in datasets.corpus_cubes(shared_data_dir)}
    assert len(cubes) >= 20
    # Reflectance stored as integers: the files' GDAL scale factor is applied.
    cuprite = cubes["aviris_cuprite_50x90"]
    assert 0.5 < cuprite.data.max() < 1.5 and cuprite.wavelengths_nm is not None
    assert 380 < cuprite.wavelengths_nm.min() < cuprite.wavelengths_nm.max() < 2500
    # The Salton Sea cube's 20 NaN bands are dropped, not trained on.
    with rasterio.open(shared_data_dir / "corpus" / "aviris_salton_sea_roi_51x56.tif") as dataset:
        assert dataset.count == 224
    assert cubes["aviris_salton_sea_roi_51x56"].data.shape[0] == 204
    assert all(np.isfinite(c.data).all() for c in cubes.values())
    # Cubes without band centres are kept for band-group MSIs; laboratory scenes weigh less.
    assert cubes["hydice_urban_80x100"].wavelengths_nm is None
    assert cubes["cave_cloth_512x512"].weight == datasets.LABORATORY_WEIGHT < 1
    assert cubes["aviris_abu_beach1_150x150"].weight == 1.0
    assert not any(c.wavelengths_nm is None for c in datasets.corpus_cubes(shared_data_dir, unknown_wavelengths=False))


def test_cubes_without_band_centres_train_with_band_group_msis(shared_data_dir):
    response, label = datasets.band_group_response(162, np.random.default_rng(3))
    assert 3 <= response.shape[0] <= 8 and response.shape[1] == 162
    np.testing.assert_allclose(response.sum(1), 1.0)
    assert label == f"{response.shape[0]} band groups"
    # Each MSI band is a group of neighbouring bands: its weight is concentrated around one band.
    assert (response.max(1) > 5 * response.mean(1)).all()
    hydice = next(c for c in datasets.corpus_cubes(shared_data_dir) if c.name == "hydice_urban_80x100")
    statistics = datasets.WholeSceneStatistics(8)
    batch = datasets.training_batch([hydice], datasets.training_sensors(), np.random.default_rng(0), 2, 32,
                                    statistics=statistics)
    assert batch[0].sensor.endswith("band groups")
    assert batch[0].hr_msi.shape[0] == int(batch[0].sensor.split()[0])
    assert batch[0].statistics is not None


def test_crop_interior_leaves_the_crop_borders_out():
    image = torch.arange(2 * 1 * 24 * 24, dtype=torch.float32).reshape(2, 1, 24, 24)
    (inner,) = train.crop_interior(image, lr_size=8, margin=3)  # scale 3: 8 LR pixels, 3 cut per side
    torch.testing.assert_close(inner, image[..., 9:15, 9:15])
    # A crop of 5 LR pixels keeps at least 2: the margin shrinks to 1.
    small = torch.zeros(1, 1, 20, 20)
    assert train.crop_interior(small, lr_size=5, margin=3)[0].shape[-2:] == (12, 12)
    # Two LR pixels or fewer: nothing is cut.
    assert train.crop_interior(small[..., :8, :8], lr_size=2)[0].shape[-1] == 8


def test_the_student_fits_batches_it_sees_again_from_its_zero_correction(shared_data_dir):
    """The memorisation control of the learnability probe: from the untrained base (a correction
    of exactly zero), the training path must lower the loss of fixed batches it sees again, so
    that a held-out gain of zero (README, 'Where it stands') means that what is learnt does not
    carry, not that gradients never reach the correction."""
    from csakd_qgis import learnability

    train_cubes = [c for c in datasets.training_cubes(shared_data_dir) if "Potsdam" in c.name]
    held_out = [c for c in datasets.validation_cubes(shared_data_dir) if "Potsdam" in c.name]
    sensor = datasets.validation_sensors()["Sentinel-2 10 m"]
    result = learnability.probe(
        train_cubes, held_out, sensor, scale=4, steps=0, memorise_batches=2, memorise_steps=60,
        held_out_batches=2, batch_size=3, crop=48, lr=1e-3, log=lambda message: None,
    )
    assert result.held_out_gain_db == []
    assert result.memorised_gain_db > 0.2, result
    assert math.isfinite(result.memorised_held_out_gain_db)


def test_the_probe_logs_its_held_out_gain_per_cube_by_steps_and_crops_seen(shared_data_dir):
    """The generalisation run measures the held-out gain on each held-out cube every
    ``evaluate_every`` steps, and their mean, and logs the crops seen beside the steps: runs of
    different batch sizes are compared per crop, and one cube's loss cannot hide behind another's
    gain (learnability's docstring)."""
    from csakd_qgis import learnability

    train_cubes = [c for c in datasets.training_cubes(shared_data_dir) if "Potsdam" in c.name]
    held_out = [c for c in datasets.validation_cubes(shared_data_dir) if "Potsdam" in c.name or "Jasper" in c.name]
    lines = []
    result = learnability.probe(
        train_cubes, held_out, datasets.validation_sensors()["Sentinel-2 10 m"], scale=4, steps=2, memorise_steps=0,
        held_out_batches=1, batch_size=3, crop=48, lr=1e-3, evaluate_every=1, log=lines.append,
    )
    assert [step for step, _ in result.held_out_gain_db] == [1, 2]
    assert list(result.held_out_gain_by_cube_db) == [c.name for c in held_out]
    for index, (step, mean) in enumerate(result.held_out_gain_db):
        per_cube = [series[index] for series in result.held_out_gain_by_cube_db.values()]
        assert all(s == step and math.isfinite(g) for s, g in per_cube)
        assert mean == pytest.approx(np.mean([g for _, g in per_cube]))
    # The second step has moved the zeroed output convolution: the held-out loss changed.
    assert any(abs(g) > 1e-5 for series in result.held_out_gain_by_cube_db.values() for _, g in series[1:])
    logged = [re.match(r"step +(\d+) \((\d+) crops\) .* held-out gain EnMAP Potsdam block C [+-]\d\.\d{3}  "
                       r"AVIRIS Jasper Ridge [+-]\d\.\d{3}  mean [+-]\d\.\d{3} dB$", line) for line in lines]
    assert [m and m.groups() for m in logged] == [("1", "3"), ("2", "6")], lines


def test_the_probe_saves_its_student_on_the_way_and_at_the_end(shared_data_dir, tmp_path):
    """--save-every N writes the student after every N steps as BUNDLE_stepN.json, --save after
    the last: a long run leaves bundles to fuse before it ends, each with the steps it had."""
    from csakd_qgis import learnability

    train_cubes = [c for c in datasets.training_cubes(shared_data_dir) if "Potsdam block A" in c.name]
    held_out = [c for c in datasets.validation_cubes(shared_data_dir) if "Potsdam" in c.name]
    sensor = datasets.validation_sensors()["Sentinel-2 10 m"]
    settings = dict(scale=4, steps=3, memorise_steps=0, held_out_batches=1, batch_size=2, crop=48, lr=1e-3,
                    evaluate_every=3, log=lambda message: None)
    learnability.probe(train_cubes, held_out, sensor, save=str(tmp_path / "s.json"), save_every=2, **settings)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["s.json", "s_step2.json"]
    on_the_way, card_2 = load_bundle(tmp_path / "s_step2.json")
    last, card_3 = load_bundle(tmp_path / "s.json")
    assert (card_2["probe"]["steps"], card_3["probe"]["steps"]) == (2, 3)
    # Different weights: the bundle on the way is not the last one written twice.
    assert not torch.equal(on_the_way.network.head_refine.weight, last.network.head_refine.weight)
    with pytest.raises(ValueError, match="needs a bundle path"):
        learnability.probe(train_cubes, held_out, sensor, save_every=2, **settings)


def test_cosine_learning_rate_decays_from_its_peak_to_its_floor():
    rates = [train.cosine_learning_rate(4e-4, f) for f in np.linspace(0.0, 1.0, 11)]
    assert rates[0] == pytest.approx(4e-4) and rates[-1] == pytest.approx(4e-4 * train.FINAL_LEARNING_RATE_FRACTION)
    assert rates[5] == pytest.approx(4e-4 * (1 + train.FINAL_LEARNING_RATE_FRACTION) / 2)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    # Outside the run: held at its ends.
    assert train.cosine_learning_rate(4e-4, 1.5) == rates[-1] and train.cosine_learning_rate(4e-4, -1.0) == rates[0]


def test_the_probe_decays_its_step_over_its_steps_when_asked(shared_data_dir, monkeypatch):
    """--decay: each step's learning rate is make train's cosine at that step's share of the run,
    also the teacher's and the distilled student's; without it the step stays --lr."""
    from csakd_qgis import learnability

    train_cubes = [c for c in datasets.training_cubes(shared_data_dir) if "Potsdam block A" in c.name]
    held_out = [c for c in datasets.validation_cubes(shared_data_dir) if "Potsdam" in c.name]
    sensor = datasets.validation_sensors()["Sentinel-2 10 m"]
    used = []
    step = learnability.optimiser_step
    monkeypatch.setattr(learnability, "optimiser_step",
                        lambda optimiser, loss, model: (used.append(optimiser.param_groups[0]["lr"]), step(optimiser, loss, model)))
    settings = dict(scale=4, steps=4, memorise_steps=0, held_out_batches=1, batch_size=2, crop=48, lr=1e-3,
                    evaluate_every=4, log=lambda message: None)
    learnability.probe(train_cubes, held_out, sensor, decay=True, **settings)
    assert used == pytest.approx([train.cosine_learning_rate(1e-3, f) for f in (0.0, 0.25, 0.5, 0.75)])
    used.clear()
    learnability.probe(train_cubes, held_out, sensor, **settings)
    assert used == pytest.approx([1e-3] * 4)
    # With the teacher, its step and the distilled student's follow the same schedule.
    distilled = []
    distil_step = learnability.distillation_step
    monkeypatch.setattr(learnability, "distillation_step", lambda distiller, teacher_opt, student_opt, batch, transfer=None: (
        distilled.append((teacher_opt.param_groups[0]["lr"], student_opt.param_groups[0]["lr"])),
        distil_step(distiller, teacher_opt, student_opt, batch, transfer=transfer))[1])
    learnability.probe(train_cubes, held_out, sensor, decay=True, distil=True, **dict(settings, steps=2, evaluate_every=2))
    expected = [train.cosine_learning_rate(1e-3, f) for f in (0.0, 0.5)]
    assert [t for t, _ in distilled] == pytest.approx(expected) and [d for _, d in distilled] == pytest.approx(expected)


def test_the_probe_distils_beside_its_control_on_the_same_batches(shared_data_dir):
    """--distil co-trains the teacher and a second student with the distillation loss (the step
    make train takes) beside the plain student: the plain run is its control, its held-out gains
    the same as without --distil (same start, same batches; the student reads the first of the
    teacher's components, exactly its own fit), and the log gives all three at every evaluation."""
    from csakd_qgis import learnability

    train_cubes = [c for c in datasets.training_cubes(shared_data_dir) if "Potsdam" in c.name]
    held_out = [c for c in datasets.validation_cubes(shared_data_dir) if "Potsdam" in c.name]
    sensor = datasets.validation_sensors()["Sentinel-2 10 m"]
    settings = dict(scale=4, steps=2, memorise_steps=0, held_out_batches=1, batch_size=2, crop=48, lr=1e-3,
                    evaluate_every=1)
    plain = learnability.probe(train_cubes, held_out, sensor, log=lambda message: None, **settings)
    lines = []
    distilled = learnability.probe(train_cubes, held_out, sensor, distil=True, log=lines.append, **settings)
    assert [step for step, _ in distilled.held_out_gain_db] == [1, 2]
    for (_, without), (_, with_) in zip(plain.held_out_gain_db, distilled.held_out_gain_db):
        assert with_ == pytest.approx(without, abs=1e-3)
    assert [step for step, _ in distilled.distilled_gain_db] == [step for step, _ in distilled.teacher_gain_db] == [1, 2]
    # The distilled student took other steps than its control (the teacher's terms), from the same start.
    assert any(abs(d - c) > 1e-6 for (_, d), (_, c) in zip(distilled.distilled_gain_db, distilled.held_out_gain_db))
    assert math.isfinite(distilled.teacher_base_gain_db) and plain.distilled_gain_db == []
    assert re.match(r"distillation: the untrained teacher \(32 components\) starts at [+-]\d\.\d{3} dB", lines[0]), lines
    assert re.search(r"; distilled student [+-]\d\.\d{3} dB, teacher [+-]\d\.\d{3} dB$", lines[-1]), lines


def test_the_probe_fuses_each_held_out_cube_whole_with_the_base_and_the_trained_students(shared_data_dir):
    """--whole-image: after the last step each held-out cube is fused whole as one Wald case
    through fusion (train.validate: scene correction off) with the untrained base, the trained
    student, the distilled one and the teacher; the base's figures are fusion's own for that case, a trained
    student's differ (its correction is no longer zero)."""
    from csakd_qgis import learnability

    train_cubes = [c for c in datasets.training_cubes(shared_data_dir) if "Potsdam" in c.name]
    held_out = [c for c in datasets.validation_cubes(shared_data_dir) if "Potsdam" in c.name]
    sensor = datasets.validation_sensors()["Sentinel-2 10 m"]
    lines = []
    result = learnability.probe(train_cubes, held_out, sensor, scale=4, steps=2, memorise_steps=0, held_out_batches=1,
                                batch_size=2, crop=48, lr=1e-3, distil=True, whole_image=True, log=lines.append)
    from csakd_qgis.model import SubspaceFusionModel

    (name, figures), = result.whole_image.items()
    assert name == held_out[0].name and list(figures) == ["base", "trained", "distilled", "teacher"]
    case = datasets.make_wald_case(held_out[0], sensor, 4)
    base = train.validate(SubspaceFusionModel(train.student_config()), [case])[0]
    assert figures["base"] == pytest.approx({"psnr": base["psnr"], "sam": base["sam"]})
    assert 25 < figures["base"]["psnr"] < 60
    assert figures["trained"]["psnr"] != figures["base"]["psnr"] != figures["distilled"]["psnr"]
    assert re.match(rf"whole image {re.escape(name)} fused as one Wald case: base \d+\.\d{{3}} dB / \d+\.\d{{3}}°, "
                    r"trained .*, distilled .*, teacher .*°$", lines[-1]), lines
    assert learnability.probe(train_cubes, held_out, sensor, steps=1, memorise_steps=0, held_out_batches=1,
                              batch_size=2, crop=48, log=lambda message: None).whole_image == {}


def test_the_parts_of_one_scene_share_a_subspace_whose_components_flip_and_the_aligned_frame_agrees(shared_data_dir):
    """learnability.frame_agreement on the CAVE oil painting's top three quarters and bottom
    quarter (RGB ×4): the two subspaces coincide, yet the principal components' second flips
    sign between the parts (why the student lost there, README), and in the aligned frame
    (model.aligned_frame) the leading components agree."""
    from csakd_qgis import learnability

    cube, = [c for c in datasets.corpus_cubes(shared_data_dir) if c.name.startswith("cave_oil_painting")]
    top, bottom = learnability.split_rows(cube)
    agreement = learnability.frame_agreement(top, bottom, datasets.validation_sensors()["RGB"], 4)
    assert (agreement["subspaces"][:10] > 0.99).all()
    assert agreement["subspace"][1] < -0.8 and (agreement["subspace"][:5] < 0.95).all()
    assert (agreement["aligned"][:9] > 0.94).all()
    same = learnability.frame_agreement(top, top, datasets.validation_sensors()["RGB"], 4)
    np.testing.assert_allclose(same["subspace"][:10], 1.0, atol=1e-9)


def test_the_probes_training_ground_can_be_cut_to_a_reduced_pairs_size_or_taken_one_gsd_coarser(shared_data_dir):
    """--train-window keeps the block of the top part next to the held-out quarter (the last rows,
    the first columns), and --train-reduced degrades it exactly as a Wald case's LR-HSI is
    degraded (so the probe trains on what scene adaptation's reduced pair gives); both refuse
    what they cannot do, neither works without --within, and --held-out-reduced needs
    --train-reduced's factor."""
    from csakd_qgis import learnability

    cube, = [c for c in datasets.corpus_cubes(shared_data_dir) if c.name.startswith("cave_cloth")]
    top, bottom = learnability.split_rows(cube)
    window = learnability.training_window(top, 128, 96)
    assert window.data.shape == (cube.data.shape[0], 128, 96)
    np.testing.assert_array_equal(window.data, cube.data[:, 384 - 128:384, :96])
    with pytest.raises(ValueError, match="does not fit"):
        learnability.training_window(top, 385, 10)
    reduced = learnability.reduced_cube(window, 4)
    assert reduced.data.shape == (cube.data.shape[0], 32, 24)
    lr_hsi = datasets.make_wald_case(window, datasets.validation_sensors()["RGB"], 4).lr_hsi
    np.testing.assert_allclose(reduced.data, lr_hsi, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="at least 2"):
        learnability.reduced_cube(window, 1)
    for refused in (["--train-reduced"], ["--within", "cave_cloth", "--held-out-reduced"],
                    ["--within", "cave_cloth", "--train-reduced", "1"]):
        with pytest.raises(SystemExit):
            learnability.main(refused + ["--steps", "0", "--memorise-steps", "0"])


@pytest.mark.parametrize("option, teacher_moves", [(dict(transfer=True), False), (dict(teacher_steps=2), True)],
                         ids=["transfer set", "teacher trained first"])
def test_the_distillation_options_change_the_distilled_student_and_leave_the_control(shared_data_dir, option,
                                                                                    teacher_moves):
    """--transfer: the distilled student also learns the teacher's output on unlabelled crops of
    the held-out cubes, drawn by a generator of their own, and the transfer set's reference is
    never read (the step runs with it None); the teacher never learns from them.
    --teacher-steps: the teacher first trains alone, on batches of a generator of its own. Either
    way the control (the plain student) takes exactly the steps it takes without the option and
    the distilled student other ones; the teacher moves only when it trained first. Without the
    teacher neither option means anything: refused."""
    from csakd_qgis import learnability

    train_cubes = [c for c in datasets.training_cubes(shared_data_dir) if "Potsdam" in c.name]
    held_out = [c for c in datasets.validation_cubes(shared_data_dir) if "Potsdam" in c.name]
    sensor = datasets.validation_sensors()["Sentinel-2 10 m"]
    settings = dict(scale=4, steps=2, memorise_steps=0, held_out_batches=1, batch_size=2, crop=48, lr=1e-3,
                    evaluate_every=1, distil=True, log=lambda message: None)
    without = learnability.probe(train_cubes, held_out, sensor, **settings)
    with_ = learnability.probe(train_cubes, held_out, sensor, **option, **settings)
    assert with_.held_out_gain_db == without.held_out_gain_db
    assert (with_.teacher_gain_db != without.teacher_gain_db) == teacher_moves
    assert any(abs(a - b) > 1e-6 for (_, a), (_, b) in zip(with_.distilled_gain_db, without.distilled_gain_db))
    with pytest.raises(ValueError, match="needs the teacher"):
        learnability.probe(train_cubes, held_out, sensor, steps=1, memorise_steps=0, log=print, **option)


def test_a_distillation_step_with_a_transfer_set_brings_the_student_to_the_teachers_output(shared_data_dir):
    """train.distillation_step(..., transfer=batch): from the same start, five steps with a fixed
    unlabelled batch (its reference None, so it cannot be read) leave the teacher exactly as
    five steps without it, and the student closer to the teacher's output on that batch than
    without it. A transfer batch with other bands than the labelled one is refused."""
    import copy

    from csakd_qgis.model import SubspaceFusionModel

    rng = np.random.default_rng(4)
    sensor = datasets.validation_sensors()["Sentinel-2 10 m"]
    statistics = datasets.WholeSceneStatistics(train.TEACHER_SUBSPACE_DIM)

    def batch(cubes):
        cases = datasets.training_batch(cubes, [sensor], rng, 2, 48, scales=(4,), statistics=statistics)
        return train.prepare_batch(cases, train.TEACHER_SUBSPACE_DIM)

    labelled = [batch([c for c in datasets.training_cubes(shared_data_dir) if "Potsdam" in c.name]) for _ in range(5)]
    unlabelled = batch([c for c in datasets.validation_cubes(shared_data_dir) if "Potsdam" in c.name])[:3] + (None,)
    torch.manual_seed(0)
    start = train.Distiller(SubspaceFusionModel(train.teacher_config()), SubspaceFusionModel(train.student_config()))
    runs = {}
    for transfer in (None, unlabelled):
        distiller = copy.deepcopy(start)
        teacher_opt, student_opt = distiller.optimisers(1e-3)
        for step_batch in labelled:
            train.distillation_step(distiller, teacher_opt, student_opt, step_batch, transfer=transfer)
        runs["with" if transfer else "without"] = distiller
    for a, b in zip(runs["with"].teacher.parameters(), runs["without"].teacher.parameters()):
        assert torch.equal(a, b)
    view = train.image_view(unlabelled)
    with torch.no_grad():
        teacher_out = view(runs["with"].teacher(*unlabelled[:3]).image)
        distance = {name: (view(d.student(*unlabelled[:3]).image) - teacher_out).pow(2).mean().item()
                    for name, d in runs.items()}
    assert distance["with"] < 0.95 * distance["without"], distance  # 0.86 when written
    other_bands = (unlabelled[0][:, :-1],) + unlabelled[1:]
    teacher_opt, student_opt = start.optimisers(1e-3)
    before = copy.deepcopy(start.state_dict())
    with pytest.raises(ValueError, match="the transfer set has"):
        train.distillation_step(start, teacher_opt, student_opt, labelled[0], transfer=other_bands)
    assert all(torch.equal(before[k], v) for k, v in start.state_dict().items())  # refused before any update


def test_the_probe_refuses_to_hold_out_a_cube_it_trains_on(shared_data_dir):
    """--train and --held-out take any shared cube (training, validation or corpus); one named by
    both would measure memorisation as generalisation, so the probe refuses it before training."""
    from csakd_qgis import learnability

    with pytest.raises(SystemExit, match="both trained on and held out: cave_feathers_512x512; use --within"):
        learnability.main(["--train", "cave_feathers", "Potsdam block A", "--held-out", "feathers",
                           "--steps", "0", "--memorise-steps", "0", "--data", str(shared_data_dir)])
    with pytest.raises(SystemExit):  # argparse's error: the moving average's decay must be below 1
        learnability.main(["--ema", "1", "--steps", "0", "--memorise-steps", "0", "--data", str(shared_data_dir)])
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        learnability.probe([], [], datasets.validation_sensors()["RGB"], ema_decay=-0.5, log=lambda message: None)
    with pytest.raises(SystemExit, match="no cube matches \\['no such scene'\\]"):
        learnability.main(["--train", "no such scene", "--data", str(shared_data_dir)])


def test_training_batches_refuse_cubes_no_sensor_or_scale_fits():
    """A cube that no sensor covers, or too small for every scale, is refused with a message
    instead of drawing sensors forever or failing inside numpy."""
    sensor = datasets.validation_sensors()["Sentinel-2 10 m"]
    rng = np.random.default_rng(0)
    swir = datasets.HyperspectralCube("SWIR only", np.ones((20, 40, 40), np.float32), np.linspace(2000, 2400, 20))
    with pytest.raises(ValueError, match="none of the sensors .* SWIR only's bands .2000–2400 nm"):
        datasets.training_batch([swir], [sensor], rng, 2, 32)
    tiny = datasets.HyperspectralCube("tiny", np.ones((20, 10, 10), np.float32), np.linspace(400, 1000, 20))
    with pytest.raises(ValueError, match=r"tiny \(10×10 pixels\) is too small for scales \[4, 8\]"):
        datasets.training_batch([tiny], [sensor], rng, 2, 32, scales=(4, 8))


def test_the_probe_trains_the_student_on_the_wavelength_grid(shared_data_dir):
    """--representation grid: the student's network runs on the base's spectrum on the fixed
    wavelength grid (model.py), which needs every cube's band centres."""
    from csakd_qgis import learnability

    train_cubes = [c for c in datasets.training_cubes(shared_data_dir) if "Potsdam" in c.name]
    held_out = [c for c in datasets.validation_cubes(shared_data_dir) if "Potsdam" in c.name]
    sensor = datasets.validation_sensors()["Sentinel-2 10 m"]
    lines = []
    result = learnability.probe(train_cubes, held_out, sensor, scale=4, steps=2, memorise_steps=0, held_out_batches=1,
                                batch_size=2, crop=32, evaluate_every=1, lr=1e-3, representation="grid", log=lines.append)
    gains = [gain for _, gain in result.held_out_gain_db]
    assert len(gains) == 2 and all(math.isfinite(g) for g in gains)
    assert gains[1] != 0.0  # the zero-initialised head moved: the grid network was trained
    hydice = next(c for c in datasets.corpus_cubes(shared_data_dir) if c.name == "hydice_urban_80x100")
    with pytest.raises(ValueError, match="needs band centres, which hydice_urban_80x100 lack"):
        learnability.probe([hydice], held_out, sensor, steps=1, representation="grid", log=lines.append)


def test_make_train_takes_the_networks_layout_and_refuses_impossible_ones(capsys):
    """--representation, --unshuffle and --student-width reach the configs (the paper's
    full-resolution layout is the one whose correction carried: learnability.py); impossible
    layouts are usage errors before any data is read, in make train and in both probes (a 0
    once crashed the learnability probe and was silently taken as the default by the other)."""
    student = train.student_config(representation="grid", unshuffle=1, width=16)
    teacher = train.teacher_config(representation="grid", unshuffle=1)
    assert (student.network.unshuffle, student.network.width, student.network.growth) == (1, 16, 8)
    assert student.network.hsi_channels == student.network.msi_channels == student.channels
    assert teacher.network.unshuffle == 1 and teacher.representation == student.representation == "grid"
    from csakd_qgis import learnability, representation_probe

    refused = [
        (train.main, ["--unshuffle", "0"], "--unshuffle must be 1 or more (1: the paper's layout, 4: the bundled one), got 0"),
        (train.main, ["--student-width", "18"], "--student-width must be a multiple of 4"),
        (learnability.main, ["--unshuffle", "0"], "--unshuffle must be 1 or more"),
        (learnability.main, ["--width", "18"], "--width must be a multiple of 4"),
        (representation_probe.main, ["--network", "student", "--unshuffle", "0"], "--unshuffle must be 1 or more"),
        (representation_probe.main, ["--width", "0"], "--width must be a multiple of 4"),
    ]
    for main, argv, message in refused:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err, argv


def test_the_probe_saves_its_trained_student_as_a_bundle_that_fusion_runs(shared_data_dir, tmp_path):
    """learnability --save: the generalisation run's student, in its layout, as a model bundle
    (bundle.load_bundle reads it back with its weights; fusion's own route runs it)."""
    from csakd_qgis import learnability
    from csakd_qgis.api import fuse_case

    train_cubes = [c for c in datasets.training_cubes(shared_data_dir) if "Potsdam" in c.name]
    held_out = [c for c in datasets.validation_cubes(shared_data_dir) if "Jasper" in c.name]
    path = tmp_path / "probe_student.json"
    lines = []
    learnability.probe(train_cubes, held_out, datasets.validation_sensors()["Sentinel-2 10 m"], steps=2, memorise_steps=0,
                       held_out_batches=1, batch_size=2, crop=32, lr=1e-3, representation="grid", unshuffle=1, width=8,
                       save=str(path), log=lines.append)
    model, card = load_bundle(path)
    assert model.config.representation == "grid" and model.config.network.unshuffle == 1
    assert model.network.head_refine.weight.abs().sum() > 0
    assert card["probe"]["steps"] == 2 and list(card["probe"]["held_out_gain_db"]) == ["AVIRIS Jasper Ridge"]
    # What fusion's log and the user read from a card: its size and that band centres are needed.
    assert card["parameters"] > 0 and card["inputs"]["wavelengths_required"] is True
    assert lines[-1] == f"saved the trained student after 2 steps as {path}"
    case = datasets.validation_cases(shared_data_dir, scales=(4,))[-1]
    assert np.isfinite(fuse_case(case, model=model)).all()
