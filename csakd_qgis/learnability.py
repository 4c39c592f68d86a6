"""Is any of the base's remaining error learnable? A held-out probe of the student's correction.

The student starts as its untrained base (its output convolution is zero, so its correction is
exactly zero, model.py) and is trained with the reference term of every model here
(losses.teacher_loss) in two ways, each measured against that base as a change of that loss in
dB: −10/ln 10 per unit. The loss is mainly a mean over crops and bands of ln MSE, whose change
in those units is the change of band-averaged PSNR per crop; its small spectral-angle term and
its error floor (losses.py) make the figure an approximation of the PSNR change:

* **generalisation**: on a fresh Wald batch at every step, cut from the training cubes, and
  measured on fixed batches cut from each held-out cube (same sensor, same scale, one PSF per
  batch drawn as in training), reported per cube and as the mean over cubes, so that one scene's
  loss cannot hide behind, or swamp, another's gain. A gain here is what training can ship.
* **memorisation** (the control): from the same start, on a few fixed batches seen again and
  again, measured on those batches and on the held-out ones. A gain on its own batches shows
  that the training path works (gradients reach the correction, the step size is right), so that
  a zero held-out gain means the correction found does not carry, not that nothing was trained.

The default pair is the closest pair of Earth-observation cubes the shared data offers: blocks
A and B of the EnMAP Potsdam scene for training, its block C for the held-out crops, one MSI
(Sentinel-2's 10 m bands) and one scale (4), so the scene, sensor, basis and statistics barely
change between training and test.

The step size decides whether anything is learnt, and in the bundled layout what carries needs a
smaller step than what fits: at a learning rate of 1e-3 the held-out gain stays 0.000 dB on
every pair tried (Adam's steps on ever new crops cancel, and the correction stays near zero); at
1e-4 it learns within a large scene but swings between −0.02 and +0.08 dB from ten
Earth-observation cubes to AVIRIS Jasper Ridge; at 3e-5, the default, that pair rises steadily
to +0.16 dB after 9000 steps, though from the same cubes to HyMap02 Berlin it falls to −0.05 dB
at 3000 (README, 'Where it stands'). ``--ema`` also measures the weights' moving average, which
smooths the swings. The full-resolution student in the aligned frame (below) tolerates larger
steps: from the 23 cubes, after 3000 steps, 1e-4 / 2e-4 / 4e-4 / 8e-4 read +0.094 / +0.110 /
+0.104 / +0.097 dB on the held-out crops and +0.063 / +0.070 / +0.108 / +0.108 dB on ``make
bench``'s 63 fusion cases, better on 55 / 51 / 49 / 56 of them (one run each; the 9000-step run
below read +0.098 dB on the 63 cases at its step 3000, better on 43). In one run longer at a
constant step it lost on HyMap02 Berlin: at 4e-4 with a bundle every 3000 steps
(``--save-every``), the 63 cases read +0.098 / +0.051 / −0.086 dB after 3000 / 6000 / 9000 steps,
as Berlin's crops fell to −0.539 dB (block C and Jasper Ridge stayed ahead). With the
step decayed (``--decay``, from 8e-4, 3000 steps) the crops read +0.105 dB and the 63 cases
+0.114 dB, better on 57.

What counts is the crops seen, not the steps: with four times the batch (24 crops) about three
times the step (1e-4) learns about as fast per crop (+0.15 dB on Jasper Ridge at 36,000 crops,
+0.09 at 38,400, where 6 crops at 3e-5 read +0.12 at 24,000 and +0.13 at 39,000), so a run on
faster hardware grows the batch and the step together. Less gradient noise does not change what
carries: at 24 crops and 1e-4 HyMap02 Berlin still falls (−0.06 dB at 1500 steps). More scenes
do: with the thirteen cubes without band centres added to the ten (``--train ... abu hydice``),
Berlin reads −0.006 dB at 3000 steps instead of −0.049, and Jasper Ridge +0.083 instead of
+0.099; twice the crops (24 per step at 1e-4) do not raise either.

What the network's channels mean matters (a plain network carries on a fixed wavelength grid
and not in the scene's subspace, representation_probe.py), and so does the student's layout: in
the bundled one (``unshuffle`` 4, 32 features: each 4×4 block of pixels squeezed into 32
features) it carries in neither representation; in the paper's full-resolution layout
(``--unshuffle 1``) it does. Ten cubes → EnMAP Potsdam block C / HyMap02 Berlin / AVIRIS Jasper
Ridge, Sentinel-2 10 m, ×4, 1e-4, gains in dB at 750 steps:

* grid, ``unshuffle`` 4, 32 features: −0.058 / −0.031 / +0.017;
* grid, ``unshuffle`` 1, 16 features: +0.191 / −0.566 / +0.481 (+0.519 on Jasper Ridge at 500);
  with its correction kept out of what the MSI sees (model.msi_null_projector, now part of the
  model) +0.176 / −0.184 / +0.397 at 600 steps;
* subspace, ``unshuffle`` 4, 32 features (the bundled student): +0.003 / −0.004 / +0.007;
* subspace, ``unshuffle`` 1, 16 features: −0.015 / −0.077 / +0.285.
* aligned, ``unshuffle`` 1, 16 features (with the MSI null-space projection, which the lines
  above predate): +0.099 / −0.087 / +0.240; at 1500 steps −0.030 / −0.100 / +0.342, and with
  the thirteen cubes without band centres added (``... abu hydice``) +0.032 / +0.009 / +0.103.
  Saved (``--save``) and fused on ``make bench``'s 63 network-gain cases (README, 'Where it
  stands'), the 23-cube student is better than its base on 56 of them, +0.033 dB on average
  (after 3000 steps on 55, +0.063 dB; the principal components in this layout after 1500: on
  54, +0.017 dB).
* the same 23 cubes and 1500 steps in cheaper layouts of the aligned frame: ``unshuffle`` 1 with
  12 features +0.012 / +0.035 / +0.062 (63 cases: +0.026 dB, better on 56), with 8 features
  +0.017 / +0.018 / +0.039 (+0.019 dB, on 54); ``unshuffle`` 2 with 16 features −0.002 / +0.004
  / +0.012 (+0.004 dB, on 50), with 32 features −0.004 / +0.001 / +0.030 (+0.003 dB, on 50).
  Half the resolution carries a tenth as far; a narrower full-resolution student saves little
  time (README, 'Where it stands').

HyMap02 Berlin loses with every student that carries, trained on the ten cubes; with the
thirteen added, the aligned one gains a little there on average (+0.009 dB on crops, +0.013 over
Berlin's 21 fusion cases) and still loses on 7 of those 21. The grid input is the base's
spectrum less the scene's mean spectrum: with the mean the student could not even fit 4 fixed
batches (+0.003 dB after 80 steps at 1e-4, centred +0.72, the subspace student +0.26); on
uncentred features its cross self-attention's gates saturate (README, 'Where it stands').

``--distil`` co-trains the teacher and a second student with the distillation loss beside the
plain student, on the same batches (train.distillation_step, as ``make train`` does), so that
the plain one is its control. Within a CAVE scene (``--within cave_feathers --sensor RGB --crop
64 --lr 1e-4``) at 1000 steps: the plain student +0.235 dB, the distilled one +0.212, the
teacher +0.294; with the distance term of the reference term's form (ln MSE(S, T),
losses.teacher_distance_loss says why it was replaced) the distilled student read +0.165.

``--transfer`` (with ``--distil``) gives the distilled student a transfer set (Hinton et al.
2015): at every step it also learns the teacher's output on a fresh batch of the held-out
cubes' inputs, never their reference (train.distillation_step): inputs a student without a
teacher cannot learn from. The held-out gains are then transductive (the distilled student has
seen those inputs). Same scene and flags, one thread (``--threads 1``, OMP_NUM_THREADS=1), one
run, at 500 / 750 / 1000 steps, the distilled student was ahead of its control by hundredths
of a dB, less by 1000 steps, as the teacher's own lead shrank:

* the student without the teacher +0.070 / +0.155 / +0.226 dB;
* the distilled student with the transfer set +0.083 / +0.177 / +0.232;
* the teacher +0.108 / +0.202 / +0.234.

With the teacher frozen at its untrained state (an ablation run for this, not an option; it
starts at −0.013 dB) the same transfer set slowed the student (+0.003 / +0.020 at 250 / 500
steps, its control +0.006 / +0.070): what helps is what the teacher learnt, not a pull towards
the untrained teacher's output. A one-off variant not kept in the code, the distance term only
on bands where the teacher's error is below the student's and no transfer set, trailed as the
plain term does (+0.065 at 500 steps against the control's +0.070). The figures move a little
with the threads: the run above without OMP_NUM_THREADS=1 read +0.235 for the control at 1000.

The lead does not hold from scene to scene. The same command on the other three CAVE scenes
(``--within cave_cloth`` / ``cave_oil_painting`` / ``cave_thread_spools``, one thread each), at
250 / 500 / 750 / 1000 steps, control → distilled student with the transfer set (teacher):

* cloth: +0.233 / +0.228 / +0.260 / +0.236 → +0.239 / +0.240 / +0.272 / +0.240 (+0.246 /
  +0.223 / +0.239 / +0.175): ahead by 0.004–0.012 dB, though its teacher fell behind both
  from 500 steps on (a lead within what the thread count moves);
* oil painting: −0.205 / −0.297 / −0.368 / −0.424 → −0.221 / −0.332 / −0.436 / −0.531
  (−0.287 / −0.383 / −0.540 / −0.601);
* thread spools: +0.018 / −0.056 / −0.159 / −0.193 → +0.009 / −0.067 / −0.197 / −0.300
  (−0.039 / −0.174 / −0.331 / −0.487).

On the last two every model loses on the bottom quarter from 500 steps on, more with every step;
the teacher, the largest model, loses most, and the distilled student, pulled towards it, ends
0.107 dB behind its control at 1000 steps on both. What makes them lose there is, as far as
measured, the components' frame (below: in the aligned frame all three gain at 500 steps,
without a transfer set); it does not look like spectra the top lacks: the median spectral angle
of the bottom quarter's pixels to 12 clusters of the top's spectra (5.6° and 8.9°) exceeds the
top's own (5.3° and 6.9°) by less than on feathers (6.7° against 4.3°), which gains. At 1000
steps, over the four scenes, the distilled student leads on two by less than 0.01 dB and trails
on two by 0.107, and the teacher is ahead of both on feathers alone. So a transfer set is no
default: on two scenes of four it cost a tenth of a dB, and without a reference there is no way
to tell which scenes those are.

The probe's figures are gains on crops. Through fusion of whole images they keep their sign,
not their size: the plain student after 500 steps within each CAVE scene, its bottom quarter
fused as one RGB ×4 Wald case (scene correction off), gained +0.155 / +0.007 / −0.108 /
−0.255 dB PSNR on cloth / feathers / oil painting / thread spools, where its crops read
+0.228 / +0.070 / −0.297 / −0.056.

The losses on oil painting and thread spools come from the models' channels. They are
each part's own principal components, fitted on that part as fusion fits them on each scene;
the 16-component subspaces of top and bottom coincide (ten largest principal cosines ≥ 0.99 in
all four scenes), their coordinates do not: on cloth and feathers the first five components'
signed cosines between the parts are ≥ 0.95, on oil painting the second is flipped (−0.88) and
the others mixed (0.72–0.91), on thread spools the second to fourth are flipped (−0.80, −0.61,
−0.66) and the fifth mixed (0.22) (:func:`frame_agreement`; ``--within`` prints them).
``--representation aligned`` (model.aligned_frame) gives the network the same components
rotated towards fixed shapes along the bands, whose frames agree between the parts (≥ 0.95 on
the first nine components in all four scenes), and leaves the base as it is. The plain
student, one thread, 500 steps, its crops' gain at 125 / 250 / 375 / 500 steps and the whole
bottom quarter's (``--whole-image``), against the principal components' (crops at 500 steps;
whole image; on cloth and feathers the crops are the distillation runs' control above, same
seed and batches):

* cloth: +0.214 / +0.327 / +0.341 / +0.360 dB, whole +0.242 dB (+0.228; +0.155);
* feathers: +0.001 / +0.002 / +0.026 / +0.078, whole +0.002 (+0.070; +0.007);
* oil painting: +0.521 / +0.543 / +0.593 / +0.597, whole +0.700 (−0.297; −0.108);
* thread spools: −0.004 / +0.007 / +0.069 / +0.075, whole +0.175 (−0.056; −0.255).

With ``--distil`` in this frame (crops at 500 steps, then whole-image PSNR; plain / distilled /
teacher): oil painting +0.597 / +0.615 / +0.735 dB, whole 45.630 / 45.672 dB (teacher not
fused); cloth +0.360 / +0.355 / +0.401, whole 39.631 / 39.626 / 39.672; thread spools +0.073 /
+0.057 / +0.071, whole 50.666 / 50.627 / 50.800 (the plain student there read +0.073 and 50.666,
alone +0.075 and 50.661). The teacher now gains where it lost most, and leads on both whole
images fused with it; the distilled student leads its control on oil painting only. With
``--transfer`` as well (whole-image PSNR; plain / distilled / teacher): oil painting 45.627 /
45.675 / 45.832 dB, cloth 39.629 / 39.606 / 39.676, thread spools 50.666 / 50.648 / 50.800,
feathers 46.370 / 46.378 / 46.432 (crops at 500 steps +0.593 / +0.618 / +0.733, +0.361 /
+0.340 / +0.404, +0.073 / +0.066 / +0.071, +0.070 / +0.060 / +0.105): the teacher leads on all
four whole images, the distilled student leads its control on two and trails on two (+0.004 dB
on average).

``--teacher-steps 500`` (with ``--distil``, no transfer set; the teacher first trains alone for
500 steps, then all three co-train as with ``--distil``, the teacher still learning) widens the
teacher's lead far more than the distilled student's. Crops at 500 steps, then whole-image PSNR,
plain / distilled / teacher: oil painting +0.593 / +0.630 / +1.009 dB, 45.627 / 45.718 / 46.126
dB; cloth +0.361 / +0.360 / +0.475, 39.629 / 39.619 / 39.730; thread spools +0.073 / +0.080 /
+0.147, 50.666 / 50.652 / 50.947; feathers +0.070 / +0.097 / +0.250, 46.370 / 46.368 / 46.488.
The teacher leads by 0.101 to 0.408 dB on the whole images; the distilled student leads its
control on three scenes' crops and on one whole image (oil painting, +0.091 dB), +0.016 dB
whole-image PSNR on average.

Between scenes the aligned frame changes nothing in the bundled layout: from the ten
Earth-observation cubes of the examples below to EnMAP Potsdam block C / HyMap02 Berlin / AVIRIS
Jasper Ridge (their third command without ``--steps 9000 --ema 0.999``, with ``--representation
aligned`` or ``subspace`` and ``--held-out Jasper HyMap02 "Potsdam block C" --lr 1e-4 --steps
1000 --memorise-steps 0 --threads 1``; Sentinel-2 10 m, ×4) the aligned student read −0.100 /
−0.038 / +0.015 dB at 1000 steps, the principal components' −0.108 / −0.041 / +0.038.

What is learnt at a scene's reduced pair's resolution, a step coarser than the fusion (the
reference scene adaptation, user_training.adapt_to_scene, learns from), and how much of it holds
at full resolution: ``--train-window ROWS COLS`` trains on the top part's block next to the
held-out quarter only, ``--train-reduced [FACTOR]`` on the top part degraded as an LR-HSI is
(:func:`training_window`, :func:`reduced_cube`), ``--held-out-reduced`` measures on the bottom
quarter reduced by the same factor. Aligned frame, 500 steps, one thread, one seed, whole-image
PSNR gain over the base in dB on cloth / feathers / oil painting / thread spools:

* the whole top part (196,608 reference pixels): +0.242 / +0.002 / +0.700 / +0.175;
* 256 × 256 next to the held-out quarter: +0.367 / −0.030 / +1.115 / +0.011;
* 128 × 128 (16,384 reference pixels): +0.365 / −0.198 / +1.018 / −1.593;
* the top part reduced ×2 (49,152): +0.184 / +0.015 / +0.004 / −0.172;
* the top part reduced ×4 (12,288, at a ×4 reduced pair's resolution): +0.083 / −0.276 / −0.070
  / −0.129.

Reduced ×2 and measured on the bottom quarter reduced ×2 (a separate run, whose batches differ),
cloth gained +0.462 dB (42.145 → 42.607) and oil painting −0.003. On cloth what is learnt at the
coarser resolution holds at full resolution in part, on oil painting nothing is learnt there;
on feathers and thread spools the 128² window lost at full resolution too, so they say nothing
about resolution (pixel count, resolution and the window's position were not separated).

``--train`` and ``--held-out`` take words of any shared cube's name (training, validation or
corpus); a cube named by both is refused, since its held-out gain would be memorisation.
``--within`` instead trains on the top three quarters of one cube and measures on its bottom
quarter (e.g. a 512×512 CAVE laboratory scene: more pixels of one kind than any EO cube here).

    python -m csakd_qgis.learnability --steps 1000
    python -m csakd_qgis.learnability --within cave_feathers --sensor RGB --crop 64 --lr 1e-4
    python -m csakd_qgis.learnability --train "Potsdam block A" "Potsdam block B" "simulated Berlin" \\
        Moffett Samson cuprite salton sandiego rosis --held-out Jasper --steps 9000 --ema 0.999
    python -m csakd_qgis.learnability --train "Potsdam block A" "Potsdam block B" "simulated Berlin" \\
        Moffett Samson cuprite salton sandiego rosis --held-out Jasper HyMap02 "Potsdam block C" \\
        --representation grid --unshuffle 1 --width 16 --lr 1e-4 --evaluate-every 250
    python -m csakd_qgis.learnability --within cave_feathers --sensor RGB --crop 64 --lr 1e-4 --distil \\
        --steps 1000 --evaluate-every 250 --memorise-steps 0 --held-out-batches 4
    OMP_NUM_THREADS=1 python -m csakd_qgis.learnability --within cave_feathers --sensor RGB --crop 64 \\
        --lr 1e-4 --distil --transfer --steps 1000 --evaluate-every 250 --memorise-steps 0 \\
        --held-out-batches 4 --threads 1
    OMP_NUM_THREADS=1 python -m csakd_qgis.learnability --representation aligned --within cave_oil_painting \\
        --sensor RGB --crop 64 --lr 1e-4 --steps 500 --evaluate-every 125 --memorise-steps 0 \\
        --held-out-batches 4 --threads 1 --whole-image
    OMP_NUM_THREADS=1 python -m csakd_qgis.learnability --representation aligned --within cave_oil_painting \\
        --sensor RGB --crop 64 --lr 1e-4 --steps 500 --evaluate-every 125 --memorise-steps 0 \\
        --held-out-batches 4 --threads 1 --whole-image --train-reduced
    OMP_NUM_THREADS=1 python -m csakd_qgis.learnability --representation aligned --within cave_oil_painting \\
        --sensor RGB --crop 64 --lr 1e-4 --steps 500 --evaluate-every 125 --memorise-steps 0 \\
        --held-out-batches 4 --threads 1 --whole-image --distil --teacher-steps 500
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .datasets import (
    HyperspectralCube,
    WholeSceneStatistics,
    corpus_cubes,
    make_wald_case,
    training_batch,
    training_cubes,
    validation_cubes,
    validation_sensors,
)
from .bundle import save_bundle
from .network import count_parameters
from .model import REPRESENTATIONS, SubspaceFusionModel, aligned_frame
from .srf import SensorResponse
from .train import (SUBSPACE_DIM, Distiller, cosine_learning_rate, distillation_step, layout_error, optimiser_step,
                    prepare_batch, reference_loss, set_learning_rate, shared_statistics_dim, student_config, teacher_config,
                    validate)

DB_PER_LOG_MSE = 10.0 / math.log(10.0)


@dataclass
class ProbeResult:
    """What :func:`probe` measured, every gain over the base as the loss's change in dB (close to
    the change of band-averaged PSNR, see the module docstring).

    ``held_out_gain_db``: (step, mean over the held-out cubes of each cube's gain) of the
    generalisation run, one per ``evaluate_every`` steps; ``held_out_gain_by_cube_db``: the same
    steps' gain on each held-out cube by its name; ``distilled_gain_db`` and
    ``teacher_gain_db``: (step, mean gain over the student's base) of the same student
    co-trained with the teacher (and its transfer set where ``transfer`` was given) and of that
    teacher, empty unless ``distil`` was given (the plain run is then the distilled student's
    control: same start, same labelled batches), and
    ``teacher_base_gain_db`` the untrained teacher's (its larger subspace);
    ``memorised_gain_db`` and ``memorised_held_out_gain_db``: the memorisation run's gain on its
    own fixed batches and on the held-out ones (mean over cubes) after its last step;
    ``held_out_gain_ema_db``: (step, mean gain) of the generalisation run's exponential moving
    average of the weights at the same steps, empty unless ``ema_decay`` was given;
    ``whole_image``: held-out cube name → model ("base", "trained", and "distilled" and
    "teacher" with ``distil``) → {"psnr": dB, "sam": degrees} of the whole held-out cube fused
    as one Wald case after the last step, empty unless ``whole_image`` was given.
    """

    steps: int
    held_out_gain_db: List[Tuple[int, float]] = field(default_factory=list)
    held_out_gain_by_cube_db: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)
    distilled_gain_db: List[Tuple[int, float]] = field(default_factory=list)
    teacher_gain_db: List[Tuple[int, float]] = field(default_factory=list)
    teacher_base_gain_db: float = float("nan")
    held_out_gain_ema_db: List[Tuple[int, float]] = field(default_factory=list)
    memorised_gain_db: float = float("nan")
    memorised_held_out_gain_db: float = float("nan")
    whole_image: Dict[str, Dict[str, Dict[str, float]]] = field(default_factory=dict)


def mean_loss(model: SubspaceFusionModel, batches: Sequence) -> float:
    """Mean :func:`reference_loss` over prepared batches, without gradients. The network is run
    even while its correction is zero (the skip of inference is switched off here), so that the
    base and a trained model are measured on the same path."""
    skip = model.skip_zero_correction
    model.skip_zero_correction = False
    try:
        with torch.no_grad():
            return float(np.mean([reference_loss(model, b).item() for b in batches]))
    finally:
        model.skip_zero_correction = skip


def probe(
    train_cubes: Sequence[HyperspectralCube],
    held_out_cubes: Sequence[HyperspectralCube],
    sensor: SensorResponse,
    scale: int = 4,
    steps: int = 1000,
    memorise_batches: int = 8,
    memorise_steps: int = 300,
    held_out_batches: int = 8,
    batch_size: int = 6,
    crop: int = 48,
    lr: float = 3e-5,
    evaluate_every: int = 100,
    seed: int = 1,
    ema_decay: float = 0.0,
    representation: str = "subspace",
    unshuffle: int = 4,
    width: int = 32,
    save: Optional[str] = None,
    save_every: int = 0,
    decay: bool = False,
    distil: bool = False,
    transfer: bool = False,
    whole_image: bool = False,
    teacher_steps: int = 0,
    log: Callable[[str], None] = print,
) -> ProbeResult:
    """Train the student from its base on ``train_cubes`` and measure it on ``held_out_cubes``
    (see the module docstring), both paired with ``sensor``'s MSI at ``scale``.

    Crops are ``crop`` HR pixels (cut to a multiple of ``scale``), ``batch_size`` to a batch, each
    crop with its whole cube's scene statistics (datasets.WholeSceneStatistics), as in
    ``make train``; ``held_out_batches`` fixed batches per held-out cube. A cube without band centres is paired with MSIs of band groups instead of
    ``sensor`` (as in training). ``steps`` or ``memorise_steps`` 0 leaves that run out. One
    generator (``seed``) draws every batch in turn, the held-out ones first and the control's
    last, so the control's batches depend on ``steps``; torch's global seed is set to ``seed``
    before each run. ``ema_decay`` in (0, 1) also measures the generalisation run's weights
    averaged with that decay (torch.optim.swa_utils.AveragedModel, starting from the first step's
    weights), which smooths the swings of single steps. ``representation`` is the student's
    (model.REPRESENTATIONS; "grid" needs every cube's band centres), ``unshuffle`` and ``width``
    its layout (train.student_config; 1 is the paper's full-resolution layout). ``save``: a model
    bundle path (bundle.save_bundle) for the generalisation run's student after its last step,
    so that fusion and the benchmark can run it; with ``save_every`` > 0 also after every
    ``save_every`` steps, as ``save``'s name with ``_step{N}`` before its suffix, so that a long run
    leaves bundles to fuse on the way, and an interrupted one a bundle at most that many steps old
    (weights only: the optimiser's state is not kept, so a run cannot resume from it).
    ``decay``: the generalisation run's step (with ``distil`` also the teacher's and the distilled
    student's) decays over its ``steps`` from ``lr`` as ``make train``'s does
    (train.cosine_learning_rate); otherwise it stays ``lr``.
    ``distil``: the generalisation run also
    co-trains the bundled teacher (train.teacher_config, same channels and layout) and, from the
    student's start, a second student with the distillation loss (train.distillation_step, as
    ``make train`` does), on the same batches, so that the plain student is its control and
    the held-out gains show what the teacher adds (every batch then carries the teacher's
    subspace; the student reads its first components, exactly its own fit). ``transfer`` (with
    ``distil``): the distilled student also learns the teacher's output on a fresh batch of the
    held-out cubes at every step, their reference dropped (train.distillation_step's transfer
    set), drawn by a generator of its own so that every other batch stays the same.
    ``whole_image``: after the last step, also fuse each held-out cube whole as one Wald case
    (``sensor``'s MSI, ``scale``, the Wald Gaussian PSF; train.validate, i.e. fusion with the
    scene correction off) with the base, the trained student, the distilled one and the
    teacher, and record their PSNR and SAM: what fusion gets, where the crops' figures are the
    loss's change on crops (a cube without band centres is skipped, said in the log).
    ``teacher_steps`` (with ``distil``): the teacher first trains alone for that many steps on
    batches of a generator of its own (so every other batch stays the same), then all three
    co-train as with ``distil`` alone, the teacher still learning: distillation starts from a
    teacher that has learnt, closer to Hinton et al.'s (2015) offline distillation, whose teacher
    is fixed, than to the CSAKD paper's co-training from the start. Raises
    ValueError when ``transfer`` or ``teacher_steps`` is asked without ``distil``, ``transfer`` with
    cubes of different band counts, ``teacher_steps`` below 0, when ``ema_decay`` is outside [0, 1),
    for another representation or a grid without band centres, and (from
    datasets.training_batch) when ``sensor`` does not cover a cube's bands or a cube is too small
    for ``scale``.
    """
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (0: no average), got {ema_decay}")
    if teacher_steps < 0:
        raise ValueError(f"teacher_steps must be 0 or more, got {teacher_steps}")
    if save_every < 0:
        raise ValueError(f"save_every must be 0 or more (0: only after the last step), got {save_every}")
    if save_every and not save:
        raise ValueError("saving on the way (save_every, --save-every) needs a bundle path: add save (--save)")
    if teacher_steps and not distil:
        raise ValueError("a teacher trained first (teacher_steps, --teacher-steps) needs the teacher: add distil=True "
                         "(--distil)")
    if transfer and not distil:
        raise ValueError("a transfer set (transfer=True, --transfer) needs the teacher: add distil=True (--distil)")
    if transfer and len({c.data.shape[0] for c in list(train_cubes) + list(held_out_cubes)}) > 1:
        raise ValueError("a transfer set needs the held-out cubes to have the training cubes' bands (the teacher's "
                         "error per band on the training crops floors its distance on the transfer crops): use "
                         "--within, or cubes of one sensor")
    config = student_config(representation=representation, unshuffle=unshuffle, width=width)
    if representation == "grid":
        require_band_centres(list(train_cubes) + list(held_out_cubes))
    for cube in list(train_cubes) + list(held_out_cubes):
        if cube.wavelengths_nm is None:
            log(f"{cube.name} has no band centres: paired with band-group MSIs instead of {sensor.name}")
    torch.set_flush_denormal(True)
    rng = np.random.default_rng(seed)
    teacher_layout = teacher_config(representation=representation, unshuffle=unshuffle)
    dim = shared_statistics_dim(teacher_layout, config) if distil else SUBSPACE_DIM
    statistics = WholeSceneStatistics(dim)

    def batch_of(cubes, generator=rng):
        cases = training_batch(list(cubes), [sensor], generator, batch_size, crop, scales=(scale,),
                               statistics=statistics)
        return prepare_batch(cases, dim)

    transfer_rng = np.random.default_rng([seed, 1])

    def unlabelled_batch():
        return batch_of(held_out_cubes, transfer_rng)[:3] + (None,)

    # Per cube, each its own fixed batches, in the order of the representation probe
    # (representation_probe.py), so that the two probes see the same held-out crops.
    held_out = {c.name: [batch_of([c]) for _ in range(held_out_batches)] for c in held_out_cubes}
    result = ProbeResult(steps=steps, held_out_gain_by_cube_db={name: [] for name in held_out})

    def fresh_student() -> Tuple[SubspaceFusionModel, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = SubspaceFusionModel(config)
        return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

    model, optimiser = fresh_student()
    base_held_out = {name: mean_loss(model, batches) for name, batches in held_out.items()}
    averaged = None
    if ema_decay:
        averaged = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay))

    def gains(trained: SubspaceFusionModel) -> Dict[str, float]:
        # Each held-out cube's change of the mean loss over its batches, in dB.
        return {name: -(mean_loss(trained, batches) - base_held_out[name]) * DB_PER_LOG_MSE
                for name, batches in held_out.items()}

    def mean_gain(trained: SubspaceFusionModel) -> float:
        return float(np.mean(list(gains(trained).values())))

    distiller = None
    if distil and steps:
        distilled, _ = fresh_student()  # the same start as the plain student, its control
        distiller = Distiller(SubspaceFusionModel(teacher_layout), distilled)
        teacher_opt, distilled_opt = distiller.optimisers(lr)
        result.teacher_base_gain_db = mean_gain(distiller.teacher)
        log(f"distillation: the untrained teacher ({teacher_layout.subspace_dim} components) starts at "
            f"{_db(result.teacher_base_gain_db)} dB against the student's base")
        teacher_rng = np.random.default_rng([seed, 2])
        for _ in range(teacher_steps):
            optimiser_step(teacher_opt, reference_loss(distiller.teacher, batch_of(train_cubes, teacher_rng)),
                           distiller.teacher)
        if teacher_steps:
            log(f"distillation: the teacher trained alone for {teacher_steps} steps reads "
                f"{_db(mean_gain(distiller.teacher))} dB against the student's base")

    def save_student(path: str, steps_taken: int) -> None:
        card = {"name": Path(path).stem, "role": "student", "parameters": count_parameters(model),
                "inputs": {"wavelengths_required": representation == "grid"}, "probe": {
            "steps": steps_taken, "lr": lr, "decay": decay, "batch_size": batch_size, "crop": crop, "scale": scale,
            "sensor": sensor.name, "train": [c.name for c in train_cubes], "held_out_gain_db": result.held_out_gain_by_cube_db}}
        log(f"saved the trained student after {steps_taken} steps as {save_bundle(path, model.eval(), card)}")
        model.train()

    # Every model of the run on the same schedule, so that the distilled student and the teacher
    # stay comparable with their control.
    run_optimisers = [optimiser] + ([teacher_opt, distilled_opt] if distiller is not None else [])
    started = time.time()
    for step in range(1, steps + 1):
        if decay:
            set_learning_rate(run_optimisers, cosine_learning_rate(lr, (step - 1) / steps))
        batch = batch_of(train_cubes)
        optimiser_step(optimiser, reference_loss(model, batch), model)
        if distiller is not None:
            distillation_step(distiller, teacher_opt, distilled_opt, batch,
                              transfer=unlabelled_batch() if transfer else None)
        if averaged is not None:
            averaged.update_parameters(model)
        if step % evaluate_every == 0 or step == steps:
            by_cube = gains(model)
            for name, value in by_cube.items():
                result.held_out_gain_by_cube_db[name].append((step, value))
            result.held_out_gain_db.append((step, float(np.mean(list(by_cube.values())))))
            line = (f"step {step:5d} ({step * batch_size} crops)  {time.time() - started:6.0f} s  held-out gain "
                    + "".join(f"{name} {_db(value)}  " for name, value in by_cube.items() if len(by_cube) > 1)
                    + f"mean {_db(result.held_out_gain_db[-1][1])} dB")
            if averaged is not None:
                result.held_out_gain_ema_db.append((step, mean_gain(averaged.module)))
                line += f", averaged weights {_db(result.held_out_gain_ema_db[-1][1])} dB"
            if distiller is not None:
                result.distilled_gain_db.append((step, mean_gain(distiller.student)))
                result.teacher_gain_db.append((step, mean_gain(distiller.teacher)))
                line += (f"; distilled student {_db(result.distilled_gain_db[-1][1])} dB, "
                         f"teacher {_db(result.teacher_gain_db[-1][1])} dB")
            log(line)
        if save_every and step % save_every == 0 and step < steps:
            stem = Path(save)
            save_student(str(stem.with_name(f"{stem.stem}_step{step}{stem.suffix}")), step)

    if whole_image and steps:
        trained = {"base": fresh_student()[0], "trained": model}
        if distiller is not None:
            trained.update(distilled=distiller.student, teacher=distiller.teacher)
        for cube in held_out_cubes:
            if cube.wavelengths_nm is None:
                log(f"whole image: {cube.name} has no band centres, so no {sensor.name} MSI: skipped")
                continue
            case = make_wald_case(cube, sensor, scale)
            result.whole_image[cube.name] = {
                role: {key: row[key] for key in ("psnr", "sam")}
                for role, row in ((role, validate(m, [case])[0]) for role, m in trained.items())}
            log(f"whole image {cube.name} fused as one Wald case: " + ", ".join(
                f"{role} {m['psnr']:.3f} dB / {m['sam']:.3f}°" for role, m in result.whole_image[cube.name].items()))
    if save and steps:
        save_student(save, steps)
    if memorise_steps:
        model, optimiser = fresh_student()
        fixed = [batch_of(train_cubes) for _ in range(memorise_batches)]
        base_fixed = mean_loss(model, fixed)
        for step in range(memorise_steps):
            optimiser_step(optimiser, reference_loss(model, fixed[step % len(fixed)]), model)
        result.memorised_gain_db = -(mean_loss(model, fixed) - base_fixed) * DB_PER_LOG_MSE
        result.memorised_held_out_gain_db = float(np.mean(list(gains(model).values())))
        log(
            f"memorisation control: {memorise_steps} steps on {len(fixed)} fixed batches: "
            f"{_db(result.memorised_gain_db)} dB on them, {_db(result.memorised_held_out_gain_db)} dB held out"
        )
    return result


def frame_agreement(first: HyperspectralCube, second: HyperspectralCube, sensor: SensorResponse, scale: int,
                    subspace_dim: int = SUBSPACE_DIM) -> Dict[str, np.ndarray]:
    """Whether two cubes' channels mean the same to the student (two parts of one scene, say):
    from each cube's whole clean Wald pair (``sensor``'s MSI, ``scale``; datasets.WholeSceneStatistics,
    as the probe fits them), (subspace_dim,) arrays of the signed cosines between component k of
    the one and of the other, as fitted ("subspace") and in the aligned frame ("aligned",
    model.aligned_frame), and the cosines of the principal angles between the two subspaces
    ("subspaces", largest first: 1 where they share a direction whatever its coordinates).
    Raises ValueError (from the SRF) when a cube has no band centres or ``sensor`` misses them."""
    statistics = WholeSceneStatistics(subspace_dim)
    first_basis, second_basis = (torch.from_numpy(statistics(c, sensor, scale).basis)[None] for c in (first, second))
    first_aligned, second_aligned = (b @ aligned_frame(b) for b in (first_basis, second_basis))
    return {
        "subspace": (first_basis[0] * second_basis[0]).sum(0).numpy(),
        "aligned": (first_aligned[0] * second_aligned[0]).sum(0).numpy(),
        "subspaces": np.linalg.svd((first_basis[0].T @ second_basis[0]).numpy(), compute_uv=False),
    }


def require_band_centres(cubes: Sequence[HyperspectralCube]) -> None:
    """Raises ValueError naming each cube (once) whose band centres are unknown: the wavelength
    grid (model.WAVELENGTH_GRID_NM) cannot be made for it."""
    missing = list(dict.fromkeys(c.name for c in cubes if c.wavelengths_nm is None))
    if missing:
        raise ValueError(f"the wavelength grid needs band centres, which {', '.join(missing)} lack")


def _cubes_named(cubes: Sequence[HyperspectralCube], words: Sequence[str]) -> List[HyperspectralCube]:
    chosen = [c for c in cubes if any(w.lower() in c.name.lower() for w in words)]
    if not chosen:
        raise SystemExit(f"no cube matches {list(words)}; cubes: {', '.join(c.name for c in cubes)}")
    return chosen


def split_rows(cube: HyperspectralCube, fraction: float = 0.75) -> Tuple[HyperspectralCube, HyperspectralCube]:
    """(top, bottom) parts of ``cube`` (B, rows, cols) cut at ``fraction`` of its rows: training
    and held-out ground of one scene that share no pixel (a crop's PSF reaches only its own part,
    since crops are degraded on their own)."""
    cut = int(round(cube.data.shape[1] * fraction))
    return (
        HyperspectralCube(f"{cube.name} (top {cut} rows)", cube.data[:, :cut], cube.wavelengths_nm, cube.weight),
        HyperspectralCube(f"{cube.name} (rows {cut}+)", cube.data[:, cut:], cube.wavelengths_nm, cube.weight),
    )


def training_window(cube: HyperspectralCube, rows: int, cols: int) -> HyperspectralCube:
    """The last ``rows`` rows and first ``cols`` columns of ``cube`` (B, rows, cols): for a top part
    of :func:`split_rows`, the block of training ground next to the held-out part, so that the
    training pixels can be cut to as many as a scene's reduced pair has (a 512² scene at ×4:
    128 × 128) while the held-out part stays the same. Raises ValueError when the window is larger
    than the cube or not positive."""
    _, height, width = cube.data.shape
    if not (0 < rows <= height and 0 < cols <= width):
        raise ValueError(f"a training window of {rows} × {cols} pixels does not fit {cube.name} ({height} × {width})")
    return HyperspectralCube(f"{cube.name}, last {rows} × first {cols}", cube.data[:, height - rows:, :cols],
                             cube.wavelengths_nm, cube.weight)


def reduced_cube(cube: HyperspectralCube, scale: int) -> HyperspectralCube:
    """``cube`` (B, rows, cols) blurred by the Wald protocol's Gaussian PSF at ``scale`` and
    decimated by it (degradation.blur_and_decimate, psf.wald), as a scene's LR-HSI is: training
    ground at the next coarser GSD, the reference that scene adaptation (user_training.
    adapt_to_scene) learns from, since a delivered scene has no finer truth. Raises ValueError
    when ``scale`` is below 2 or the cube is smaller than it."""
    from .degradation import blur_and_decimate, crop_to_multiple
    from .psf import wald

    if scale < 2 or min(cube.data.shape[1:]) < scale:
        raise ValueError(f"{cube.name} ({cube.data.shape[1]} × {cube.data.shape[2]}) cannot be reduced by {scale}: "
                         "the factor must be at least 2 and no larger than the cube")
    reduced = blur_and_decimate(crop_to_multiple(cube.data, scale), wald(scale)).astype(np.float32)
    return HyperspectralCube(f"{cube.name}, reduced ×{scale}", reduced, cube.wavelengths_nm, cube.weight)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _db(value: float) -> str:
    # Round first, so that a loss change of −0.0001 dB prints as +0.000 and not −0.000.
    return f"{round(value, 3) + 0.0:+.3f}"


def main(argv=None) -> int:
    """The command line (see the module docstring and ``--help``); prints the probe's log."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--train", nargs="+", default=["Potsdam block A", "Potsdam block B"],
                        help="words of the training cubes' names (any shared cube: training, validation or corpus)")
    parser.add_argument("--held-out", nargs="+", default=["Potsdam block C"],
                        help="words of the held-out cubes' names (any shared cube)")
    parser.add_argument("--within", default=None, metavar="WORDS",
                        help="instead of --train/--held-out: one cube (training, validation or corpus) whose top "
                        "three quarters train and whose bottom quarter is held out")
    parser.add_argument("--train-window", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"),
                        help="with --within: train only on the top part's last ROWS rows and first COLS columns "
                        "(fewer training pixels, the same held-out quarter)")
    parser.add_argument("--train-reduced", type=int, nargs="?", const=-1, default=None, metavar="FACTOR",
                        help="with --within: train on the top part degraded as an LR-HSI is (Wald PSF, after "
                        "--train-window) by FACTOR, at least 2 (none: --scale, the resolution of the reference a "
                        "scene's own reduced pair gives, a step coarser than the fusion)")
    parser.add_argument("--held-out-reduced", action="store_true",
                        help="with --train-reduced: reduce the held-out quarter by the same factor, to measure at "
                        "the GSD trained on")
    parser.add_argument("--sensor", default="Sentinel-2 10 m", choices=sorted(validation_sensors()),
                        help="the MSI simulated from every cube (its SRF)")
    parser.add_argument("--scale", type=int, default=4, help="resolution ratio of the Wald pairs")
    parser.add_argument("--steps", type=int, default=1000, help="steps of the generalisation run (0: none)")
    parser.add_argument("--memorise-steps", type=int, default=300,
                        help="steps of the memorisation control on 8 fixed batches (0: none)")
    parser.add_argument("--batch-size", type=int, default=6,
                        help="crops per batch (a larger batch takes a proportionally larger --lr: module docstring)")
    parser.add_argument("--crop", type=int, default=48, help="crop size in HR pixels")
    parser.add_argument("--held-out-batches", type=int, default=8, help="fixed batches per held-out cube")
    parser.add_argument("--evaluate-every", type=int, default=100, help="steps between held-out measurements")
    parser.add_argument("--lr", type=float, default=3e-5, help="AdamW learning rate")
    parser.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                        help="also measure the weights' exponential moving average with this decay (0: not)")
    parser.add_argument("--representation", choices=REPRESENTATIONS, default="subspace",
                        help="the student's channels: the scene's principal components, the same rotated towards "
                        "fixed shapes along the bands (aligned), or a fixed wavelength grid")
    parser.add_argument("--unshuffle", type=int, default=4,
                        help="the student's space-to-depth factor (4: the bundled student's; 1: the paper's layout)")
    parser.add_argument("--width", type=int, default=32, help="the student's features (growth half of it)")
    parser.add_argument("--save", default=None, metavar="BUNDLE.json",
                        help="write the generalisation run's student as a model bundle after its last step")
    parser.add_argument("--decay", action="store_true",
                        help="decay the step over --steps as make train does (cosine, to 5 %% of --lr)")
    parser.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                        help="with --save: also write the student every STEPS steps, as BUNDLE_stepN.json")
    parser.add_argument("--distil", action="store_true",
                        help="also co-train the teacher and a distilled student on the same batches (the plain "
                        "student is its control)")
    parser.add_argument("--transfer", action="store_true",
                        help="with --distil: the distilled student also learns the teacher's output on unlabelled "
                        "crops of the held-out cubes (their reference is not used; the held-out gains are then "
                        "transductive). Every cube needs the same bands")
    parser.add_argument("--teacher-steps", type=int, default=0,
                        help="with --distil: train the teacher alone for this many steps first, then co-train all "
                        "three as with --distil (the teacher keeps learning)")
    parser.add_argument("--whole-image", action="store_true",
                        help="after the last step, also fuse each held-out cube whole as one Wald case with the base "
                        "and the trained student(s), and print their PSNR and SAM")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--data", default=None, help="the shared data folder (none: ../shared/data beside the project)")
    args = parser.parse_args(argv)
    if layout_error(args.unshuffle, args.width):
        parser.error(layout_error(args.unshuffle, args.width))
    if args.threads:
        torch.set_num_threads(args.threads)
    every = training_cubes(args.data) + validation_cubes(args.data) + corpus_cubes(args.data)
    if args.within:
        train, held_out = (list(part) for part in zip(*(split_rows(c) for c in _cubes_named(every, [args.within]))))
        try:
            if args.train_window:
                train = [training_window(c, *args.train_window) for c in train]
            if args.train_reduced is not None:
                factor = args.scale if args.train_reduced == -1 else args.train_reduced
                train = [reduced_cube(c, factor) for c in train]
                if args.held_out_reduced:
                    held_out = [reduced_cube(c, factor) for c in held_out]
            elif args.held_out_reduced:
                parser.error("--held-out-reduced measures at --train-reduced's resolution: give --train-reduced")
        except ValueError as error:
            parser.error(str(error))
    elif args.train_window or args.train_reduced is not None or args.held_out_reduced:
        parser.error("--train-window, --train-reduced and --held-out-reduced change the parts of --within: "
                     "give --within")
    else:
        train = _cubes_named(every, args.train)
        held_out = _cubes_named(every, args.held_out)
        shared = {c.name for c in train} & {c.name for c in held_out}
        if shared:
            raise SystemExit(f"cubes both trained on and held out: {', '.join(sorted(shared))}; use --within to split one cube")
    print(f"training crops from {', '.join(c.name for c in train)}; held out: {', '.join(c.name for c in held_out)}; "
          f"{args.sensor}, scale {args.scale}", flush=True)
    if args.within:
        for top, bottom in zip(train, held_out):
            if top.wavelengths_nm is None:
                continue
            agreement = frame_agreement(top, bottom, validation_sensors()[args.sensor], args.scale)
            print(f"{top.name} against {bottom.name}, first 8 of {SUBSPACE_DIM} components: signed cosines "
                  + "; ".join(f"{name} " + " ".join(f"{value:+.2f}" for value in agreement[name][:8])
                              for name in ("subspace", "aligned"))
                  + "; principal cosines of the subspaces " + " ".join(f"{v:.2f}" for v in agreement["subspaces"][:8]),
                  flush=True)
    try:
        probe(train, held_out, validation_sensors()[args.sensor], args.scale, args.steps, memorise_steps=args.memorise_steps,
              held_out_batches=args.held_out_batches, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
              evaluate_every=args.evaluate_every, ema_decay=args.ema, representation=args.representation,
              unshuffle=args.unshuffle, width=args.width, save=args.save, save_every=args.save_every, decay=args.decay,
              distil=args.distil,
              transfer=args.transfer, whole_image=args.whole_image, teacher_steps=args.teacher_steps,
              log=lambda message: print(message, flush=True))
    except ValueError as error:
        # The probe's own checks of its inputs (the moving average's decay, a sensor that does not
        # cover a cube, a cube too small for the scale) raise before any training step.
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
