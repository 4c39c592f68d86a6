import math

import pytest
import torch

from csakd_qgis.losses import (
    PSNR_LOSS_FLOOR,
    band_psnr_loss,
    feature_distillation_loss,
    floored_distance_loss,
    spectral_angle_loss,
    student_loss,
    teacher_distance_loss,
    teacher_loss,
)


def spectra(*vectors):
    """(N=1, B, H=1, W=len(vectors)): one spectrum per pixel."""
    return torch.tensor(vectors, dtype=torch.float64).T.reshape(1, len(vectors[0]), 1, len(vectors))


def test_spectral_angle_loss_of_identical_spectra_is_zero():
    x = spectra([1.0, 2.0, 3.0], [0.5, 0.1, 4.0])
    assert spectral_angle_loss(x, x).item() == pytest.approx(0.0, abs=1e-12)
    # Scaling a spectrum keeps its angle.
    assert spectral_angle_loss(3 * x, x).item() == pytest.approx(0.0, abs=1e-12)


def test_spectral_angle_loss_of_orthogonal_spectra_is_one():
    assert spectral_angle_loss(spectra([1.0, 0.0]), spectra([0.0, 2.0])).item() == pytest.approx(1.0, abs=1e-12)


def test_spectral_angle_loss_at_sixty_degrees():
    # cos 60° = 0.5, so the loss is 1 − 0.5 = 0.5.
    a = spectra([1.0, 0.0])
    b = spectra([math.cos(math.radians(60)), math.sin(math.radians(60))])
    assert spectral_angle_loss(a, b).item() == pytest.approx(0.5, abs=1e-12)
    # Averaged over pixels: one identical pair (0) and one 60° pair (0.5) give 0.25.
    two = spectral_angle_loss(spectra([1.0, 0.0], [1.0, 0.0]), spectra([1.0, 0.0], [0.5, math.sqrt(3) / 2]))
    assert two.item() == pytest.approx(0.25, abs=1e-12)


def test_band_psnr_loss_by_hand():
    # Two bands, two pixels. band 0: target (1, 3), prediction (2, 3): MSE 0.5, peak 3;
    # band 1: target (−4, 4), prediction (−4, 0): MSE 8, peak 4. Mean of ln(MSE + (ε·peak)²).
    target = torch.tensor([[[[1.0, 3.0]], [[-4.0, 4.0]]]], dtype=torch.float64)
    prediction = torch.tensor([[[[2.0, 3.0]], [[-4.0, 0.0]]]], dtype=torch.float64)
    eps = PSNR_LOSS_FLOOR
    expected = (math.log(0.5 + (3 * eps) ** 2) + math.log(8 + (4 * eps) ** 2)) / 2
    assert band_psnr_loss(prediction, target).item() == pytest.approx(expected, rel=1e-9)


def test_band_psnr_loss_is_the_metric_up_to_a_constant():
    from csakd_qgis.metrics import psnr

    g = torch.Generator().manual_seed(4)
    brightness = torch.tensor([1.0, 10, 100, 0.1, 3], dtype=torch.float64).view(1, 5, 1, 1)
    target = torch.rand(1, 5, 8, 8, generator=g, dtype=torch.float64) * brightness
    noise = torch.randn(2, 5, 8, 8, generator=g, dtype=torch.float64) * brightness
    better, worse = target + 0.01 * noise[:1], target + 0.02 * noise[1:]
    # The loss falls exactly as the band-averaged PSNR rises (−10/ln 10 dB per unit), whatever
    # the bands' brightness; at these errors (~40 dB) the 60 dB floor moves it by about 1 %.
    gain_db = psnr(target[0].numpy(), better[0].numpy()) - psnr(target[0].numpy(), worse[0].numpy())
    drop = band_psnr_loss(worse, target) - band_psnr_loss(better, target)
    assert drop.item() * 10 / math.log(10) == pytest.approx(gain_db, rel=0.02)


def test_band_psnr_loss_weighs_dark_and_bright_bands_alike():
    # The same 10 % error in a band 1000 times brighter costs the same.
    dark = torch.tensor([[[[1.0, 2.0]], [[1000.0, 2000.0]]]], dtype=torch.float64)
    one = dark.clone()
    one[0, 0] *= 1.1
    other = dark.clone()
    other[0, 1] *= 1.1
    assert band_psnr_loss(one, dark).item() == pytest.approx(band_psnr_loss(other, dark).item(), rel=1e-6)


def test_feature_loss_of_zero_logits_is_ln2():
    # BCE(x = 0, p) = −p·ln σ(0) − (1 − p)·ln(1 − σ(0)) = ln 2 for every target p.
    teacher_feature = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    loss = feature_distillation_loss(torch.zeros(2, 5, 3, 3), teacher_feature)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_feature_loss_is_lowest_where_student_matches_teacher():
    # d/dx BCE(x, σ(t)) = σ(x) − σ(t): zero at x = t, so x = t is the minimum.
    t = torch.tensor([[[[1.5]]]])
    at_teacher = feature_distillation_loss(t.clone(), t)
    assert at_teacher < feature_distillation_loss(t + 0.3, t)
    assert at_teacher < feature_distillation_loss(t - 0.3, t)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 6, 4, 5, generator=g, dtype=torch.float64) + 0.1 for _ in range(3)] + [
        torch.randn(2, 8, 4, 5, generator=g, dtype=torch.float64) for _ in range(2)
    ]


def test_teacher_loss_is_the_weighted_sum_of_its_terms():
    teacher, target, *_ = _batch(1)
    # The band-PSNR reconstruction term + 0.1·SAM (losses.py's docstring says why not SmoothL1).
    expected = band_psnr_loss(teacher, target) + 0.1 * spectral_angle_loss(teacher, target)
    torch.testing.assert_close(teacher_loss(teacher, target), expected, rtol=1e-12, atol=0)


def test_student_loss_is_the_weighted_sum_of_its_terms():
    student, target, teacher, student_feature, teacher_feature = _batch(2)
    # The reference term + 0.5·distance to the teacher (floored at its own error) + 0.1·BCE(features).
    expected = (
        teacher_loss(student, target)
        + 0.5 * teacher_distance_loss(student, teacher, target)
        + 0.1 * feature_distillation_loss(student_feature, teacher_feature)
    )
    result = student_loss(student, target, teacher, student_feature, teacher_feature)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=0)
    # Every term contributes: a loss missing one of them would differ by at least this much.
    smallest_term = min(
        abs(0.5 * teacher_distance_loss(student, teacher, target)),
        0.1 * feature_distillation_loss(student_feature, teacher_feature),
        0.1 * spectral_angle_loss(student, target),
    )
    assert smallest_term > 1e-4


def test_student_loss_does_not_train_the_teacher():
    student, target, teacher, student_feature, teacher_feature = _batch(3)
    for t in (student, teacher, student_feature, teacher_feature):
        t.requires_grad_(True)
    student_loss(student, target, teacher, student_feature, teacher_feature).backward()
    assert teacher.grad is None
    assert teacher_feature.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert student_feature.grad is not None and student_feature.grad.abs().sum() > 0


def test_teacher_distance_loss_by_hand():
    # One band, two pixels: student (1, 2), teacher (2, 2), target (2, 5): distance MSE 0.5,
    # the teacher's own MSE 4.5; ln(0.5 + 4.5).
    student = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64)
    teacher = torch.tensor([[[[2.0, 2.0]]]], dtype=torch.float64)
    target = torch.tensor([[[[2.0, 5.0]]]], dtype=torch.float64)
    assert teacher_distance_loss(student, teacher, target).item() == pytest.approx(math.log(5.0), rel=1e-12)


def test_the_floored_distance_with_the_teachers_own_error_is_the_teacher_distance():
    # The transfer set's term (no reference) is the same distance, its floor given: with the
    # teacher's own error as the floor it is teacher_distance_loss exactly; a floor per band (B,)
    # applies to every image.
    g = torch.Generator().manual_seed(3)
    student, teacher, target = (torch.rand(2, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    own = (teacher - target).pow(2).mean(dim=(2, 3))
    assert floored_distance_loss(student, teacher, own).item() == pytest.approx(
        teacher_distance_loss(student, teacher, target).item(), rel=1e-12)
    floor = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    distance = (student - teacher).pow(2).mean(dim=(2, 3))
    assert floored_distance_loss(student, teacher, floor).item() == pytest.approx(
        torch.log(distance + floor).mean().item(), rel=1e-12)


def test_the_pull_towards_the_teacher_grows_with_the_distance_and_never_outweighs_the_reference():
    """At the start of co-training student and teacher are both near their bases, far closer to
    each other than to the reference. The distance floored at the teacher's error pulls in
    proportion to the student's distance from the teacher, up to about the reference term's pull
    where that distance is the teacher's own error; the plain ln MSE(S, T) pulled hardest where
    the student was closest, many times the reference term."""
    g = torch.Generator().manual_seed(5)
    target = torch.rand(1, 6, 8, 8, generator=g, dtype=torch.float64) + 0.5
    teacher = target + 0.05 * torch.randn(1, 6, 8, 8, generator=g, dtype=torch.float64)
    direction = torch.randn(1, 6, 8, 8, generator=g, dtype=torch.float64)

    def pulls(distance):
        student = (teacher + distance * direction).requires_grad_(True)
        found = []
        for loss in (band_psnr_loss(student, target), teacher_distance_loss(student, teacher, target),
                     band_psnr_loss(student, teacher)):
            (gradient,) = torch.autograd.grad(loss, student)
            found.append(gradient.norm().item())
        return found

    near, nearer, far = pulls(0.01), pulls(0.002), pulls(0.05)  # the teacher's own error: 0.05
    for reference, floored, plain in (near, nearer):
        assert floored < 0.25 * reference and plain > 5 * reference
    assert nearer[1] < near[1] < far[1]
    assert 0.5 * far[0] < far[1] < 2 * far[0]
