"""The scene correction (csakd_qgis.scene_correction): fitted on the scene's own reduced pairs,
applied where its check one scale further down passes, through Processing in a headless QGIS
and through the engine, against the truth of real Wald pairs."""

import json

import numpy as np
import pytest
import torch

import rasterio

from csakd_qgis import metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_processing_applies_it_where_its_check_passes_and_it_changes_neither_input(
        wald_pair_factory, run_fusion, make_feedback, tmp_path, shared_data_dir):
    """EnMAP Potsdam block B as a ×2 Wald pair (60 m LR-HSI, Sentinel-2 at 30 m): with the
    default the log says the correction was applied and what its check gained, the output is
    closer to the truth than with SCENE_CORRECTION off, and what it added is invisible to the
    LR-HSI and to the MSI. The progress bar moves while the correction is fitted."""
    from csakd_qgis.psf import degrade_torch, wald
    from csakd_qgis.srf import load_srf, spectral_response_matrix

    pair = wald_pair_factory("enmap_potsdam_blockB_128x64.tif", scale=2, lr_holes=())
    good = ~pair.bad_bands
    fused, said, recorded, events = {}, {}, {}, []
    for name, switch in (("on", None), ("off", False)):
        feedback = make_feedback()
        if name == "on":
            # (messages so far, progress %) at every progress update
            feedback.progressChanged.connect(lambda value, f=feedback: events.append((len(f.messages), value)))
        options = {} if switch is None else {"SCENE_CORRECTION": switch}
        run_fusion(feedback=feedback, LRHSI=str(pair.lr_path), HRMSI=str(pair.hr_path),
                   OUTPUT=str(tmp_path / f"{name}.tif"), **options)
        with rasterio.open(tmp_path / f"{name}.tif") as output:
            fused[name] = output.read(masked=True).filled(np.nan)[good].astype(np.float64)
            recorded[name] = output.tags()["CSAKD_SCENE_CORRECTION"]
            # What made it, as the command line records it: the switch among the options.
            made_of = json.loads(output.tags()["CSAKD_RECIPE"])
            assert made_of["options"]["scene_correction"] is (name == "on"), made_of
        said[name] = [m for m in feedback.messages if m.startswith("scene correction:")]
        if name == "on":
            fitting = next(i for i, m in enumerate(feedback.messages) if m.startswith("scene correction: fitting"))
            applied = next(i for i, m in enumerate(feedback.messages) if m.startswith("scene correction: applied"))
            during = [value for count, value in events if fitting < count <= applied]
            assert len(during) >= 3 and during == sorted(during) and during[-1] > during[0] + 10, events
            assert events[-1][1] == pytest.approx(100.0), events
    assert said["on"][0].startswith("scene correction: fitting on the scene's reduced pairs"), said
    assert len(said["on"]) == 2 and said["on"][1].startswith("scene correction: applied; its check"), said
    assert said["off"] == ["scene correction: off"], said
    # The output says what was done, as the log did, and so does the engine's report.
    assert recorded == {"on": said["on"][1].removeprefix("scene correction: "), "off": "off"}, recorded
    from csakd_qgis.api import fuse_files

    report = fuse_files(pair.lr_path, pair.hr_path, tmp_path / "engine.tif", scene_correction=False)
    assert report.scene_correction == "off"
    gains = {name: metrics.psnr(pair.reference[good], data) for name, data in fused.items()}
    print(f"Potsdam B Wald ×2: PSNR with the scene correction {gains['on']:.3f} dB, without {gains['off']:.3f} dB")
    # Measured +0.025 dB on this block (+0.04 to +0.21 on block C at ×2); the size of the gain
    # on a scene never trained on is the engine test's below.
    assert gains["on"] > gains["off"] + 0.01
    added = torch.from_numpy(fused["on"] - fused["off"])[None]
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    assert degrade_torch(added, wald(2))[inner].norm() < 0.1 * degrade_torch(added.abs(), wald(2))[inner].norm()
    with rasterio.open(pair.lr_path) as lr:
        wavelengths = np.array([float(lr.tags(i)["wavelength"]) for i in range(1, lr.count + 1)])[good]
    srf = load_srf("sentinel2a_msi_srf", srf_dir=shared_data_dir / "srf").subset(["B2", "B3", "B4", "B8"])
    response, _ = spectral_response_matrix(srf, wavelengths)
    seen_by_msi = np.einsum("mb,bhw->mhw", response, added[0].numpy())
    assert np.linalg.norm(seen_by_msi) < 0.1 * np.linalg.norm(response, 2) * added.norm().item()


@pytest.fixture(scope="module")
def validation_cube(shared_data_dir):
    from csakd_qgis.datasets import validation_cubes

    return {cube.name: cube for cube in validation_cubes(shared_data_dir)}


def test_the_engine_gains_on_a_scene_it_never_saw_and_leaves_a_small_one_alone(validation_cube):
    """AVIRIS Jasper Ridge, never trained on: at ×2 with Sentinel-2 the check passes and the
    full resolution gains (measured +0.93 dB); at ×3 (33×33 LR pixels, too few to reduce twice
    by 3) its pairs are reduced ×2, the log says so, and it gains too (measured +0.60 dB); at ×4
    the scene (25×25 LR pixels) is too small to check, the log says so and the output is bit for
    bit the one without."""
    from csakd_qgis.api import fuse_arrays, fuse_case, load_model
    from csakd_qgis.datasets import make_wald_case, validation_sensors

    model, _ = load_model(None, "cpu")
    sensor = validation_sensors()["Sentinel-2 10 m"]
    case = make_wald_case(validation_cube["AVIRIS Jasper Ridge"], sensor, 2)
    said = []
    with_it = fuse_case(case, model=model, log=said.append)
    without = fuse_case(case, model=model, scene_correction=False)
    gain = metrics.psnr(case.reference, with_it) - metrics.psnr(case.reference, without)
    assert gain > 0.3, gain
    assert metrics.sam(case.reference, with_it) < metrics.sam(case.reference, without)
    assert any(m.startswith("scene correction: applied; its check (fitted on the scene reduced twice, tested on the "
                            "scene reduced once against the hyperspectral image) gained +") for m in said), said

    smaller = make_wald_case(validation_cube["AVIRIS Jasper Ridge"], sensor, 3)
    said = []
    with_it = fuse_case(smaller, model=model, log=said.append)
    gain = metrics.psnr(smaller.reference, with_it) - metrics.psnr(smaller.reference,
                                                                   fuse_case(smaller, model=model, scene_correction=False))
    assert gain > 0.3, gain
    assert "scene correction: fitting on the scene's reduced pairs (33×33 hyperspectral pixels, reduced ×2)…" in said, said
    assert any(m.startswith("scene correction: applied; its check (pairs reduced ×2, the scene being too small to "
                            "reduce twice by ×3: fitted on the scene reduced twice, tested on the scene reduced once "
                            "against the hyperspectral image) gained +") for m in said), said

    small = make_wald_case(validation_cube["AVIRIS Jasper Ridge"], sensor, 4)
    said = []
    assert np.array_equal(fuse_case(small, model=model, log=said.append), fuse_case(small, model=model, scene_correction=False))
    assert ("scene correction: not applied, 25×25 hyperspectral pixels (on the working grid) are too few to check it, "
            "even with its pairs reduced ×2: about 32×32 are needed") in said, said

    # An MSI that is not of that scene (noise): the check cannot be trusted, and is not run.
    noise = np.random.default_rng(0).normal(size=case.hr_msi.shape).astype(np.float32) * case.hr_msi.std() + case.hr_msi.mean()
    said = []
    with_noise = fuse_arrays(case.lr_hsi, noise, model=model, wavelengths_nm=case.wavelengths_nm, log=said.append)
    assert np.array_equal(with_noise, fuse_arrays(case.lr_hsi, noise, model=model, wavelengths_nm=case.wavelengths_nm,
                                                  scene_correction=False))
    assert any(m.startswith("scene correction: not applied, the hyperspectral image explains only") for m in said), said


def test_the_command_line_takes_it_on_or_off():
    from csakd_qgis.cli import OPTION_BY_KEYWORD, engine_options

    assert engine_options({"scene_correction": "off"}) == {"scene_correction": False}
    assert engine_options({"scene_correction": "ON"}) == {"scene_correction": True}
    with pytest.raises(ValueError, match="--scene-correction: 'maybe' is not on or off"):
        engine_options({"scene_correction": "maybe"})
    assert OPTION_BY_KEYWORD["scene_correction"].flag == "--scene-correction"


def test_processing_reads_the_switch_as_text_and_refuses_what_is_neither(potsdam_wald_pair, run_fusion, make_feedback,
                                                                          tmp_path):
    """qgis_process passes text: "off" and "no" turn it off (QGIS alone would read them as true),
    and text that is neither on nor off is refused, with nothing written."""
    from qgis.core import QgsProcessingException

    for text in ("off", "no"):
        feedback = make_feedback()
        run_fusion(feedback=feedback, LRHSI=str(potsdam_wald_pair.lr_path), HRMSI=str(potsdam_wald_pair.hr_path),
                   SCENE_CORRECTION=text, OUTPUT=str(tmp_path / f"{text}.tif"))
        assert "scene correction: off" in feedback.messages, feedback.messages
    with pytest.raises(QgsProcessingException, match="SCENE_CORRECTION: 'maybe' is neither on nor off"):
        run_fusion(LRHSI=str(potsdam_wald_pair.lr_path), HRMSI=str(potsdam_wald_pair.hr_path),
                   SCENE_CORRECTION="maybe", OUTPUT=str(tmp_path / "maybe.tif"))
    assert not (tmp_path / "maybe.tif").exists()


def test_cancelling_while_it_fits_stops_the_fusion(validation_cube):
    """The fits are long enough (seconds) to be cancelled: the fusion stops with its message."""
    from csakd_qgis.api import FusionCancelled, fuse_case, load_model
    from csakd_qgis.datasets import make_wald_case, validation_sensors

    model, _ = load_model(None, "cpu")
    case = make_wald_case(validation_cube["AVIRIS Jasper Ridge"], validation_sensors()["Sentinel-2 10 m"], 2)
    fitting = []

    def log(message):
        if message.startswith("scene correction: fitting"):
            fitting.append(message)

    with pytest.raises(FusionCancelled, match="fusion cancelled while fitting the scene correction"):
        fuse_case(case, model=model, log=log, cancelled=lambda: bool(fitting))
    assert fitting


def test_the_benchmark_measures_it_on_cubes_it_was_not_tuned_on(shared_data_dir):
    """`make bench`'s scene-correction cases: the validation cubes at ×2 under every PSF, and a
    held-out set from the training corpus that holds no validation cube, only cases large enough
    to check the correction, every realistic PSF, and an MSI for cubes without band centres."""
    from csakd_qgis.bench import scene_correction_cases, scene_correction_lines
    from csakd_qgis.datasets import validation_cubes
    from csakd_qgis.scene_correction import reduction_for

    cases = scene_correction_cases(shared_data_dir)
    held_out = [c for c in cases if c["set"] == "held out"]
    validation = {cube.name for cube in validation_cubes(shared_data_dir)}
    assert {c["case"].cube for c in cases if c["set"] == "validation"} == validation
    assert held_out and not validation & {c["case"].cube for c in held_out}
    # Exactly the cases fusion can check: a non-square cube (AVIRIS Cuprite, 25×45 HSI pixels at ×2)
    # is in, where a square window of its shorter side would not be.
    assert all(reduction_for(c["case"].scale, c["case"].lr_hsi.shape[1:]) for c in cases)
    assert any(c["case"].cube.startswith("aviris_cuprite") and c["case"].scale == 2 for c in held_out)
    assert {"box", "Gaussian σ 0.80", "Wald's Gaussian"} <= {c["psf"] for c in held_out}
    assert any(c["case"].sensor.endswith("band groups") for c in held_out)
    assert {c["case"].scale for c in held_out} == {2, 3, 4, 8}
    # At ×3 only AVIRIS Jasper Ridge (33×33 HSI pixels) of the validation cubes can check it.
    assert {c["case"].cube for c in cases if c["set"] == "validation" and c["case"].scale == 3} == {"AVIRIS Jasper Ridge"}
    # The report: one line per set, then one per scale and one per PSF, from what the log said.
    rows = [{"set": c["set"], "psf": c["psf"], "scale": c["case"].scale, "log": "scene correction: applied; …",
             "on": {"psnr": 30.2, "sam": 2.0}, "off": {"psnr": 30.0, "sam": 2.1}} for c in cases]
    lines = scene_correction_lines({"cases": rows})
    assert lines[0].startswith(f"scene correction on validation, {len(cases) - len(held_out)} ×2/3 Wald cases: applied on "
                               f"{len(cases) - len(held_out)}; full-resolution PSNR +0.20 dB"), lines[0]
    assert sum(line.startswith("scene correction on held out") for line in lines) == 1
    by_scale = [line for line in lines if line.startswith("  scene correction on held out") and "PSF" not in line]
    assert [line.split(" Wald cases")[0].rsplit("×", 1)[1] for line in by_scale] == ["2", "3", "4", "8"], by_scale


def test_its_networks_are_fitted_apart_and_averaged():
    """The correction is the mean of its members' outputs; each member is fitted on its own draw
    of pixels, so they differ; and one seed gives the same networks again."""
    from csakd_qgis.scene_correction import MEMBERS, PixelCorrection, fit_on_pixels

    assert MEMBERS > 1
    generator = np.random.default_rng(0)
    features = torch.from_numpy(generator.normal(size=(600, 5)).astype(np.float32))
    target = torch.tanh(features[:, :3] * features[:, 1:4])  # a non-linear function of the pixel
    draws = np.stack([generator.choice(500, 300, replace=False) for _ in range(MEMBERS)])
    nets = [fit_on_pixels(features, target, draws, np.arange(500, 600), seed=3, steps=200, members=MEMBERS) for _ in range(2)]
    assert isinstance(nets[0], PixelCorrection) and nets[0].members == MEMBERS
    image = features.T.reshape(1, 5, 20, 30)
    with torch.no_grad():
        members = nets[0].member_outputs(features)
        averaged = nets[0](image)
        assert torch.equal(averaged, nets[1](image))
    assert torch.allclose(averaged.reshape(3, -1).T, members.mean(0), atol=1e-6)
    assert all(not torch.allclose(members[0], members[e], atol=1e-3) for e in range(1, MEMBERS))
    held_out = [float((m[500:] - target[500:]).square().mean()) for m in members]
    assert max(held_out) < 0.5 * float(target[500:].square().mean()), held_out


def test_small_scenes_are_reduced_by_two_and_the_networks_keep_to_the_msi_they_were_fitted_on():
    """The reduction: the scene's own scale where its window can be reduced twice by it, else
    ×2, else none; and the correction is zero where the MSI leaves the range it was fitted on."""
    from csakd_qgis.scene_correction import PixelCorrection, check_window, min_window, reduction_for

    assert [check_window(s) for s in (2, 3, 4, 8)] == [32, 54, 64, 256]
    assert reduction_for(3, (54, 54)) == 3 and reduction_for(3, (33, 33)) == 2 and reduction_for(3, (40, 54)) == 2
    assert reduction_for(8, (255, 300)) == 2 and reduction_for(8, (256, 256)) == 8
    assert reduction_for(4, (25, 25)) is None and reduction_for(2, (31, 31)) is None
    assert min_window(2) == min_window(8) == 32

    torch.manual_seed(0)
    net = PixelCorrection(2 + 3, 3, members=2)
    features = torch.randn(1, 5, 6, 7)
    free = net(features)
    assert free.abs().min() > 0  # unbounded before a range is set
    net.fit_range(torch.tensor([[-1.0, 1.0], [-0.5, 0.5]]))
    bounded = net(features)
    inside = ((features[0, 0].abs() <= 1) & (features[0, 1].abs() <= 0.5))
    assert 0 < inside.sum() < inside.numel()
    assert torch.equal(bounded[0][:, inside], free[0][:, inside])
    assert torch.all(bounded[0][:, ~inside] == 0)
