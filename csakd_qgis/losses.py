"""The joint loss of CSAKD's online distillation, one function per term.

The paper's terms (method.md) with two changes, measured: the reconstruction term is the
band-averaged PSNR's own loss (:func:`band_psnr_loss`) instead of SmoothL1 plus a band-wise L1,
because the quality that validation measures, and users compare, is PSNR averaged over bands;
and the student's distance to the teacher is floored at the teacher's own error
(:func:`teacher_distance_loss`), so that it does not outweigh the reconstruction term.
Spectra are compared after division by the scene scale ρ (so scenes of different units weigh
alike); none of the terms subtracts a mean, so the angle term sees true spectra.
Tensors are (N, B, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUXILIARY_WEIGHT = 0.1
# The student's pull towards the teacher's output (teacher_distance_loss) against its pull
# towards the reference (weight 1).
DISTILLATION_WEIGHT = 0.5
# A band's error floor relative to its peak: caps a band's contribution at 60 dB PSNR, so that
# a band the base already gets almost exactly right does not dominate through its logarithm.
PSNR_LOSS_FLOOR = 1e-3


def band_psnr_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over images and bands of ln(MSE_b + (ε·peak_b)²): (N,B,H,W) → scalar.

    The validation metric (protocol.md: PSNR averaged over bands, each against its own peak)
    is, up to a constant per band, −10/ln 10 times this loss; a plain (smooth-L1) error over
    all bands instead weights bands by their brightness. Measured with the student trained on
    crops of the validation cubes themselves (scale 4, 360 steps): smooth-L1 lowered the
    whole images' MSE (ratio 0.92–1.03) but their band-averaged PSNR fell by 0.46 dB, as bright
    bands gained at the dark bands' expense; this loss raised it by 0.11 dB.
    """
    mse = (prediction - target).pow(2).mean(dim=(2, 3))
    peak = target.detach().amax(dim=(2, 3)).clamp_min(0)
    return torch.log(mse + (PSNR_LOSS_FLOOR * peak) ** 2 + 1e-12).mean()


def spectral_angle_loss(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 − mean cosine between predicted and reference spectra."""
    return 1.0 - F.cosine_similarity(prediction, target, dim=1, eps=eps).mean()


def feature_distillation_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of the student's fused feature against sigmoid(teacher's, detached)."""
    return F.binary_cross_entropy_with_logits(student_feature, torch.sigmoid(teacher_feature.detach()))


def teacher_loss(teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference term of every model trained here (teacher, student, scene adaptation):
    the band-averaged PSNR's loss plus the spectral angle (N,B,H,W) → scalar."""
    return band_psnr_loss(teacher, target) + AUXILIARY_WEIGHT * spectral_angle_loss(teacher, target)


def teacher_distance_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over images and bands of ln(MSE_b(S, T) + MSE_b(T, X)): the student's distance to
    the teacher's output, floored at the teacher's own error (both detached): (N,B,H,W) → scalar.

    Its pull on the student grows with the distance to the teacher and reaches about the
    reference term's (:func:`band_psnr_loss` of the reference) where that distance is the
    teacher's own error. The reference term's form, ln MSE_b(S, T), pulls hardest where the
    student is closest (16× the reference term's pull at a twenty-fifth of the teacher's error,
    tests/test_losses.py): at the start of co-training, both models at their bases, it
    outweighed the reference, and the distilled student trailed the one trained without the
    teacher (within a CAVE scene, learnability --within cave_feathers --distil, 1000 steps:
    +0.165 dB held out against +0.235, the teacher +0.294); with this term it trails less
    (+0.212). A weight of 1 instead of DISTILLATION_WEIGHT read +0.053 at 500 steps, where 0.5
    read +0.066; in the aligned frame with a transfer set (learnability --representation aligned
    --within cave_cloth --distil --transfer, 500 steps) it put the distilled student's whole
    image 0.045 dB behind its control's, where 0.5 left it 0.023 behind.
    """
    return floored_distance_loss(student, teacher, (teacher - target).detach().pow(2).mean(dim=(2, 3)))


def floored_distance_loss(student: torch.Tensor, teacher: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Mean over images and bands of ln(MSE_b(S, T) + floor_b), the teacher detached: student and
    teacher (N,B,H,W), ``floor`` (N,B) or (B,) in the images' squared units → scalar.

    :func:`teacher_distance_loss` with the floor given, for images without a reference (the
    transfer set of :func:`csakd_qgis.train.distillation_step`), where the teacher's own error is
    estimated on the labelled batch beside them.
    """
    distance = (student - teacher.detach()).pow(2).mean(dim=(2, 3))
    return torch.log(distance + floor.detach() + 1e-12).mean()


def student_loss(
    student: torch.Tensor,
    target: torch.Tensor,
    teacher: torch.Tensor,
    student_feature: torch.Tensor,
    teacher_feature: torch.Tensor,
) -> torch.Tensor:
    """The student's term of the online distillation (method.md): its own reference term, its
    distance to the teacher's detached output, and the BCE between fused features (the
    student's passed through the distiller's adapter). Images (N,B,H,W), features (N,C,H,W)."""
    return (
        teacher_loss(student, target)
        + DISTILLATION_WEIGHT * teacher_distance_loss(student, teacher, target)
        + AUXILIARY_WEIGHT * feature_distillation_loss(student_feature, teacher_feature)
    )
