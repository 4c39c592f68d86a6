"""Online knowledge-distillation co-training of a teacher and a student (CSAKD).

Each step trains the teacher on a Wald-protocol batch, then the student on the same batch
against the reference and the teacher's detached output and fused feature (losses.py).
Batches are generated on the fly from the real training cubes (datasets.py); after every
epoch both models are validated on cubes never trained on, beside bicubic and GSA.

The run is bounded by a time budget, checkpoints after every epoch and resumes from its
checkpoint when started again with the same output. The best student (mean validation PSNR)
is what the bundle ships. Step n's batch is drawn from its own random generator, seeded by
(seed, n): a resumed run draws the batches an uninterrupted one would have, and worker
processes (``--workers``) can prepare batches ahead of the step that needs them.

    python -m csakd_qgis.train --minutes 60 --output resources/models

On a machine with a GPU, from a training-set pack (training_set.py), preparing batches in
14 processes, the batch and its learning rate grown together (learnability.py):

    python -m csakd_qgis.train --pack build/train/training_set.npz --device cuda --workers 14 \\
        --batch-size 96 --lr 4e-4 --minutes 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from . import __version__
from .baselines import bicubic_upsample, gsa
from .bundle import _atomic_write, save_bundle
from .datasets import (
    TRAINING_SCALES,
    VALIDATION_SCALES,
    WaldCase,
    WholeSceneStatistics,
    case_statistics,
    training_batch,
    validation_cases,
)
from .losses import DISTILLATION_WEIGHT, floored_distance_loss, student_loss, teacher_loss
from .metrics import ergas, psnr, sam
from .model import (
    REPRESENTATIONS,
    FusionModelConfig,
    SceneStatistics,
    SubspaceFusionModel,
    representation_channels,
    stack_statistics,
)
from .network import NetworkConfig, count_macs, count_parameters
from .api import resolve_device
from .training_set import TrainingSet, load_training_set, read_pack

# Components of the scene's spectral subspace that the student (and, more, the teacher)
# sharpens; the rest of every spectrum is bicubic. With the untrained base alone, on the 27
# validation cases: K = 8 → 34.14 dB, 12 → 34.76, 16 → 34.87, 24 → 34.96, 32 → 34.99 (the
# 8-band WorldView-2 on EnMAP Potsdam gained 1.2 dB from 8 to 12). At scale 4 (the 27 cases
# with CNMF and HySure beside: the Wald cases and the realistic PSFs), the lead over the better
# of the two was +0.93 dB at K = 12, +1.03 at 16, +1.12 at 20 and +1.13 at 24. The noise that
# once made extra components cost SAM (30 dB on EnMAP Potsdam ×4: 7.25° at 12, 7.45° at 16,
# GSA 7.39°) is now left out per scene (model.signal_subspace_dimension: 7.08° at either). 16
# rather than 20: the per-tile time (measured side by side with the grouped convolutions below,
# before the base's degradation became matrix products: 0.18 s at 16, 20 another 0.01–0.02 s,
# against the 0.2 s budget; make bench now reads 0.11 s at 16).
SUBSPACE_DIM = 16
TEACHER_SUBSPACE_DIM = 32
DEFAULT_CHECKPOINT = Path("build") / "train" / "checkpoint.pt"
# How much a trained student must beat the untrained base (its epoch 0, whose correction is
# exactly zero, so that fusion skips the network) on the mean validation PSNR to be shipped
# instead: running the network costs 30 % more time on a 512² scene (median of 3 alternating
# runs: 5.6 s against 4.3 s), which a gain of a few hundredths of a dB is not worth.
MIN_GAIN_DB = 0.05
# The student trained without its teacher (TrainingRun.control): kept beside the bundles for the
# benchmark's distillation comparison, never packaged into the plugin.
CONTROL_BUNDLE = "csakd_student_without_distillation.json"


# The step at the end of a cosine decay, relative to its peak.
FINAL_LEARNING_RATE_FRACTION = 0.05


def cosine_learning_rate(peak: float, fraction: float) -> float:
    """The learning rate ``fraction`` (0–1, clipped) of the way through a run: a cosine decay
    from ``peak`` to FINAL_LEARNING_RATE_FRACTION of it (Loshchilov & Hutter, SGDR, 2017, without
    restarts), the schedule of co_train and of the probe's ``decay``."""
    fraction = min(1.0, max(0.0, fraction))
    final = FINAL_LEARNING_RATE_FRACTION
    return peak * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * fraction)))


def set_learning_rate(optimisers: Sequence[torch.optim.Optimizer], lr: float) -> None:
    """Every parameter group of every optimiser in ``optimisers`` to ``lr``: one step of a schedule
    that several models of a run follow together."""
    for optimiser in optimisers:
        for group in optimiser.param_groups:
            group["lr"] = lr


def student_config(
    subspace_dim: int = SUBSPACE_DIM, representation: str = "subspace", unshuffle: int = 4, width: int = 32
) -> FusionModelConfig:
    """The bundled student: sized for a laptop CPU (see README, 'The bundled model'); its
    network's channels are the subspace's K or the wavelength grid's (model.REPRESENTATIONS).
    ``unshuffle`` and ``width`` (growth half of it) change its layout for the probes
    (learnability.py, representation_probe.py): 1 is the paper's full-resolution layout.
    Raises ValueError for another representation or a width that 2 groups do not divide."""
    channels = representation_channels(representation, subspace_dim)
    return FusionModelConfig(
        # Grouped CLRA convolutions (groups=2, as the method allows): half their cost; measured
        # side by side, 0.18 s per 256² tile for the 16-component student against 0.20 s
        # ungrouped (the budget is 0.2 s).
        NetworkConfig(channels, channels, width=width, growth=width // 2, blocks=(1, 2, 2, 1), groups=2, attention_dim=32,
                      heads=4, unshuffle=unshuffle),
        subspace_dim,
        representation,
    )


def layout_error(unshuffle: Optional[int], width: Optional[int], width_flag: str = "--width") -> str:
    """The command line's message for a layout the network cannot take (``unshuffle`` below 1, a
    ``width`` that is not a multiple of 4; None: not given), or "" when it can. ``width_flag``
    names the option the width came from."""
    if unshuffle is not None and unshuffle < 1:
        return f"--unshuffle must be 1 or more (1: the paper's layout, 4: the bundled one), got {unshuffle}"
    if width is not None and (width < 4 or width % 4):
        return f"{width_flag} must be a multiple of 4 (its half, the growth, is split into 2 groups), got {width}"
    return ""


def teacher_config(subspace_dim: int = TEACHER_SUBSPACE_DIM, representation: str = "subspace", unshuffle: int = 4) -> FusionModelConfig:
    """The bundled teacher (wider and deeper than :func:`student_config`), in ``representation``'s
    channels and with the space-to-depth factor ``unshuffle`` (1: the paper's layout)."""
    channels = representation_channels(representation, subspace_dim)
    return FusionModelConfig(
        NetworkConfig(channels, channels, width=48, growth=24, blocks=(2, 3, 3, 2), attention_dim=48, heads=4, unshuffle=unshuffle),
        subspace_dim,
        representation,
    )


def prepare_batch(cases: List[WaldCase], subspace_dim: int, statistics: Optional[SceneStatistics] = None):
    """Tensors for one training step: inputs, stacked scene statistics, normalised target.

    Each crop's statistics are ``statistics`` when given, else those the case carries (of the
    whole scene it was cut from), else fitted on the crop itself.
    """
    stats = [statistics or c.statistics or case_statistics(c, subspace_dim) for c in cases]
    lr = torch.from_numpy(np.stack([c.lr_hsi for c in cases]))
    hr = torch.from_numpy(np.stack([c.hr_msi for c in cases]))
    reference = torch.from_numpy(np.stack([c.reference for c in cases]).astype(np.float32))
    stacked = stack_statistics(stats)
    return lr, hr, stacked, reference


# LR pixels at a training crop's edge left out of every loss: there the degradation saw the
# crop's mirrored border, not real neighbours, which a whole scene has only at its own edge.
LOSS_MARGIN = 3


def crop_interior(*images: torch.Tensor, lr_size: int, margin: int = LOSS_MARGIN):
    """The images (N,C,H,W) at H = s·lr_size without ``margin`` LR pixels on each side, the margin
    shrunk so that at least 2 LR pixels per side remain. Returns a tuple of views."""
    scale = images[0].shape[-1] // lr_size
    cut = min(margin, max(0, (lr_size - 2) // 2)) * scale
    if cut == 0:
        return images
    return tuple(image[..., cut:-cut, cut:-cut] for image in images)


def loss_view(batch) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """How every loss here sees a prepared batch (:func:`prepare_batch`): (the reference (N,B,H',W'),
    a function taking a model's fused image (N,B,H,W) to the same view), spectra divided by each
    scene's scale and crop borders left out (:func:`crop_interior`)."""
    view = image_view(batch)
    return view(batch[3]), view


def image_view(batch) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`loss_view`'s view alone: (N,B,H,W) → (N,B,H',W'), each image divided by its scene's
    scale and its crop borders left out. Reads only the batch's LR-HSI and statistics, so a batch
    without a reference (its fourth item None) has a view too."""
    lr_hsi, _, stats = batch[:3]
    norm = stats["scale"].view(-1, 1, 1, 1)
    lr_size = lr_hsi.shape[-1]
    return lambda image: crop_interior(image / norm, lr_size=lr_size)[0]


def reference_loss(model: SubspaceFusionModel, batch) -> torch.Tensor:
    """The reference term (teacher_loss) of ``model`` on one prepared batch
    (:func:`prepare_batch`), seen as :func:`loss_view` sees it. Returns a scalar tensor (with
    gradients when enabled)."""
    lr_hsi, hr_msi, stats, _ = batch
    target, view = loss_view(batch)
    return teacher_loss(view(model(lr_hsi, hr_msi, stats).image), target)


class Distiller(nn.Module):
    """Teacher, student and the 1×1 adapter that maps the student's fused feature onto the
    teacher's width when they differ (the feature term needs matching channels)."""

    def __init__(self, teacher: SubspaceFusionModel, student: SubspaceFusionModel):
        super().__init__()
        self.teacher = teacher
        self.student = student
        t, s = teacher.config.network.width, student.config.network.width
        self.adapter = nn.Identity() if t == s else nn.Conv2d(s, t, 1)

    def optimisers(self, lr: float) -> Tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """AdamW (weight decay 1e-4) at ``lr`` for the teacher, and for the student with the
        adapter: the pair :func:`distillation_step` takes."""
        return (torch.optim.AdamW(self.teacher.parameters(), lr=lr, weight_decay=1e-4),
                torch.optim.AdamW(list(self.student.parameters()) + list(self.adapter.parameters()), lr=lr,
                                  weight_decay=1e-4))


def distillation_step(distiller: Distiller, teacher_opt: torch.optim.Optimizer, student_opt: torch.optim.Optimizer,
                      batch, transfer=None) -> Tuple[float, float]:
    """One step of online distillation (method.md; the paper's co-training) on a prepared batch
    (:func:`prepare_batch`): the teacher against the reference (losses.teacher_loss), then the
    student against the reference, the teacher's detached output and its fused feature
    (losses.student_loss, the student's feature through the distiller's adapter), the spectra
    seen as :func:`loss_view` sees them. Returns the teacher's and the student's loss.

    ``transfer``: a prepared batch whose reference is not used (None allowed), Hinton et al.'s
    transfer set (2015, "Distilling the knowledge in a neural network": the student may learn
    the teacher's outputs on unlabelled inputs). The student's loss then also holds its distance
    to the teacher's output there (losses.floored_distance_loss at losses.DISTILLATION_WEIGHT),
    floored at the teacher's error per band on ``batch`` (its output before this step's update;
    its output on ``transfer`` is taken after it). The teacher does not learn from it. Raises
    ValueError when ``transfer`` has other bands than ``batch`` (the floor is per band).
    """
    lr_hsi, hr_msi, stats, _ = batch
    # Checked before either model moves, so that a refused step leaves both as they were.
    if transfer is not None and transfer[0].shape[1] != lr_hsi.shape[1]:
        raise ValueError(f"the transfer set has {transfer[0].shape[1]} bands and the labelled batch "
                         f"{lr_hsi.shape[1]}: the teacher's error on the one floors the distance on the other")
    target, view = loss_view(batch)
    teacher, student = distiller.teacher, distiller.student
    teacher_out = teacher(lr_hsi, hr_msi, stats)
    teacher_image = view(teacher_out.image)
    t_loss = teacher_loss(teacher_image, target)
    optimiser_step(teacher_opt, t_loss, teacher)

    student_out = student(lr_hsi, hr_msi, stats)
    s_loss = student_loss(
        view(student_out.image),
        target,
        teacher_image.detach(),
        distiller.adapter(student_out.fused),
        teacher_out.fused.detach(),
    )
    if transfer is not None:
        transfer_view = image_view(transfer)
        with torch.no_grad():
            transfer_teacher = transfer_view(teacher(*transfer[:3]).image)
        floor = (teacher_image - target).detach().pow(2).mean(dim=(0, 2, 3))
        s_loss = s_loss + DISTILLATION_WEIGHT * floored_distance_loss(
            transfer_view(student(*transfer[:3]).image), transfer_teacher, floor)
    optimiser_step(student_opt, s_loss, student)
    return t_loss.item(), s_loss.item()


def validate(model: SubspaceFusionModel, cases: List[WaldCase]) -> List[Dict]:
    from .api import fuse_case

    model.eval()
    rows = []
    for case in cases:
        # The model's own output: the scene correction fitted at fusion is not the model's doing.
        fused = fuse_case(case, model=model, scene_correction=False)
        rows.append(_metrics(case, fused))
    model.train()
    return rows


def _metrics(case: WaldCase, fused: np.ndarray) -> Dict:
    return {
        "cube": case.cube,
        "sensor": case.sensor,
        "scale": case.scale,
        "psnr": psnr(case.reference, fused),
        "sam": sam(case.reference, fused),
        "ergas": ergas(case.reference, fused, case.scale),
    }


def baseline_metrics(cases: List[WaldCase]) -> Dict[str, List[Dict]]:
    return {
        "bicubic": [_metrics(c, bicubic_upsample(c.lr_hsi, c.scale, c.reference.shape[1:])) for c in cases],
        "gsa": [_metrics(c, gsa(c.lr_hsi, c.hr_msi, c.scale)) for c in cases],
    }


def summarise(rows: List[Dict]) -> Dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "sam", "ergas")}


class BudgetTooShort(ValueError):
    """The time budget ran out before the first training step finished."""


class TrainingCancelled(Exception):
    """Raised only when cancelled before anything could be validated."""


@dataclass
class TrainingRun:
    """What one co-training run needs; the data comes in through ``sample_batch``."""

    sample_batch: Callable[[np.random.Generator], List[WaldCase]]
    validation: List[WaldCase]
    teacher: FusionModelConfig
    student: FusionModelConfig
    minutes: float
    checkpoint: Path
    # 1e-4: with 1e-3, Adam's steps on ever new crops cancel and nothing carries to crops not
    # trained on; with 1e-4 the student learns within a large scene (learnability.py, README).
    lr: float = 1e-4
    steps_per_epoch: int = 400
    log_every: int = 25
    seed: int = 2024
    fresh: bool = False
    start_student: Optional[Dict] = None  # a state dict to start the student from
    baselines: Dict = field(default_factory=dict)
    device: str = "cpu"
    # Processes that prepare batches ahead of the step (0: the training process itself).
    workers: int = 0
    # Also train the same student without the teacher, from the same weights on the same
    # batches: the control that shows what distillation adds (make train; the bench compares).
    control: bool = False

    @property
    def statistics_dim(self) -> int:
        return shared_statistics_dim(self.teacher, self.student)


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The random generator of training step ``step`` (0-based): its batch is a function of
    (seed, step) alone, whichever process draws it and however often the run was resumed."""
    return np.random.default_rng([seed, step])


class StepBatches(torch.utils.data.Dataset):
    """Prepared batch (:func:`prepare_batch`) of step n, indexed by n: ``sample_batch`` called
    with :func:`step_rng` (seed, n). A map-style dataset, so that torch's DataLoader can
    prepare steps in worker processes and still hand them over in order."""

    def __init__(self, sample_batch: Callable[[np.random.Generator], List[WaldCase]], seed: int, statistics_dim: int):
        self.sample_batch, self.seed, self.statistics_dim = sample_batch, seed, statistics_dim

    def __getitem__(self, step: int):
        return prepare_batch(self.sample_batch(step_rng(self.seed, step)), self.statistics_dim)


def _single_threaded_worker(_worker_id: int) -> None:
    # Each worker prepares whole batches; BLAS threads inside every worker would only contend.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1)


def batch_stream(run: "TrainingRun", first_step: int) -> Iterator:
    """Prepared batches of steps first_step, first_step + 1, … in order, on ``run.device``:
    drawn in this process (``run.workers`` 0) or by that many DataLoader worker processes,
    which keep two steps each ready ahead (for a GPU, whose step is shorter than a batch's
    preparation on one core: 0.15 s for 6 crops, measured). Worker batches reach this
    process through shared memory (/dev/shm): a batch of 96 crops of 64² pixels and 200
    bands is about 0.3 GB, so 14 workers need about 9 GB there."""
    dataset = StepBatches(run.sample_batch, run.seed, run.statistics_dim)
    device = torch.device(run.device)
    if run.workers > 0:
        source = iter(torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=itertools.count(first_step), num_workers=run.workers,
            pin_memory=device.type == "cuda", worker_init_fn=_single_threaded_worker,
        ))
    else:
        source = (dataset[step] for step in itertools.count(first_step))

    def moved(value):
        return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value

    for lr_hsi, hr_msi, stats, reference in source:
        yield moved(lr_hsi), moved(hr_msi), {k: moved(v) for k, v in stats.items()}, moved(reference)


def shared_statistics_dim(*configs: FusionModelConfig) -> int:
    """The subspace one fit of the scene statistics serves several models with: the largest,
    since each model reads its first K components (see SubspaceFusionModel.encode)."""
    return max(config.subspace_dim for config in configs)


def co_train(
    run: TrainingRun,
    log: Callable[[str], None] = print,
    cancelled: Callable[[], bool] = lambda: False,
    progress: Optional[Callable[[float], None]] = None,
) -> Dict:
    """Online distillation: each step trains the teacher, then the student against the
    reference, the teacher's output and its fused feature. Validates after every epoch,
    keeps the best student (mean validation PSNR), checkpoints, resumes. Returns the state,
    whose models' weights are on the CPU whatever ``run.device``."""
    torch.manual_seed(run.seed)
    device = torch.device(run.device)
    teacher = SubspaceFusionModel(run.teacher)
    student = SubspaceFusionModel(run.student)
    if run.start_student is not None:
        student.load_state_dict(run.start_student)
    distiller = Distiller(teacher, student).to(device)
    teacher_opt, student_opt = distiller.optimisers(run.lr)
    models = {"teacher": teacher, "student": student}
    optimisers = [teacher_opt, student_opt]
    if run.control:
        control = SubspaceFusionModel(run.student).to(device)
        control.load_state_dict(student.state_dict())
        control_opt = torch.optim.AdamW(control.parameters(), lr=run.lr, weight_decay=1e-4)
        models["control"] = control
        optimisers.append(control_opt)
    if not run.baselines:
        run.baselines = baseline_metrics(run.validation)

    state = {"step": 0, "elapsed": 0.0, "history": [], "best": None}
    configs = {"teacher": run.teacher.to_dict(), "student": run.student.to_dict()}
    if run.checkpoint.exists() and not run.fresh:
        saved = torch.load(run.checkpoint, map_location="cpu", weights_only=False)
        # Weights of the same shapes load into another representation without an error, and a
        # correction learnt in one frame means something else in another: compare the configs.
        # Checkpoints from before this record were of the principal components or the grid.
        written = saved.get("configs")
        if written != configs and (written is not None or run.student.representation == "aligned"):
            reason = ("it does not record its models, so they are in the principal components or on the grid, "
                      f"and this run's are {run.student.representation}" if written is None else
                      "its teacher or student differs from this run's (representation, layout or subspace)")
            raise ValueError(f"the checkpoint {run.checkpoint} was written by another run's models: {reason}. "
                             "Start afresh (--fresh) or give another checkpoint")
        distiller.load_state_dict(saved["distiller"])
        teacher_opt.load_state_dict(saved["teacher_opt"])
        student_opt.load_state_dict(saved["student_opt"])
        if run.control:
            control.load_state_dict(saved["control"])
            control_opt.load_state_dict(saved["control_opt"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        log(f"resumed from {run.checkpoint} at step {state['step']} ({state['elapsed'] / 60:.1f} min done)")

    def validate_and_checkpoint(epoch_losses):
        rows = {role: validate(model, run.validation) for role, model in models.items()}
        summary = {role: summarise(role_rows) for role, role_rows in rows.items()}
        # Epoch 0 is the starting point, validated before any step: what training must beat.
        epoch = len(state["history"])
        losses = np.mean(epoch_losses, axis=0).tolist() if epoch_losses else [None] * len(models)
        state["history"].append({"epoch": epoch, "step": state["step"], "minutes": state["elapsed"] / 60, **summary,
                                 "losses": losses})
        b, g = summarise(run.baselines["bicubic"]), summarise(run.baselines["gsa"])
        log(
            f"epoch {epoch:3d} validation PSNR/SAM  "
            + "  ".join(f"{role} {m['psnr']:.2f}/{m['sam']:.2f}" for role, m in summary.items())
            + f"  GSA {g['psnr']:.2f}/{g['sam']:.2f}  bicubic {b['psnr']:.2f}/{b['sam']:.2f}"
        )
        # Each model keeps its own best epoch (mean validation PSNR), the teacher and the student
        # together since the student learnt from that teacher. A trained epoch replaces the
        # untrained base only if it is clearly better (MIN_GAIN_DB): the base's correction is
        # exactly zero and fusion then skips the network.
        best = state["best"] or {}
        for roles in (("student", "teacher"), ("control",)):
            if roles[0] not in models:
                continue
            if roles[0] in best:
                floor = state["history"][0][roles[0]]["psnr"] + MIN_GAIN_DB
                if summary[roles[0]]["psnr"] <= max(best[roles[0]]["psnr"], floor):
                    continue
            for role in roles:
                best.update({role: summary[role], f"{role}_rows": rows[role],
                             f"{role}_state": {k: v.detach().to("cpu", copy=True) for k, v in models[role].state_dict().items()}})
            if roles[0] == "student":
                best.update(epoch=epoch, step=state["step"])
        state["best"] = best
        saved = {
            "distiller": distiller.state_dict(), "teacher_opt": teacher_opt.state_dict(),
            "student_opt": student_opt.state_dict(), "torch_rng": torch.get_rng_state(), "state": state,
            "configs": configs,
        }
        if run.control:
            saved.update(control=control.state_dict(), control_opt=control_opt.state_dict())
        _atomic_write(run.checkpoint, lambda p: torch.save(saved, p))

    budget = run.minutes * 60.0
    if not state["history"]:
        validate_and_checkpoint([])
    started = time.time() - state["elapsed"]
    for model in models.values():
        model.train()
    batches = batch_stream(run, state["step"])
    stop = False
    while state["elapsed"] < budget and not stop:
        epoch_losses = []
        for _ in range(run.steps_per_epoch):
            if cancelled():
                log("cancelled: keeping the best model validated so far")
                stop = True
                break
            lr = cosine_learning_rate(run.lr, state["elapsed"] / budget)
            set_learning_rate(optimisers, lr)
            batch = next(batches)
            step_losses = list(distillation_step(distiller, teacher_opt, student_opt, batch))
            if run.control:
                c_loss = reference_loss(control, batch)
                optimiser_step(control_opt, c_loss, control)
                step_losses.append(c_loss.item())

            state["step"] += 1
            state["elapsed"] = time.time() - started
            if state["step"] == 1 and state["elapsed"] > budget:
                raise BudgetTooShort(
                    f"the time budget ({run.minutes:g} min) ran out before the first training step finished "
                    f"({state['elapsed']:.0f} s); give at least {max(1, math.ceil(state['elapsed'] * 20 / 60))} minutes"
                )
            epoch_losses.append(step_losses)
            if progress is not None:
                progress(min(1.0, state["elapsed"] / budget))
            if state["step"] % run.log_every == 0:
                means = np.mean(epoch_losses[-run.log_every :], axis=0)
                log(
                    f"step {state['step']:6d}  {state['elapsed'] / 60:6.1f}/{run.minutes:g} min  lr {lr:.2e}  "
                    + "  ".join(f"{role} loss {value:.4f}" for role, value in zip(models, means))
                )
            if state["elapsed"] >= budget:
                break
        if epoch_losses:
            validate_and_checkpoint(epoch_losses)
    batches.close()  # ends the DataLoader's worker processes, if any
    return state


def optimiser_step(optimiser, loss: torch.Tensor, model: nn.Module) -> None:
    """One update of ``model`` from ``loss``: gradients cleared, back-propagated, their global
    norm clipped to 1 (a log-MSE loss near a perfect crop has steep gradients), applied."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimiser.step()


def train(args) -> Path:
    """The bundled model's training (``make train``): the shared real cubes, every SRF."""
    # Near-zero activations and gradients turn subnormal; on x86 CPUs every operation on a
    # subnormal costs ~100× more, which made steps several times slower.
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.pack:
        print(f"loading the training set from the pack {args.pack}", flush=True)
        data: TrainingSet = read_pack(args.pack)
    else:
        print(f"loading real cubes from {args.data or 'the shared data folder'}", flush=True)
        data = load_training_set(args.data, args.corpus)
    cubes, sensors = data.training, data.sensors
    cases = validation_cases(scales=args.validation_scales, cubes_=data.validation, sensors=data.validation_sensors)
    if args.representation == "grid":
        # A model on the wavelength grid learns nothing from a cube without band centres (it is
        # the base there): those cubes would only cost steps.
        left_out = [c.name for c in cubes if c.wavelengths_nm is None]
        cubes = [c for c in cubes if c.wavelengths_nm is not None]
        if left_out:
            print(f"left out of the wavelength grid's training (no band centres): {', '.join(left_out)}", flush=True)
    print(f"training cubes: {', '.join(f'{c.name} {c.data.shape}' for c in cubes)}", flush=True)
    print(f"validation: {len(cases)} Wald cases on cubes never trained on", flush=True)
    baselines = baseline_metrics(cases)
    for name, rows in baselines.items():
        m = summarise(rows)
        print(f"  {name:8s} PSNR {m['psnr']:.2f} dB  SAM {m['sam']:.2f}°  ERGAS {m['ergas']:.2f}", flush=True)
    teacher = teacher_config(args.teacher_subspace_dim, args.representation, args.unshuffle)
    student = student_config(args.subspace_dim, args.representation, args.unshuffle, args.student_width)
    whole_scene = WholeSceneStatistics(shared_statistics_dim(teacher, student))
    run = TrainingRun(
        sample_batch=lambda rng: training_batch(cubes, sensors, rng, args.batch_size, args.crop, statistics=whole_scene),
        validation=cases,
        teacher=teacher,
        student=student,
        minutes=args.minutes,
        checkpoint=Path(args.checkpoint or DEFAULT_CHECKPOINT),
        lr=args.lr,
        steps_per_epoch=args.steps_per_epoch,
        log_every=args.log_every,
        seed=args.seed,
        fresh=args.fresh,
        baselines=baselines,
        control=not args.no_control,
        device=str(resolve_device(args.device)),
        workers=args.workers,
    )
    try:
        state = co_train(run, log=lambda message: print(message, flush=True))
    except ValueError as error:  # a checkpoint of other models, a budget too short for one step
        raise SystemExit(f"error: {error}") from None
    training_info = {
        "cubes": [f"{c.name} {list(c.data.shape)}" for c in cubes],
        "sensors": f"every SRF of {data.source} (the shared data's srf folder) plus Sentinel-2 10 m and RGB subsets",
        "scales": list(TRAINING_SCALES),
        "augmentation": "random crops, 90° rotations, flips; one random PSF per batch (Gaussian, box or both, "
        "datasets.training_psf); noise 30–45 dB SNR on 1/3 (HSI) and 1/4 (MSI) of batches; band-group MSIs "
        "for cubes without band centres; laboratory scenes drawn at a quarter weight",
        "loss": "band-averaged PSNR loss + 0.1 spectral angle (losses.py), crop borders of "
        f"{LOSS_MARGIN} LR pixels left out; student: + 0.5 distance to the teacher floored at its own error "
        "(losses.teacher_distance_loss) + 0.1 feature BCE",
        "batch_size": args.batch_size,
        "crop": args.crop,
        "seed": args.seed,
        "data": data.source,
        "device": run.device,
        "command": args.command,
    }
    output = Path(args.output)
    paths = {role: output / f"csakd_{role}.json" for role in ("teacher", "student")}
    if run.control:
        paths["control"] = output / CONTROL_BUNDLE
    card = write_bundles(paths, state, baselines, training_info, run)
    print(shipping_decision(state, run.checkpoint), flush=True)
    return card


# Credited in every model card (and the README): the bundled weights are trained and validated
# on these data sets, under the terms given here.
DATA_SOURCES = [
    "Berlin-Urban-Gradient dataset 2009 (Okujeni, van der Linden, Hostert; GFZ Data Services, "
    "doi:10.5880/enmap.2016.008), licence CC BY-SA 4.0: EnMAP-simulated Berlin cube (training), "
    "HyMap02 Berlin (validation)",
    "Contains modified EnMAP data © DLR 2022: EnMAP L2A scene ENMAP01-____L2A-DT0000001867_20220724T104526Z "
    "(Potsdam), as distributed with the EnMAP-Box test data (training: blocks A and B; validation: block C)",
    "AVIRIS Moffett Field and Jasper Ridge (NASA/JPL) and the Samson scene, public research copies of "
    "hyperspectral unmixing benchmark cubes (training: Moffett Field, Samson; validation: Jasper Ridge)",
    "Training corpus (the shared data's corpus/ folder; its README records every file's origin): AVIRIS-C San "
    "Diego airport A and B, Cuprite and Salton Sea subsets (NASA/JPL, U.S. Government data, research copies from "
    "the OT-AD, LREN, NMF-QMV and zhouyuanzxcv/Hyperspectral repositories); twelve AVIRIS-C scenes of the ABU "
    "anomaly-detection benchmark (X. Kang et al., IEEE TGRS 55(10):5600-5611, 2017; research use, with citation); "
    "HYDICE Urban (U.S. Army ERDC/TEC, freely released); ROSIS-03 Pavia (University of Pavia / DLR, research use); "
    "CAVE multispectral image database scenes cloth, feathers, oil painting, thread spools (F. Yasuma, T. Mitsunaga, "
    "D. Iso, S. K. Nayar, IEEE TIP 19(9), 2010; for the research community). None carries an explicit open licence: "
    "research use with citation; the images are not redistributed, only weights trained on them",
    "Spectral response functions of Sentinel-2A/B MSI and Landsat 8/9 OLI from the EnMAP-Box (GPL-3.0), of "
    "WorldView-2/3, QuickBird, Pléiades 1A, RapidEye and SPOT 6 from EnMAP-Box test migration data, of IKONOS "
    "from HySure (GPL-3.0): used to simulate multispectral images",
]


def best_trained_epoch(state: Dict, role: str = "student") -> Optional[Dict]:
    """The validated epoch after at least one step with the highest mean PSNR of ``role``, as
    {"epoch", "step", "gain_db"} (gain over the untrained epoch 0), or None before any such
    epoch: what training reached, shipped or not (MIN_GAIN_DB decides)."""
    history = state["history"]
    trained = [h for h in history[1:] if role in h]
    if not trained:
        return None
    top = max(trained, key=lambda h: h[role]["psnr"])
    return {"epoch": top["epoch"], "step": top["step"], "gain_db": round(top[role]["psnr"] - history[0][role]["psnr"], 4)}


def shipped_gain_db(state: Dict) -> float:
    """The shipped student's (state["best"]) mean validation PSNR over the untrained base (epoch 0), dB."""
    return state["best"]["student"]["psnr"] - state["history"][0]["student"]["psnr"]


def shipping_decision(state: Dict, checkpoint: Path) -> str:
    """One line saying which student the bundles hold and why: a trained epoch when it beat the
    untrained base by MIN_GAIN_DB on the validation mean, else the base, with the best trained
    epoch's gain and where its last weights are kept (the checkpoint)."""
    shipped, reached = state["best"]["epoch"], best_trained_epoch(state)
    if shipped > 0:
        return f"the student bundle holds epoch {shipped} (step {state['best']['step']}): {shipped_gain_db(state):+.3f} dB mean validation PSNR over the untrained base"
    if reached is None:
        return "the student bundle holds the untrained base (epoch 0): no epoch was trained"
    return (
        f"the student bundle holds the untrained base (epoch 0): no trained epoch beat it by {MIN_GAIN_DB} dB "
        f"(best: epoch {reached['epoch']}, step {reached['step']}, {reached['gain_db']:+.3f} dB); the last trained "
        f"weights are in the checkpoint {checkpoint}"
    )


def write_bundles(paths: Dict[str, Path], state: Dict, baselines: Dict, training_info: Dict, run: TrainingRun) -> Path:
    """Bundles of the best validated models, one per role in ``paths`` ({"student": card path, ...});
    returns the student's card path."""
    best = state["best"]
    training = dict(training_info)
    training.update(
        validation_cubes=sorted({r["cube"] for r in best["student_rows"]}),
        steps=state["step"],
        best_epoch=best["epoch"],
        minutes=round(state["elapsed"] / 60, 1),
        budget_minutes=run.minutes,
        # The step size decides whether anything is learnt (1e-3: nothing carries to unseen
        # crops; 1e-4: it does within a large scene; 3e-5: between some Earth-observation scenes; see
        # learnability.py), so it is on record.
        learning_rate=run.lr,
        schedule="AdamW, cosine decay to 5 % of the learning rate over the budget (co_train)",
        # What training bought over the untrained base (epoch 0), mean validation PSNR.
        gain_over_base_db=round(shipped_gain_db(state), 4),
        # What the best trained epoch reached, shipped or not (MIN_GAIN_DB decides).
        best_trained=best_trained_epoch(state),
        machine=f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__} on {torch.get_num_threads()}"
        + (f", {torch.cuda.get_device_name(run.device)}" if run.device.startswith("cuda") else ""),
    )
    common = {
        "plugin_version": __version__,
        "inputs": {
            "hsi_bands": [20, 300],
            "msi_bands": [3, 13],
            "scale": [2, 10],
            "wavelengths_required": run.student.representation == "grid",
            "note": {
                "subspace": "any sensor pair: the network works in the scene's own spectral subspace",
                "aligned": "any sensor pair: the network works in the scene's own spectral subspace, its components "
                "rotated towards fixed shapes along the bands",
                "grid": "any sensor pair whose hyperspectral bands' centres are known: the network works on a fixed "
                "wavelength grid (without the centres it adds nothing to the classical base)",
            }[run.student.representation],
        },
        "normalisation": (
            "per scene: LR-HSI band means removed, projected onto its first K principal components (those above its noise, HySime's rule), divided by one "
            "scalar (RMS of the centred LR-HSI); MSI bands standardised and mapped to the subspace by linear "
            "regressions fitted at low resolution (one per spectral class, taken by soft membership); the result "
            "made consistent with the MSI by a linear model of it in the subspace"
            + ("; the network sees the components rotated towards Legendre polynomials of the band number "
               "(orthogonal Procrustes, model.aligned_frame) and its correction rotated back"
               if run.student.representation == "aligned" else "")
        ),
        "training": training,
        "data_sources": DATA_SOURCES,
        "history": state["history"],
    }
    baseline_summary = {name: summarise(rows) for name, rows in baselines.items()}
    configs = {"teacher": run.teacher, "student": run.student, "control": run.student}
    bundles = {}
    for role, path in paths.items():
        model = SubspaceFusionModel(configs[role])
        model.load_state_dict(best[f"{role}_state"])
        card = dict(common)
        card.update(
            role=role,
            name=Path(path).stem,
            parameters=count_parameters(model),
            macs_per_256_tile=_macs_256(model, 4),
            validation={
                "protocol": "Wald (protocol.md); PSNR per-band peak, SAM degrees, ERGAS",
                "summary": {role: best[role], **baseline_summary},
                "cases": best[f"{role}_rows"],
                "baselines": baselines,
            },
        )
        bundles[role] = save_bundle(path, model, card)
        print(f"wrote {bundles[role]}", flush=True)
    return bundles["student"]


def _macs_256(model: SubspaceFusionModel, scale: int) -> int:
    # The network's own channels: the subspace's K or the wavelength grid's points.
    c = model.config.channels
    return count_macs(model.network, (1, c, 256 // scale, 256 // scale), (1, c, 256, 256))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="resources/models", help="folder for the bundles and the checkpoint")
    parser.add_argument("--minutes", type=float, default=45.0, help="time budget of the whole run (resumes count)")
    parser.add_argument("--steps-per-epoch", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--crop", type=int, default=64)
    # 5e-5 (peak of the cosine decay): 75 minutes on 2601 steps moved the validation mean up
    # steadily (the control +0.012 dB, the distilled student +0.006 dB), where 3e-4 moved
    # nothing and 1e-4 swung (README, 'Where it stands'; the probe, learnability.py, finds 3e-5
    # best between Earth-observation scenes, 1e-5 slower).
    parser.add_argument("--lr", type=float, default=5e-5,
                        help="peak AdamW learning rate of the cosine decay; a larger --batch-size takes a larger one "
                        "(the probe learned as fast per crop with 4 times the batch at about 3 times the rate: learnability.py)")
    parser.add_argument("--subspace-dim", type=int, default=SUBSPACE_DIM, help="the student's spectral subspace")
    parser.add_argument("--teacher-subspace-dim", type=int, default=TEACHER_SUBSPACE_DIM)
    parser.add_argument("--representation", choices=REPRESENTATIONS, default="subspace",
                        help="the networks' channels: the scene's principal components, the same rotated towards "
                        "fixed shapes along the bands (aligned), or a fixed wavelength grid (needs band centres; cubes "
                        "without them are left out)")
    parser.add_argument("--unshuffle", type=int, default=4,
                        help="the networks' space-to-depth factor: 4 the bundled layout, 1 the paper's full-resolution "
                        "one, the only one in which the student's correction carried to unseen scenes (learnability.py)")
    parser.add_argument("--student-width", type=int, default=32, help="the student's features (growth half of it)")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--validation-scales", type=int, nargs="+", default=list(VALIDATION_SCALES),
                        help="scales of the validation cases (fewer = faster epochs)")
    parser.add_argument("--data", default=None, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--pack", default=None,
                        help="read the training set from this pack (python -m csakd_qgis.training_set) instead of --data")
    parser.add_argument("--device", default="cpu", help="cpu (the default), cuda, cuda:N or auto (a GPU when torch sees one)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes preparing batches ahead of the step (0: none); for a GPU, most of the cores")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--no-corpus", dest="corpus", action="store_false",
                        help="train on the five training cubes only, without the shared corpus")
    parser.add_argument("--no-control", action="store_true",
                        help="do not train the student without the teacher beside the distilled one")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "-m", "csakd_qgis.train"] + list(sys.argv[1:] if argv is None else argv))
    if args.pack and not Path(args.pack).is_file():
        parser.error(f"--pack {args.pack}: no such file; write it with `make pack` "
                     f"(python -m csakd_qgis.training_set {args.pack})")
    if args.pack and not args.corpus:
        parser.error("--no-corpus chooses what is read from the shared data; a pack holds what it was written "
                     "with: write one without the corpus (python -m csakd_qgis.training_set FILE --no-corpus)")
    if args.workers < 0:
        parser.error(f"--workers must be 0 or more, got {args.workers}")
    if layout_error(args.unshuffle, args.student_width, "--student-width"):
        parser.error(layout_error(args.unshuffle, args.student_width, "--student-width"))
    try:
        resolve_device(args.device)
    except (ValueError, RuntimeError) as error:
        parser.error(f"--device {args.device}: {error}")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
