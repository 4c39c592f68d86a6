"""How much could the student's correction add to its base, and how much of that is learnable?

The student corrects the classical base (model.SubspaceFusionModel) only where neither input
sees: its correction lies in the scene's K-component subspace, in the null space of the MSI's
linear model (model.msi_null_projector) and in what the LR-HSI's degradation removes
(I − P·D). This probe measures, on the validation suite's Wald cases (datasets.py), three
things per case, each as the change of the band-averaged PSNR (metrics.psnr) over the base:

* ``reach``: the base plus the reference's own error projected the way the student's correction
  is. No correction the student can make can do better (the projection it passes through is
  fixed), so this bounds what any training could buy.
* ``in-scene``: how much of that error a small pixel-wise network (scene_correction.PixelCorrection:
  the MSI pixel and the base's K coefficients → the error within reach, by an MLP of two hidden
  layers) recovers on pixels it never saw of the same scene, fitted with the truth on the top
  40 % of the rows, stopped early on the next 10 %, scored on the bottom 40 %. An upper bound
  for what a learnt, scene-specific correction of this form can find.
* ``reduced pair``: the same network fitted without the truth, on the scene's own reduced pair
  (Wald's protocol once more: the LR-HSI is the reference, both inputs degraded by the scene's
  PSF), its last fifth of rows held out for early stopping, then applied at full resolution:
  what scene adaptation of such a network would give.

Measured (``python -m csakd_qgis.headroom``: the nine ×4 cases, K = 16, three fits per case,
one thread, 4 minutes), mean over cases and range:

=============  ==========================  =================================================
probe          mean PSNR change over base  per case
=============  ==========================  =================================================
reach          +12.0 dB                    +6.3 (Jasper Ridge, WorldView-2) … +18.7 (Berlin)
in-scene       +0.96 dB, better on 89 %    −0.05 (Potsdam C, Sentinel-2) … +2.22 (Jasper)
reduced pair   −0.44 dB, better on 56 %    −2.34 (Berlin, RGB) … +0.65 (Jasper, Sentinel-2)
=============  ==========================  =================================================

So the student is far from its ceiling, and its error is not noise: within one scene it is
largely a learnable, non-linear function of the MSI pixel and the base's spectrum (a ridge
regression on the same features, or on a 5×5 neighbourhood, recovered +0.05 and +0.34 dB on
the unseen rows; the MLP on a 3×3 neighbourhood +1.17, one fit each). What a network trained
on other scenes learns of that function does not carry (the student trained on 86,000 crops
gained +0.03 dB, see the README), and the scene's reduced pair, on cubes this small (384–576
reduced pixels), is too small and too coarse a copy of the scene to learn it from.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .metrics import psnr, sam
from .psf import wald
from .scene_correction import LevelPair, PixelCorrection, fit_on_pixels, level_pair, reduce_pair

# Fractions of the rows: fitted on the top, stopped early on a band below, scored at the bottom
# (a gap of a tenth between them so that the MSI's blur does not leak the fitted rows).
FIT_ROWS, STOP_ROWS, SCORE_ROWS = (0.0, 0.4), (0.45, 0.55), (0.6, 1.0)


def base_model(subspace_dim: int):
    """The untrained student (model.SubspaceFusionModel with train.student_config): exactly the
    classical base, whose output the probes measure from."""
    from .model import SubspaceFusionModel
    from .train import student_config

    return SubspaceFusionModel(student_config(subspace_dim=subspace_dim)).eval()


def case_pair(case, statistics, subspace_dim: int) -> LevelPair:
    """The scene_correction.LevelPair of one Wald case (datasets.WaldCase, with its
    degradation): the base fused with ``statistics`` (model.SceneStatistics fitted on the case)
    and expressed in them; its target the reference's error within the student's reach."""
    degradation = statistics.degradation if statistics.degradation is not None else wald(case.scale)
    return level_pair(base_model(subspace_dim), case.lr_hsi, case.hr_msi, statistics, degradation, case.reference,
                      refit=False)


def _rows(height: int, width: int, span) -> np.ndarray:
    rows = np.arange(height)[:, None].repeat(width, 1).ravel()
    return (rows >= span[0] * height) & (rows < span[1] * height)


def _pixels(tensor: torch.Tensor) -> torch.Tensor:
    """(1,C,H,W) → (H·W, C), the pixels as rows, as the pixel-wise network is fitted."""
    return tensor[0].reshape(tensor.shape[1], -1).T


def _predicted(net: PixelCorrection, room: LevelPair) -> torch.Tensor:
    with torch.no_grad():
        return net(room.features).double()


def _fit(room: LevelPair, fit: np.ndarray, stop: np.ndarray, hidden: int, steps: int, seed: int) -> PixelCorrection:
    # The scene correction's own network and fit, on this probe's rows and with every pixel, for
    # all its steps (the probe measures what the network can find, not what a quick fit does),
    # at the step its recorded numbers were measured with.
    return fit_on_pixels(_pixels(room.features), _pixels(room.target), np.flatnonzero(fit), np.flatnonzero(stop), seed,
                         steps, hidden, patience=None, learning_rate=1e-3)


def reduced_pair(case, statistics, subspace_dim: int) -> LevelPair:
    """The scene_correction.LevelPair of a Wald case's own reduced pair (LR-HSI degraded once
    more by the scene's PSF against the MSI degraded onto the LR grid; the LR-HSI is its
    reference), fused with statistics fitted on it and expressed in the full scene's
    ``statistics``. Rows and columns are cut to multiples of the scale first."""
    from .degradation import blur_and_decimate

    s, psf = case.scale, case.degradation
    rows, cols = case.lr_hsi.shape[1] // s * s, case.lr_hsi.shape[2] // s * s
    msi_at_lr = blur_and_decimate(case.hr_msi[:, : rows * s, : cols * s], psf)
    reference, lr, msi = reduce_pair(case.lr_hsi, msi_at_lr, psf)
    return level_pair(base_model(subspace_dim), lr, msi, statistics, psf, reference, refit=True)


def probe_case(case, subspace_dim: int = 16, hidden: int = 64, steps: int = 1500, reduced: bool = True,
               seeds: Sequence[int] = (0, 1, 2)) -> Dict[str, float]:
    """The three measurements of this module's docstring for one Wald case (datasets.WaldCase,
    with its degradation): {"base", "reach", "in_scene", "reduced_pair"} in dB (the last three as
    changes over the base; in_scene on the scored rows only; reduced_pair None when not asked)
    and the SAM changes {"reach_sam", "reduced_pair_sam"} in degrees. The fitted networks' gains
    are means over fits from ``seeds``: on these small scenes one fit's gain varies by up to
    0.6 dB with the seed (Potsdam block C, WorldView-2: −0.25 and +0.32 dB in-scene)."""
    from .datasets import case_statistics

    statistics = case_statistics(case, subspace_dim)
    room = case_pair(case, statistics, subspace_dim)
    reference, base = case.reference, room.image.numpy()
    height, width = reference.shape[1:]
    reach = room.corrected(room.error(reference)).numpy()
    scored = slice(int(np.ceil(SCORE_ROWS[0] * height)), height)
    in_scene = []
    for seed in seeds:
        net = _fit(room, _rows(height, width, FIT_ROWS), _rows(height, width, STOP_ROWS), hidden, steps, seed)
        learnt = room.corrected(_predicted(net, room)).numpy()
        in_scene.append(psnr(reference[:, scored], learnt[:, scored]) - psnr(reference[:, scored], base[:, scored]))
    result = {
        "base": psnr(reference, base),
        "reach": psnr(reference, reach) - psnr(reference, base),
        "reach_sam": sam(reference, reach) - sam(reference, base),
        "in_scene": float(np.mean(in_scene)),
        "reduced_pair": None,
        "reduced_pair_sam": None,
    }
    if reduced:
        small = reduced_pair(case, statistics, subspace_dim)
        small_rows, small_cols = small.image.shape[1:]
        gains, angles = [], []
        for seed in seeds:
            net = _fit(small, _rows(small_rows, small_cols, (0.0, 0.8)), _rows(small_rows, small_cols, (0.8, 1.0)), hidden,
                       steps, seed)
            adapted = room.corrected(_predicted(net, room)).numpy()
            gains.append(psnr(reference, adapted) - psnr(reference, base))
            angles.append(sam(reference, adapted) - sam(reference, base))
        result["reduced_pair"], result["reduced_pair_sam"] = float(np.mean(gains)), float(np.mean(angles))
    return result


def summary(rows: Sequence[Dict[str, float]], key: str) -> str:
    """'mean +x.xxx dB, better on p %, worst +y.yy, best +z.zz' of ``key`` over ``rows``."""
    values = np.array([row[key] for row in rows if row[key] is not None])
    return (f"mean {values.mean():+.3f} dB, better on {np.mean(values > 0) * 100:.0f} %, worst {values.min():+.2f}, "
            f"best {values.max():+.2f}")


def main(argv: Optional[List[str]] = None) -> int:
    from .datasets import validation_cases
    from .learnability import _HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[4], help="scales of the validation cases")
    parser.add_argument("--subspace-dim", type=int, default=16, help="K, the student's subspace")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units of the pixel-wise network")
    parser.add_argument("--steps", type=int, default=1500, help="full-batch Adam steps of each fit")
    parser.add_argument("--seeds", type=int, default=3, help="fits per case and probe, from seeds 0, 1, …; their gains are averaged")
    parser.add_argument("--no-reduced-pair", action="store_true", help="leave out the reduced-pair fit")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    for name in ("subspace_dim", "hidden", "steps", "seeds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if any(s < 2 for s in args.scales):
        parser.error(f"--scales must be 2 or more, got {args.scales}")
    torch.set_num_threads(args.threads)
    rows = []
    for case in validation_cases(scales=args.scales):
        row = probe_case(case, args.subspace_dim, args.hidden, args.steps, not args.no_reduced_pair, range(args.seeds))
        rows.append(row)
        reduced = "" if row["reduced_pair"] is None else f"  reduced pair {row['reduced_pair']:+.2f}"
        print(f"{case.cube:24s} {case.sensor:16s} ×{case.scale}  base {row['base']:.2f} dB  reach {row['reach']:+.2f}  "
              f"in-scene {row['in_scene']:+.2f}{reduced}", flush=True)
    print(f"reach: {summary(rows, 'reach')}")
    print(f"in-scene (bottom 40 % of the rows, never fitted): {summary(rows, 'in_scene')}")
    if not args.no_reduced_pair:
        print(f"reduced pair (no truth): {summary(rows, 'reduced_pair')}; SAM "
              f"{np.mean([r['reduced_pair_sam'] for r in rows]):+.3f}°")
    return 0


if __name__ == "__main__":
    sys.exit(main())
