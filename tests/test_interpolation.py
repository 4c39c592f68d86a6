"""The LR → HR interpolators of the fusion base."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from csakd_qgis import interpolation
from csakd_qgis.interpolation import consistent_kernel, interpolation_matrix, upsample_lr
from csakd_qgis.psf import SpatialDegradation, degrade_torch, wald


@pytest.fixture
def unregularised(monkeypatch):
    monkeypatch.setattr(interpolation, "CONSISTENT_REGULARISATION", 0.0)
    consistent_kernel.cache_clear()
    interpolation_matrix.cache_clear()
    yield
    consistent_kernel.cache_clear()
    interpolation_matrix.cache_clear()


def smooth_lr(rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1, 2, rows, cols))
    return torch.from_numpy(image)


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_bicubic_without_offset_is_torch_bicubic(scale):
    lr = smooth_lr(7, 9)
    expected = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)
    torch.testing.assert_close(upsample_lr(lr, wald(scale)), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_bicubic_with_offset_samples_the_moved_centres(scale):
    # LR centres moved by one whole LR pixel (s HR pixels): the same as upsampling unmoved and
    # moving the result by s HR pixels, away from the edges.
    lr = smooth_lr(8, 12)
    moved = upsample_lr(lr, wald(scale, (0.0, float(scale))))
    unmoved = upsample_lr(lr, wald(scale))
    inner = slice(3 * scale, 9 * scale)
    torch.testing.assert_close(moved[..., inner], unmoved[..., 3 * scale - scale : 9 * scale - scale], rtol=0, atol=1e-12)
    assert (moved - unmoved).abs().max() > 0.1


@pytest.mark.parametrize("kind", ["bicubic", "consistent"])
def test_a_window_is_the_crop_of_the_whole_upsampling(kind):
    degradation = SpatialDegradation(3, "gaussian", (0.6, 0.5), (0.5, -1.0))
    lr = smooth_lr(10, 11)
    whole = upsample_lr(lr, degradation, kind)
    for row, col, rows, cols in ((0, 0, 30, 33), (4, 7, 11, 5), (29, 32, 1, 1)):
        window = upsample_lr(lr, degradation, kind, (row, col, rows, cols))
        torch.testing.assert_close(window, whole[..., row : row + rows, col : col + cols], rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale,offset", [(2, (0.0, 0.0)), (4, (0.0, 0.0)), (8, (0.0, 0.0)), (3, (1.0, -0.5))])
def test_unregularised_it_is_a_right_inverse_of_the_wald_degradation(unregularised, scale, offset):
    lr = smooth_lr(30, 30)
    degradation = wald(scale, offset)
    back = degrade_torch(upsample_lr(lr, degradation, "consistent"), degradation)
    # The kernel is cut at 1e-3 of its peak: a few 1e-3 of values ~1. (At the edges too when
    # there is no offset: both mirror the image there.)
    inner = (Ellipsis, slice(3, -3), slice(3, -3)) if any(offset) else (Ellipsis,)
    torch.testing.assert_close(back[inner], lr[inner], rtol=0, atol=1e-2)
    # Bicubic upsampling is far from that.
    assert (degrade_torch(upsample_lr(lr, degradation), degradation) - lr).abs().max() > 0.3


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_regularised_it_keeps_constants_and_stays_closer_to_consistent_than_bicubic(scale):
    constant = torch.full((1, 1, 9, 11), 3.25, dtype=torch.float64)
    degradation = wald(scale)
    torch.testing.assert_close(upsample_lr(constant, degradation, kind="consistent"), torch.full((1, 1, 9 * scale, 11 * scale), 3.25, dtype=torch.float64))
    lr = smooth_lr(30, 30, seed=scale)
    consistent_error = (degrade_torch(upsample_lr(lr, degradation, kind="consistent"), degradation) - lr).norm()
    bicubic_error = (degrade_torch(upsample_lr(lr, degradation), degradation) - lr).norm()
    print(f"×{scale}: LR error after upsampling and degrading, consistent {consistent_error:.2f}, bicubic {bicubic_error:.2f}")
    assert consistent_error < 0.5 * bicubic_error



@pytest.mark.parametrize(
    "degradation",
    [
        SpatialDegradation(3, "box", (0.0, 0.0)),
        SpatialDegradation(4, "box-gaussian", (0.3, 0.3), (0.5, 0.0)),
        SpatialDegradation(3, "gaussian", (0.53, 0.8), (0.5, -0.5)),
    ],
    ids=["box×3", "box-gaussian×4", "anisotropic×3"],
)
def test_the_consistent_interpolator_follows_the_scenes_psf(unregularised, degradation):
    # The interpolator is derived from the degradation it is given (not from the Wald Gaussian):
    # unregularised it inverts that degradation, and the Wald one's interpolator does not.
    lr = smooth_lr(30, 30, seed=1)
    inner = (Ellipsis, slice(3, -3), slice(3, -3))
    back = degrade_torch(upsample_lr(lr, degradation, "consistent"), degradation)
    torch.testing.assert_close(back[inner], lr[inner], rtol=0, atol=1e-2)
    assumed = wald(degradation.scale, degradation.offset)
    wrong = degrade_torch(upsample_lr(lr, assumed, "consistent"), degradation)
    assert (wrong - lr)[inner].abs().max() > 0.1
    constant = torch.full((1, 1, 9, 11), 3.25, dtype=torch.float64)
    torch.testing.assert_close(
        upsample_lr(constant, degradation, "consistent"),
        torch.full((1, 1, 9 * degradation.scale, 11 * degradation.scale), 3.25, dtype=torch.float64),
    )


@pytest.mark.parametrize("scale", [3, 4])
def test_unregularised_it_inverts_a_narrow_gaussian_too(unregularised, scale):
    # σ = 0.35 HSI pixels is one of the validation PSFs (and σ = 0.4 the rows of its
    # anisotropic one); the consistent base must keep what the LR-HSI says for them as well.
    degradation = SpatialDegradation(scale, "gaussian", (0.35, 0.4), (0.5, -0.5))
    lr = smooth_lr(30, 30, seed=2)
    inner = (Ellipsis, slice(3, -3), slice(3, -3))
    back = degrade_torch(upsample_lr(lr, degradation, "consistent"), degradation)
    torch.testing.assert_close(back[inner], lr[inner], rtol=0, atol=1e-2)
