"""Does a learnt correction carry between scenes? It depends on what its channels mean.

The student corrects the base in the scene's own spectral subspace (model.py): channel k is the
scene's k-th principal component, which means something else in every scene (a vegetation
contrast in one, a roof material in another). What a network learns on such channels from some
scenes is about other spectra than those of a new scene. On a fixed wavelength grid a channel
means the same in every scene (reflectance near 1650 nm, say), so a relation such as how a
SWIR edge follows a visible and near-infrared one can be learnt once and applied anywhere.

This probe measures exactly that, all else equal: one plain convolutional network
(:class:`CorrectionNet`) learns a correction of the base's fused spectrum from training cubes
and is measured on held-out cubes, either

* ``grid``: the base's spectrum resampled by linear interpolation onto
  model.WAVELENGTH_GRID_NM (400–2500 nm every 50 nm; points beyond a sensor's range are
  masked), the correction resampled back onto the sensor's bands; or
* ``subspace``: the base's spectrum in the scene's first :data:`train.SUBSPACE_DIM` principal
  components, the correction mapped back through the same basis, as the student does.

The gain per held-out cube is the change of the reference loss (losses.teacher_loss) in dB, as
in learnability.py. Measured with the defaults (ten Earth-observation cubes with band centres →
EnMAP Potsdam block C, HyMap02 Berlin and AVIRIS Jasper Ridge, Sentinel-2 10 m, ×4, width 64,
1e-4, 6 crops of 48², the same crops for both; one core each, about 0.37 s per step), gains in
dB on block C / Berlin / Jasper Ridge (their mean):

=====  =====================================  =====================================
step   grid                                   subspace
=====  =====================================  =====================================
500    −0.010 / −0.013 / −0.081 (−0.035)      −0.055 / −0.098 / −0.021 (−0.058)
1000   +0.063 / −0.012 / +0.221 (+0.091)      −0.131 / −0.195 / −0.011 (−0.112)
1500   +0.107 / −0.005 / +0.220 (+0.107)      −0.176 / −0.240 / −0.135 (−0.184)
=====  =====================================  =====================================

In the scene's subspace the network loses on all three scenes and ever more; on the grid it
gains on two and holds HyMap02 Berlin level (between 1000 and 1500 steps the mean swung
between +0.03 and +0.11 dB). An earlier prototype of the grid, other crops, read +0.15 dB on
average after 3000 steps (Jasper Ridge +0.41). Variants of the grid, one run each (same crops):

* the scene's mean spectrum taken out of the input: mean +0.06 dB at 1000 steps, +0.05 at 1250,
  but HyMap02 Berlin −0.07 to −0.19 throughout (with the mean it held level);
* no MSI input (the base's spectrum alone): +0.02 at 500 and 750 steps, +0.05 at 1000: the
  MSI's own bands add little beyond what the base already took from them.

With ``--consistent`` the correction goes through (I − P·D) under the crop's PSF, as the
student's does, so that it cannot change what the LR-HSI sees. The gains grow on two cubes and
the loss on HyMap02 Berlin with them (same crops; block C / Berlin / Jasper Ridge (mean)):

=====  =====================================  =====================================
step   grid, consistent                       subspace, consistent
=====  =====================================  =====================================
500    +0.250 / −0.395 / +0.790 (+0.215)      −0.131 / −0.264 / +0.030 (−0.122)
1000   +0.336 / −0.678 / +0.747 (+0.135)      −0.296 / −0.383 / +0.134 (−0.182)
1500   +0.326 / −0.308 / +0.792 (+0.270)
=====  =====================================  =====================================

``--network student`` puts the bundled student's CSAKD network in the plain network's place:
its LR stream takes the LR-HSI, its high-resolution streams the base's spectrum, both in the
representation's channels (``--centred``: less the scene's mean spectrum). Grid, consistent,
centred, 750 steps, block C / Berlin / Jasper Ridge: in the bundled layout (``--unshuffle`` 4,
each 4×4 block of pixels squeezed into 32 features) −0.106 / −0.038 / −0.009 dB; ``--unshuffle``
2 −0.085 / −0.135 / +0.013; in the paper's full-resolution layout (1) +0.181 / −0.268 / +0.330,
with 16 features +0.165 / −0.299 / +0.180. The plain network with only 16 features
(``--width 16``) gains +0.288 / −0.414 / +0.549 at 1000 steps: it is the per-pixel detail that the
space-to-depth layout loses, not capacity. Without ``--centred`` the student's network learns
nothing (within 0.002 dB of zero through 1500 steps). The student itself in that layout
carries too (learnability.py).

    python -m csakd_qgis.representation_probe --representation grid
    python -m csakd_qgis.representation_probe --representation subspace
    python -m csakd_qgis.representation_probe --representation grid --consistent
    python -m csakd_qgis.representation_probe --consistent --network student --centred --unshuffle 1
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .datasets import (
    HyperspectralCube,
    WholeSceneStatistics,
    corpus_cubes,
    training_batch,
    training_cubes,
    validation_cubes,
    validation_sensors,
)
from .learnability import DB_PER_LOG_MSE, _HelpFormatter, _cubes_named, _db, require_band_centres
from .interpolation import upsample_lr
from .losses import teacher_loss
from .psf import degrade_torch
from .model import SubspaceFusionModel, representation_channels, wavelength_grid_maps
from .network import CSAKDNet
from .srf import SensorResponse
from .train import SUBSPACE_DIM, crop_interior, layout_error, optimiser_step, prepare_batch, student_config

# This probe's plain network reads the basis or the grid directly; the student's "aligned"
# frame (model.aligned_frame) is measured with the learnability probe.
PROBE_REPRESENTATIONS = ("subspace", "grid")

# The Earth-observation cubes of the default run: the training cubes and the corpus's AVIRIS
# and ROSIS cubes with band centres (not the laboratory scenes, not those without centres).
DEFAULT_TRAIN = ["Potsdam block A", "Potsdam block B", "simulated Berlin", "Moffett", "Samson", "cuprite", "salton",
                 "sandiego", "rosis"]
DEFAULT_HELD_OUT = ["Jasper", "HyMap02", "Potsdam block C"]
NETWORKS = ("plain", "student")


def representation_maps(representation: str, wavelengths_nm, basis: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(to (C, B), back (B, C), mask (C,)) float32: ``to`` takes a spectrum of B bands to the
    representation's C channels, ``back`` a correction in those channels to the bands, ``mask``
    is 1 on channels the sensor's range covers.

    ``grid``: linear interpolation onto model.WAVELENGTH_GRID_NM and back from its covered
    points (model.wavelength_grid_maps); needs ``wavelengths_nm`` (B,). ``subspace``: the
    scene's basis (B, K) (model.SceneStatistics.basis), ``to`` its transpose.
    Raises ValueError for another representation or a grid without band centres.
    """
    if representation == "subspace":
        basis = np.asarray(basis, dtype=np.float32)
        return torch.from_numpy(basis.T.copy()), torch.from_numpy(basis.copy()), torch.ones(basis.shape[1])
    if representation != "grid":
        raise ValueError(f"representation must be one of {PROBE_REPRESENTATIONS}, got {representation!r}")
    if wavelengths_nm is None:
        raise ValueError("the wavelength grid needs the cube's band centres")
    to, back = wavelength_grid_maps(wavelengths_nm)
    return (torch.from_numpy(to.astype(np.float32)), torch.from_numpy(back.astype(np.float32)),
            torch.from_numpy((to.sum(1) > 0).astype(np.float32)))


class CorrectionNet(nn.Module):
    """A plain residual CNN: from the base's spectrum in C channels (N, C, H, W), the channels'
    mask (C,) and the MSI (N, M, H, W), all divided by the scene's scale, a correction
    (N, C, H, W) in the same channels, zero on masked channels. ``depth`` residual 3×3
    convolutions of ``width`` features; the last convolution starts at zero, so the untrained
    net corrects nothing (as the student, model.py)."""

    def __init__(self, channels: int, msi_channels: int, width: int = 64, depth: int = 6):
        super().__init__()
        self.head = nn.Conv2d(2 * channels + msi_channels, width, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))
        self.tail = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, spectrum: torch.Tensor, mask: torch.Tensor, msi: torch.Tensor) -> torch.Tensor:
        n, _, rows, cols = spectrum.shape
        x = torch.cat([spectrum, mask.view(1, -1, 1, 1).expand(n, -1, rows, cols), msi], 1)
        x = torch.relu(self.head(x))
        for conv in self.body:
            x = x + torch.relu(conv(x))
        return self.tail(x) * mask.view(1, -1, 1, 1)


def student_network(representation: str, unshuffle: Optional[int] = None, width: Optional[int] = None) -> CSAKDNet:
    """The bundled student's network (train.student_config) in ``representation``'s channels,
    with its space-to-depth factor ``unshuffle`` (network.NetworkConfig; None: the student's 4)
    and its ``width`` (growth half of it; None: the student's 32) replaced, its output
    convolution zeroed (its correction starts at zero, as the student's, model.py). Raises
    ValueError for another representation (train.student_config) or a width the network's
    groups do not divide (network.NetworkConfig)."""
    net = CSAKDNet(student_config(representation=representation, unshuffle=4 if unshuffle is None else unshuffle,
                                  width=32 if width is None else width).network)
    nn.init.zeros_(net.head_refine.weight)
    nn.init.zeros_(net.head_refine.bias)
    return net


def representation_probe(
    train_cubes: Sequence[HyperspectralCube],
    held_out_cubes: Sequence[HyperspectralCube],
    sensor: SensorResponse,
    representation: str = "grid",
    scale: int = 4,
    steps: int = 3000,
    batch_size: int = 6,
    crop: int = 48,
    lr: float = 1e-4,
    width: Optional[int] = None,
    held_out_batches: int = 8,
    evaluate_every: int = 250,
    seed: int = 1,
    consistent: bool = False,
    network: str = "plain",
    unshuffle: Optional[int] = None,
    centred: bool = False,
    log: Callable[[str], None] = print,
) -> Dict[str, List[Tuple[int, float]]]:
    """Train a :class:`CorrectionNet` in ``representation`` on the base's output for crops of
    ``train_cubes`` and measure it on ``held_out_batches`` fixed batches of each held-out cube.

    Crops, PSFs and whole-scene statistics are drawn as in the learnability probe (one
    generator, ``seed``, held-out batches first, so both representations see the same crops);
    the base is the untrained student (model.py), exactly the classical base. ``consistent``
    passes the correction through (I − P·D) under the crop's degradation, as the student's
    (model.py), so that it cannot change what the LR-HSI sees (its noise included).

    ``network`` "plain" is :class:`CorrectionNet` (``width`` features, default 64); "student" is
    the bundled student's CSAKD network (:func:`student_network`, with ``unshuffle`` and
    ``width``), whose LR stream takes the LR-HSI and whose HR streams take the base's fused
    spectrum, both in the representation's channels. ``centred`` takes the scene's mean spectrum
    out of the networks' inputs. Returns, per held-out cube name, [(step, gain in dB)] every
    ``evaluate_every`` steps and at the last. Raises ValueError for an unknown representation or
    network or, with ``grid``, a cube without band centres (before any step).
    """
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    if representation not in PROBE_REPRESENTATIONS:
        raise ValueError(f"representation must be one of {PROBE_REPRESENTATIONS}, got {representation!r}")
    channels = representation_channels(representation, SUBSPACE_DIM)
    if representation == "grid":
        require_band_centres(list(train_cubes) + list(held_out_cubes))
    torch.set_flush_denormal(True)
    rng = np.random.default_rng(seed)
    statistics = WholeSceneStatistics(SUBSPACE_DIM)
    base_model = SubspaceFusionModel(student_config()).eval()
    by_name = {c.name: c for c in list(train_cubes) + list(held_out_cubes)}

    def batch_of(cubes):
        cases = training_batch(list(cubes), [sensor], rng, batch_size, crop, scales=(scale,), statistics=statistics)
        lr_hsi, hr_msi, stats, reference = prepare_batch(cases, SUBSPACE_DIM)
        with torch.no_grad():
            base = base_model(lr_hsi, hr_msi, stats).image
        norm = stats["scale"].view(-1, 1, 1, 1)
        to, back, mask = representation_maps(representation, by_name[cases[0].cube].wavelengths_nm,
                                             stats["basis"][0, :, :SUBSPACE_DIM].numpy())
        return {"base": base / norm, "reference": reference / norm, "msi": hr_msi / norm, "to": to, "back": back,
                "mask": mask, "lr_size": lr_hsi.shape[-1], "degradation": stats["degradation"], "lr": lr_hsi / norm,
                "mean": stats["band_mean"] / stats["scale"].view(-1, 1)}

    def corrected(net, batch):
        spectrum = torch.einsum("cb,nbhw->nchw", batch["to"], batch["base"])
        lr_spectrum = torch.einsum("cb,nbhw->nchw", batch["to"], batch["lr"])
        if centred:
            mean = torch.einsum("cb,nb->nc", batch["to"], batch["mean"]).view(*spectrum.shape[:2], 1, 1)
            lr_spectrum, spectrum = lr_spectrum - mean, spectrum - mean
        if network == "student":
            output = net.residual(lr_spectrum, spectrum)[0] * batch["mask"].view(1, -1, 1, 1)
        else:
            output = net(spectrum, batch["mask"], batch["msi"])
        correction = torch.einsum("bc,nchw->nbhw", batch["back"], output)
        if consistent:
            degradation = batch["degradation"]
            correction = correction - upsample_lr(degrade_torch(correction, degradation), degradation, "consistent")
        return batch["base"] + correction

    def loss(image, batch):
        (image,) = crop_interior(image, lr_size=batch["lr_size"])
        (target,) = crop_interior(batch["reference"], lr_size=batch["lr_size"])
        return teacher_loss(image, target)

    held_out = {c.name: [batch_of([c]) for _ in range(held_out_batches)] for c in held_out_cubes}
    with torch.no_grad():
        base_loss = {name: float(np.mean([loss(b["base"], b).item() for b in batches])) for name, batches in held_out.items()}
    torch.manual_seed(seed)
    if network == "student":
        net = student_network(representation, unshuffle, width)
    else:
        net = CorrectionNet(channels, sensor.responses.shape[1], width or 64)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    gains: Dict[str, List[Tuple[int, float]]] = {name: [] for name in held_out}
    started = time.time()
    for step in range(1, steps + 1):
        batch = batch_of(train_cubes)
        optimiser_step(optimiser, loss(corrected(net, batch), batch), net)
        if step % evaluate_every == 0 or step == steps:
            with torch.no_grad():
                for name, batches in held_out.items():
                    value = float(np.mean([loss(corrected(net, b), b).item() for b in batches]))
                    gains[name].append((step, -(value - base_loss[name]) * DB_PER_LOG_MSE))
            mean = float(np.mean([g[-1][1] for g in gains.values()]))
            log(f"step {step:5d}  {time.time() - started:6.0f} s  {representation}: "
                + "  ".join(f"{name} {_db(g[-1][1])}" for name, g in gains.items()) + f"  mean {_db(mean)} dB")
    return gains


def main(argv=None) -> int:
    """The command line (see the module docstring and ``--help``); prints the probe's log."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--representation", choices=PROBE_REPRESENTATIONS, default="grid",
                        help="the network's channels: a fixed wavelength grid or the scene's principal components")
    parser.add_argument("--train", nargs="+", default=DEFAULT_TRAIN, help="words of the training cubes' names")
    parser.add_argument("--held-out", nargs="+", default=DEFAULT_HELD_OUT, help="words of the held-out cubes' names")
    parser.add_argument("--sensor", default="Sentinel-2 10 m", choices=sorted(validation_sensors()),
                        help="the MSI simulated from every cube (its SRF)")
    parser.add_argument("--scale", type=int, default=4, help="resolution ratio of the Wald pairs")
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=6, help="crops per step (and per held-out batch)")
    parser.add_argument("--crop", type=int, default=48, help="crop size in HR pixels")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--width", type=int, default=None,
                        help="the network's features (none: 64 for the plain network, the bundled student's 32)")
    parser.add_argument("--evaluate-every", type=int, default=250, help="steps between held-out measurements")
    parser.add_argument("--seed", type=int, default=1, help="seed of the crops' generator and the network's start")
    parser.add_argument("--consistent", action="store_true",
                        help="pass the correction through (I − P·D), as the student's: it cannot change what the LR-HSI sees")
    parser.add_argument("--network", choices=NETWORKS, default="plain",
                        help="plain: CorrectionNet; student: the bundled student's CSAKD network, fed the LR-HSI and the "
                        "base's fused spectrum in the representation's channels")
    parser.add_argument("--unshuffle", type=int, default=None,
                        help="the student network's space-to-depth factor (none: the bundled student's 4; 1: the paper's); "
                        "--network student only")
    parser.add_argument("--centred", action="store_true",
                        help="the networks' input spectra less the scene's mean spectrum (without it the student's "
                        "network learned nothing in 1500 steps; its attention's gates saturate)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--data", default=None, help="the shared data folder (none: ../shared/data beside the project)")
    args = parser.parse_args(argv)
    if layout_error(args.unshuffle, args.width):
        parser.error(layout_error(args.unshuffle, args.width))
    torch.set_num_threads(args.threads)
    every = training_cubes(args.data) + validation_cubes(args.data) + corpus_cubes(args.data, unknown_wavelengths=False)
    every = [c for c in every if c.weight == 1.0]  # no laboratory scenes
    train_cubes, held_out = _cubes_named(every, args.train), _cubes_named(every, args.held_out)
    shared = {c.name for c in train_cubes} & {c.name for c in held_out}
    if shared:
        parser.error(f"cubes both trained on and held out: {', '.join(sorted(shared))}")
    print(f"training crops from {', '.join(c.name for c in train_cubes)}; held out: "
          f"{', '.join(c.name for c in held_out)}; {args.sensor}, scale {args.scale}", flush=True)
    try:
        representation_probe(train_cubes, held_out, validation_sensors()[args.sensor], args.representation, args.scale,
                             args.steps, args.batch_size, args.crop, args.lr, args.width,
                             evaluate_every=args.evaluate_every, seed=args.seed, consistent=args.consistent,
                             network=args.network, unshuffle=args.unshuffle, centred=args.centred, log=lambda line: print(line, flush=True))
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
