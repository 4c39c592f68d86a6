"""The joint loss of CSAKD's online distillation, one function per term.

Spectra are compared after division by the scene scale ρ (so scenes of different units weigh
alike); none of the terms subtracts a mean, so the angle term sees true spectra.
Tensors are (N, B, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUXILIARY_WEIGHT = 0.1
# The paper's SmoothL1 default: quadratic for the errors that remain near the optimum, so
# training minimises what PSNR measures.
SMOOTH_L1_BETA = 1.0


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(prediction, target, beta=SMOOTH_L1_BETA)


def spectral_angle_loss(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 − mean cosine between predicted and reference spectra."""
    return 1.0 - F.cosine_similarity(prediction, target, dim=1, eps=eps).mean()


def bandwise_loss(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over bands of each band's L1 error relative to that band's mean magnitude,
    so that dark bands (blue, SWIR edges) count as much as bright ones."""
    error = (prediction - target).abs().mean(dim=(2, 3))
    magnitude = target.abs().mean(dim=(2, 3))
    return (error / (magnitude + eps)).mean()


def feature_distillation_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of the student's fused feature against sigmoid(teacher's, detached)."""
    return F.binary_cross_entropy_with_logits(student_feature, torch.sigmoid(teacher_feature.detach()))


def teacher_loss(teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (
        reconstruction_loss(teacher, target)
        + AUXILIARY_WEIGHT * spectral_angle_loss(teacher, target)
        + AUXILIARY_WEIGHT * bandwise_loss(teacher, target)
    )


def student_loss(
    student: torch.Tensor,
    target: torch.Tensor,
    teacher: torch.Tensor,
    student_feature: torch.Tensor,
    teacher_feature: torch.Tensor,
) -> torch.Tensor:
    return (
        reconstruction_loss(student, target)
        + AUXILIARY_WEIGHT * reconstruction_loss(student, teacher.detach())
        + AUXILIARY_WEIGHT * feature_distillation_loss(student_feature, teacher_feature)
        + AUXILIARY_WEIGHT * bandwise_loss(student, target)
        + AUXILIARY_WEIGHT * spectral_angle_loss(student, target)
    )
