"""Training a teacher and a student on the user's own data (the "Train Fusion Model" algorithm),
and adapting a student to one scene before fusing it.

Training pairs always come from the Wald protocol (protocol.md):

* a real LR-HSI + HR-MSI pair at working scale s: the LR-HSI is the reference; the model sees
  it degraded by s, beside the MSI averaged onto the LR-HSI's grid;
* a high-resolution hyperspectral cube + a sensor SRF: the cube is the reference, the MSI is
  simulated through the SRF, the LR-HSI is the cube degraded by the chosen scale.

The last fifth of every scene (along its longer side) is held out for validation and never trained on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .datasets import HyperspectralCube, WaldCase, _augment, case_statistics, make_wald_case
from .degradation import blur_and_decimate
from .georaster import FusionInputError
from .srf import SensorResponse, spectral_response_matrix

HOLDOUT_FRACTION = 0.2
MIN_LR_PIXELS = 4  # per side, of a training or validation crop after degradation

STUDENT_SIZES = ("small", "medium", "paper")
# What the networks trained on the user's scenes see (model.REPRESENTATIONS): their validation
# is the last fifth of the same scenes, where the aligned frame (model.aligned_frame) is what
# lets a correction learnt on one part of a scene hold on another (README, 'Where it stands').
USER_REPRESENTATION = "aligned"


def student_config_for(size: str, subspace_dim: Optional[int] = None, representation: str = USER_REPRESENTATION):
    """The student's config by size name: small = the bundled student, medium = wider and
    deeper, paper = the paper's student layout (nf 86, gc 43, blocks 1/4/4/1) — slow on a CPU;
    its channels in ``representation`` (model.REPRESENTATIONS, "subspace" or "aligned")."""
    from dataclasses import replace

    from .model import FusionModelConfig
    from .network import NetworkConfig
    from .train import SUBSPACE_DIM, student_config

    subspace_dim = subspace_dim or SUBSPACE_DIM
    if representation not in ("subspace", "aligned"):
        raise ValueError(f"a student trained on the user's scenes works in the subspace, 'subspace' or 'aligned', "
                         f"not {representation!r}")
    if size == "small":
        return student_config(subspace_dim, representation)
    if size == "medium":
        return FusionModelConfig(replace(student_config(subspace_dim).network, width=48, growth=24, blocks=(1, 3, 3, 1),
                                         attention_dim=48), subspace_dim, representation)
    if size == "paper":
        return FusionModelConfig(
            NetworkConfig(subspace_dim, subspace_dim, width=86, growth=43, blocks=(1, 4, 4, 1), attention_dim=64, heads=4, unshuffle=1),
            subspace_dim, representation,
        )
    raise ValueError(f"student size must be one of {', '.join(STUDENT_SIZES)}, not {size!r}")


@dataclass
class TrainingScene:
    """One source of training pairs: a reference cube and how its MSI is made."""

    name: str
    reference: np.ndarray  # (B, rows, cols)
    wavelengths_nm: Optional[np.ndarray]
    scale: int
    msi: Optional[np.ndarray] = None  # (M, rows, cols): a real MSI on the reference grid
    sensor: Optional[SensorResponse] = None  # or an SRF to simulate it
    # The spatial degradation its Wald pairs are made with (psf.SpatialDegradation at ``scale``);
    # None: the Wald protocol's Gaussian.
    degradation: Optional[object] = None

    def part(self, axis: int, start: int, stop: Optional[int]) -> "TrainingScene":
        """The rows (axis 1) or columns (axis 2) from start to stop."""
        cut = [slice(None)] * 3
        cut[axis] = slice(start, stop)
        cut = tuple(cut)
        return TrainingScene(
            self.name, self.reference[cut], self.wavelengths_nm, self.scale,
            None if self.msi is None else self.msi[cut], self.sensor, self.degradation,
        )

    def split(self) -> tuple:
        """(training part, held-out part): the last fifth along the longer side is held out."""
        axis = 1 if self.reference.shape[1] > self.reference.shape[2] else 2
        length, across = self.reference.shape[axis], self.reference.shape[3 - axis]
        least = MIN_LR_PIXELS * self.scale
        held = max(least, int(round(length * HOLDOUT_FRACTION)))
        if length - held < least or across < least:
            raise FusionInputError(
                f"{self.name} is too small to train on at scale {self.scale}: it needs at least "
                f"{least * 2} × {least} reference pixels (it has {self.reference.shape[2]} × {self.reference.shape[1]})"
            )
        return self.part(axis, 0, length - held), self.part(axis, length - held, None)

    def case(self, reference: np.ndarray, msi: Optional[np.ndarray], rng=None, **noise) -> WaldCase:
        if self.msi is None:
            cube = HyperspectralCube(self.name, reference, self.wavelengths_nm)
            case = make_wald_case(cube, self.sensor, self.scale, rng, psf=self.degradation, **noise)
            case.sensor = self.sensor.name
            return case
        s = self.scale
        rows, cols = reference.shape[1] // s * s, reference.shape[2] // s * s
        reference = np.ascontiguousarray(reference[:, :rows, :cols], dtype=np.float32)
        degradation = self.degradation if self.degradation is not None else s
        lr = blur_and_decimate(reference, degradation).astype(np.float32)
        return WaldCase(
            lr, np.ascontiguousarray(msi[:, :rows, :cols], dtype=np.float32), reference, s, self.name, "own MSI",
            self.degradation,
        )

    def sample(self, rng: np.random.Generator, batch_size: int, crop: int) -> List[WaldCase]:
        _, rows, cols = self.reference.shape
        size = max(MIN_LR_PIXELS * self.scale, min(crop, rows, cols) // self.scale * self.scale)
        batch = []
        for _ in range(batch_size):
            r = int(rng.integers(rows - size + 1))
            c = int(rng.integers(cols - size + 1))
            stacked = self.reference[:, r : r + size, c : c + size]
            if self.msi is not None:
                stacked = np.concatenate([stacked, self.msi[:, r : r + size, c : c + size]])
            stacked = _augment(stacked, rng)
            bands = self.reference.shape[0]
            batch.append(self.case(stacked[:bands], stacked[bands:] if self.msi is not None else None, rng))
        return batch


def whole_scene_statistics(scene: TrainingScene, subspace_dim: int):
    """Scene statistics of the scene's whole Wald pair, for every crop cut from it: fusion fits
    them on a whole scene, and fitted per crop they would describe a few dozen pixels and
    teach the network corrections to another base (see datasets.WholeSceneStatistics)."""
    return case_statistics(scene.case(scene.reference, scene.msi), subspace_dim)


def filled_pair(hsi: np.ndarray, msi: np.ndarray, too_sparse: str) -> tuple:
    """The pair as float32 with pixels missing in either image set to the band means;
    FusionInputError(too_sparse) when fewer than half the pixels have data in both."""
    valid = np.isfinite(hsi).all(0) & np.isfinite(msi).all(0)
    if valid.mean() < 0.5:
        raise FusionInputError(too_sparse)
    hsi = np.where(valid, hsi, np.nanmean(hsi, axis=(1, 2), keepdims=True)).astype(np.float32)
    msi = np.where(valid, msi, np.nanmean(msi, axis=(1, 2), keepdims=True)).astype(np.float32)
    return hsi, msi


def scene_from_pair(lr_path, hr_path, max_lr_pixels: int = 1_000_000, subspace_dim: Optional[int] = None, log=None) -> TrainingScene:
    """A real co-registered pair on the LR-HSI's working grid (see georaster), with the MSI
    degraded onto it under the PSF and offset estimated from the pair (pipeline.py), so that
    the scene's Wald pairs are made with the sensor's own relative blur."""
    import rasterio

    from .api import array_pair
    from .georaster import hr_reader, lr_on_working_grid, plan_grid, read_as_float
    from .pipeline import ScenePair, fit_scene_statistics
    from .raster_io import read_spectral_metadata
    from .train import SUBSPACE_DIM

    with rasterio.open(lr_path) as lr_ds, rasterio.open(hr_path) as hr_ds:
        grid = plan_grid(lr_ds, hr_ds)
        if grid.lr_width * grid.lr_height > max_lr_pixels:
            raise FusionInputError(
                f"the pair {Path(lr_path).name} covers {grid.lr_width}×{grid.lr_height} hyperspectral pixels; "
                f"clip it to at most {max_lr_pixels} pixels for training (Clip Raster by Extent)"
            )
        meta = read_spectral_metadata(lr_ds)
        with lr_on_working_grid(lr_ds, grid) as lr_vrt:
            hsi = read_as_float(lr_vrt)
        keep = np.isfinite(hsi).any(axis=(1, 2))
        if meta.bad_bands is not None:
            keep &= ~meta.bad_bands
        hsi = hsi[keep]
        hsi[:, ~np.isfinite(hsi).all(0)] = np.nan
        read_lr = array_pair(hsi, hsi, 1).read_lr
        wavelengths = meta.wavelengths_nm[keep] if meta.wavelengths_nm is not None else None
        pair = ScenePair(hsi.shape[1:], (grid.height, grid.width), grid.scale, read_lr, hr_reader(hr_ds, grid), wavelengths)
        statistics, _ = fit_scene_statistics(pair, subspace_dim or SUBSPACE_DIM, log=log)
        msi = pair.msi_at_lr((0, 0) + hsi.shape[1:], statistics.degradation)
    hsi, msi = filled_pair(hsi, msi, f"less than half of the pair {Path(lr_path).name} has data in both images")
    return TrainingScene(
        Path(lr_path).stem, hsi, wavelengths, grid.scale, msi=msi, degradation=statistics.degradation.at_scale(grid.scale)
    )


def scene_from_cube(path, sensor: SensorResponse, scale: int) -> TrainingScene:
    """A high-resolution hyperspectral cube; its MSI is simulated through ``sensor``."""
    from .raster_io import read_cube

    cube, meta, _ = read_cube(path)
    if meta.wavelengths_nm is None:
        raise FusionInputError(
            f"{Path(path).name} has no band wavelengths, so its MSI cannot be simulated through an SRF; "
            "add wavelength metadata (e.g. an ENVI header) or train on a real LR-HSI/HR-MSI pair"
        )
    keep = np.isfinite(cube).all(axis=(1, 2))
    if meta.bad_bands is not None:
        keep &= ~meta.bad_bands
    spectral_response_matrix(sensor, meta.wavelengths_nm[keep])  # fails early if the SRF misses the cube
    return TrainingScene(Path(path).stem, cube[keep], meta.wavelengths_nm[keep], int(scale), sensor=sensor)


def check_band_counts(scenes: Sequence[TrainingScene]) -> None:
    counts = {s.name: s.reference.shape[0] for s in scenes}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise FusionInputError(
            f"the training scenes have different numbers of usable hyperspectral bands ({listing}); "
            "one model is trained per sensor: give scenes of the same sensor (and the same band selection)"
        )


@dataclass
class UserTrainingResult:
    student_card: Path
    report: Optional[Path]
    state: Dict = field(default_factory=dict)


def train_on_scenes(
    scenes: Sequence[TrainingScene],
    output_card: Path,
    minutes: float,
    student_size: str = "small",
    representation: str = USER_REPRESENTATION,
    start_model: Optional[Path] = None,
    report_path: Optional[Path] = None,
    checkpoint: Optional[Path] = None,
    batch_size: int = 4,
    crop: int = 64,
    steps_per_epoch: int = 60,
    seed: int = 2024,
    log: Callable[[str], None] = print,
    cancelled: Callable[[], bool] = lambda: False,
    progress: Optional[Callable[[float], None]] = None,
) -> UserTrainingResult:
    """Co-train teacher and student on the scenes' training parts; write the best student.

    The student is ``student_size`` (:func:`student_config_for`) in ``representation``; a
    ``start_model`` of the same network starts it, in its own representation when it has learnt
    a correction (which means something only in that frame), in ``representation`` when it has
    not (the bundled student). Raises FusionInputError for no scene or a budget that is not
    positive, ValueError for another representation, and what train.co_train raises."""
    import tempfile
    from dataclasses import replace

    import torch

    from .bundle import load_bundle
    from .report import write_training_report
    from .train import TEACHER_SUBSPACE_DIM, TrainingRun, co_train, shared_statistics_dim, teacher_config, write_bundles

    if not scenes:
        raise FusionInputError("no training data: give LR-HSI/HR-MSI pairs, or hyperspectral cubes with an SRF")
    if minutes <= 0:
        raise FusionInputError("the time budget must be positive (minutes)")
    check_band_counts(scenes)
    pairs = [scene.name for scene in scenes if scene.msi is not None]
    if pairs:
        # The LR-HSI is the only reference a real pair has. In a within-scene probe on four CAVE
        # laboratory scenes, a student trained on a part reduced ×4 lost at full resolution on three
        # and kept a third of the full-resolution gain on the fourth (learnability.py, --train-reduced).
        log(f"{len(pairs)} of {len(scenes)} scene(s) are real pairs ({', '.join(pairs)}): the model learns and is "
            "validated on them reduced by their resolution ratio, one step coarser than the fusion it serves, and a "
            "gain there may not hold at the finer step; high-resolution cubes at the output's pixel size avoid this")
    parts = [scene.split() for scene in scenes]
    training = [p[0] for p in parts]
    validation = [p[1].case(p[1].reference, p[1].msi) for p in parts]
    student = student_config_for(student_size, representation=representation)
    start_state = None
    if start_model is not None:
        model, card = load_bundle(start_model)
        name = card.get("name", Path(start_model).stem)
        same_network = replace(model.config, representation=student.representation) == student
        if model.config.representation == "grid":
            log(f"{name} works on the wavelength grid, which training on your scenes does not use: training the "
                f"'{student_size}' student from scratch")
        elif not same_network:
            log(f"the starting model's architecture differs from the '{student_size}' student: training from scratch")
        elif model.config.representation == student.representation:
            start_state = model.state_dict()
            log(f"starting the student from {name}")
        elif model.correction_is_zero():
            # Untrained (the bundled student is its epoch 0): no correction learnt in its frame to keep.
            start_state = model.state_dict()
            log(f"starting the student from {name}, which has learnt no correction yet: in the "
                f"{student.representation} representation")
        else:
            # A trained correction means something only in the frame it was learnt in.
            start_state, student = model.state_dict(), model.config
            log(f"starting the student from {name}: in its own {student.representation} representation, in which "
                "it learnt its correction")
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory(prefix="csakd-train-") as folder:
        teacher = teacher_config(max(TEACHER_SUBSPACE_DIM, student.subspace_dim), student.representation)
        whole = [whole_scene_statistics(scene, shared_statistics_dim(teacher, student)) for scene in training]

        def sample_batch(rng):
            index = int(rng.integers(len(training)))
            cases = training[index].sample(rng, batch_size, crop)
            for case in cases:
                case.statistics = whole[index]
            return cases

        run = TrainingRun(
            sample_batch=sample_batch,
            validation=validation,
            teacher=teacher,
            student=student,
            minutes=minutes,
            checkpoint=Path(checkpoint) if checkpoint else Path(folder) / "checkpoint.pt",
            steps_per_epoch=steps_per_epoch,
            log_every=max(1, steps_per_epoch // 3),
            seed=seed,
            fresh=checkpoint is None,
            start_student=start_state,
        )
        started = time.time()
        state = co_train(run, log=log, cancelled=cancelled, progress=progress)
        info = {
            "cubes": [f"{s.name} {list(s.reference.shape)} (training part)" for s in training],
            "sensors": sorted({"own MSI" if s.msi is not None else s.sensor.name for s in scenes}),
            "scales": sorted({s.scale for s in scenes}),
            "student_size": student_size,
            "representation": student.representation,
            "started_from": str(start_model) if start_state is not None else "scratch",
            "batch_size": batch_size,
            "crop": crop,
            "seed": seed,
            "command": "Train Fusion Model (csakd:trainfusionmodel)",
            "wall_minutes": round((time.time() - started) / 60, 2),
        }
        card = write_bundles({"student": Path(output_card)}, state, run.baselines, info, run)
    report = write_training_report(report_path, state, run.baselines) if report_path else None
    return UserTrainingResult(card, report, state)


@dataclass
class AdaptationReport:
    minutes: float
    steps: int
    psnr_before: float
    psnr_after: float
    kept: bool  # False when adaptation did not help on the held-out part and was discarded


def adapt_to_scene(
    model,
    hsi: np.ndarray,
    msi_at_hsi: np.ndarray,
    scale: int,
    minutes: float,
    crop: int = 64,
    batch_size: int = 4,
    learning_rate: float = 3e-4,
    seed: int = 0,
    log: Callable[[str], None] = print,
    cancelled: Callable[[], bool] = lambda: False,
    statistics=None,
):
    """Fine-tune a copy of ``model`` on the scene's own Wald-degraded pair.

    hsi (B, h, w) and msi_at_hsi (M, h, w) are the LR-HSI and the MSI averaged onto its grid.
    The scene is cut along its longer side into a training part, a selection part (which
    picks the best weights seen during training) and a held-out last fifth that measures
    what the adaptation bought, on pixels neither trained nor selected on. Returns
    (model to use, AdaptationReport); the original model when adapting did not help there.

    ``statistics`` are the scene statistics the fusion afterwards uses (default: fitted on
    the whole pair, as the fusion fits them). Training, selection and scoring all use them:
    the correction a fine-tune learns belongs to one subspace basis, and a basis fitted on
    each part on its own differs from it (on a small scene's held-out part it would be
    fitted on a dozen pixels).

    What the held-out part measures is at the LR-HSI's resolution, a step coarser than the
    fusion, and a correction learnt there need not hold at the finer one: within four CAVE
    laboratory scenes, a student trained from its untrained start (not fine-tuned as here) on a
    part reduced ×4 (as this pair is at scale 4) lost on the other part at full resolution on
    three of them and kept a third of the full-resolution gain on the fourth (learnability.py,
    ``--train-reduced``), where 128 × 128 reference pixels at full resolution next to that part
    gained +0.365 and +1.018 dB on two (README, 'What learning can do on scenes it sees').
    """
    import copy
    from dataclasses import replace

    import torch

    from .api import fit_scene
    from .metrics import psnr
    from .train import optimiser_step, prepare_batch, reference_loss

    # The scene's own Wald pair is the LR-HSI degraded once more by the same PSF (in HSI pixels,
    # so the same relative blur at the next scale), aligned by construction.
    degradation = statistics.degradation.at_scale(scale) if statistics is not None and statistics.degradation else None
    scene = TrainingScene(
        "scene", hsi.astype(np.float32), None, int(scale), msi=msi_at_hsi.astype(np.float32), degradation=degradation
    )
    training, held_out = scene.split()
    try:
        training, selection = training.split()
    except FusionInputError:
        selection = None  # too small to set a part aside: the last weights are the candidate
    if statistics is None:
        statistics = fit_scene(scene.reference, scene.msi, model.config.subspace_dim)
    statistics = replace(statistics, degradation=degradation)
    device = next(model.parameters()).device
    tensors = statistics.to_tensors(device)

    def score(candidate, part) -> float:
        case = part.case(part.reference, part.msi)
        with torch.no_grad():
            fused = candidate(
                torch.from_numpy(case.lr_hsi)[None].to(device), torch.from_numpy(case.hr_msi)[None].to(device), tensors
            ).image
        return psnr(case.reference, fused[0].cpu().numpy())

    before = score(model, held_out)
    adapted = copy.deepcopy(model)
    best = {"state": copy.deepcopy(model.state_dict()), "score": score(model, selection) if selection else -np.inf}

    def keep_if_better() -> None:
        adapted.eval()
        current = score(adapted, selection)
        if current > best["score"]:
            best.update(state=copy.deepcopy(adapted.state_dict()), score=current)

    optimiser = torch.optim.AdamW(adapted.parameters(), lr=learning_rate, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    torch.set_flush_denormal(True)
    check_every = max(20.0, minutes * 60 / 20)
    started, steps, last_check = time.time(), 0, time.time()
    while time.time() - started < minutes * 60 and not cancelled():
        adapted.train()
        lr_hsi, hr_msi, stats, reference = prepare_batch(
            training.sample(rng, batch_size, crop), model.config.subspace_dim, statistics
        )
        lr_hsi, hr_msi, reference = lr_hsi.to(device), hr_msi.to(device), reference.to(device)
        stats = {name: value.to(device) if hasattr(value, "to") else value for name, value in stats.items()}
        # The student alone, with the reference terms of the joint loss.
        optimiser_step(optimiser, reference_loss(adapted, (lr_hsi, hr_msi, stats, reference)), adapted)
        steps += 1
        if selection is not None and time.time() - last_check >= check_every:
            keep_if_better()
            last_check = time.time()
    if selection is not None:
        keep_if_better()
        adapted.load_state_dict(best["state"])
    adapted.eval()
    after = score(adapted, held_out)
    kept = after > before
    report = AdaptationReport(round((time.time() - started) / 60, 2), steps, before, after, kept)
    log(
        f"scene adaptation: {steps} steps in {report.minutes:.1f} min; held-out PSNR {before:.2f} → {after:.2f} dB "
        f"on the scene's pair reduced ×{scale}, one resolution step coarser than the fusion "
        + ("(adapted model used)" if kept else "(no gain: the original model is used)")
    )
    return (adapted if kept else model), report
