import math

import numpy as np
import pytest

from csakd_qgis.synthetic import signature_mixture
from tests.helpers import randomise_head
import torch
import torch.nn.functional as F

from csakd_qgis.degradation import blur_and_decimate
from csakd_qgis.model import (
    FusionModelConfig,
    SceneStatistics,
    SubspaceFusionModel,
    stack_statistics,
)
from csakd_qgis.interpolation import upsample_lr
from csakd_qgis.psf import SpatialDegradation, degrade_torch, wald
from csakd_qgis.network import NetworkConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear_scene(bands=12, rank=4, msi_bands=4, rows=9, cols=11, seed=0):
    """A scene whose spectra lie exactly in a ``rank``-dimensional affine subspace and whose
    MSI is an invertible linear map of the subspace coefficients plus an offset: the
    coefficients are then an exact linear function of the MSI."""
    rng = np.random.default_rng(seed)
    endmembers = rng.random((bands, rank))
    coefficients = rng.normal(size=(rank, rows * cols))
    mean = rng.random(bands) + 1.0
    hsi = (mean[:, None] + endmembers @ coefficients).reshape(bands, rows, cols)
    mixing = rng.normal(size=(msi_bands, rank)) + 2 * np.eye(msi_bands, rank)
    msi = (mixing @ coefficients + rng.random((msi_bands, 1))).reshape(msi_bands, rows, cols)
    return hsi, msi


def subspace_coefficients(stats, hsi):
    return stats.basis.T @ (hsi.reshape(hsi.shape[0], -1) - stats.band_mean[:, None]) / stats.scale


def regression_prediction(stats, msi):
    z = (msi.reshape(msi.shape[0], -1) - stats.msi_mean[:, None]) / stats.msi_std[:, None]
    return stats.regression @ np.vstack([z, np.ones((1, z.shape[1]))])


def test_basis_is_orthonormal():
    rng = np.random.default_rng(1)
    # Six spectral signatures mixed at random, and noise 40 dB below them.
    hsi = signature_mixture(rng, 15, 6, 10, 12)
    hsi += 0.01 * hsi.std() * rng.standard_normal(hsi.shape)
    msi = rng.random((3, 10, 12))
    stats = SceneStatistics.estimate(hsi, msi, subspace_dim=6)
    assert stats.basis.shape == (15, 6)
    assert stats.signal_components == 6
    np.testing.assert_allclose(stats.basis.T @ stats.basis, np.eye(6), atol=1e-12)


def test_components_below_the_noise_are_left_out_of_the_subspace(monkeypatch):
    """HySime's rule (model.signal_subspace_dimension) on a real cube: without added noise the
    16 components all carry signal; with 30 dB noise on the LR-HSI only the leading ones do,
    the log says so, and those sharpened alone fuse better than all 16; pure noise keeps none."""
    from csakd_qgis import datasets, metrics
    from csakd_qgis import model as model_module
    from csakd_qgis.api import fuse_arrays
    from csakd_qgis.train import student_config

    cube = datasets.validation_cubes()[0]
    sensor = datasets.validation_sensors()["Sentinel-2 10 m"]
    model = SubspaceFusionModel(student_config(16)).eval()
    kept, quality, logs = {}, {}, {}
    for snr in (None, 30.0):
        case = datasets.make_wald_case(cube, sensor, 4, rng=np.random.default_rng(0), hsi_snr_db=snr)
        stats = datasets.case_statistics(case, 16)
        kept[snr] = stats.signal_components
        assert not stats.basis[:, kept[snr]:].any() and stats.basis[:, kept[snr] - 1].any()
        logs[snr] = []
        with_rule = fuse_arrays(case.lr_hsi, case.hr_msi, model=model, log=logs[snr].append)
        with monkeypatch.context() as patched:
            patched.setattr(model_module, "signal_subspace_dimension", lambda covariance, n, eigenvalues, basis: basis.shape[1])
            all_components = fuse_arrays(case.lr_hsi, case.hr_msi, model=model)
        quality[snr] = [(metrics.psnr(case.reference, f), metrics.sam(case.reference, f)) for f in (with_rule, all_components)]
    print(f"{cube.name} ×4: components kept {kept}; PSNR / SAM with the rule and with all 16: {quality}")
    assert kept[None] == 16 and 4 <= kept[30.0] < 16
    assert quality[None][0] == quality[None][1]
    assert not any("spectral components to sharpen" in line for line in logs[None])
    assert any(f"leaves {kept[30.0]} of the model's 16 spectral components" in line for line in logs[30.0])
    (psnr_rule, sam_rule), (psnr_all, sam_all) = quality[30.0]
    assert psnr_rule > psnr_all + 0.2 and sam_rule < sam_all - 0.1
    rng = np.random.default_rng(2)
    assert SceneStatistics.estimate(rng.random((60, 30, 30)), rng.random((3, 30, 30)), 8).signal_components == 0
    # Too few bands to tell noise from what a band does not share with the others: all kept.
    assert SceneStatistics.estimate(rng.random((20, 30, 30)), rng.random((3, 30, 30)), 8).signal_components == 8
    # A constant image has nothing to estimate (and must not fail).
    assert SceneStatistics.estimate(np.ones((60, 30, 30)), rng.random((3, 30, 30)), 8).signal_components == 8


def test_regression_recovers_an_exactly_linear_relation():
    hsi, msi = linear_scene()
    # ridges = 0: the default ridges shrink the fit by ~1e-3, which would hide an error of that size.
    stats = SceneStatistics.estimate(hsi, msi, subspace_dim=4, ridge=0.0, detail_ridge=0.0)
    truth = subspace_coefficients(stats, hsi)
    # The data is exactly rank 4, so the basis spans it and the coefficients reproduce the spectra.
    reconstructed = stats.band_mean[:, None] + stats.scale * stats.basis @ truth
    np.testing.assert_allclose(reconstructed, hsi.reshape(12, -1), atol=1e-9)
    np.testing.assert_allclose(regression_prediction(stats, msi), truth, atol=1e-6)


def test_default_ridge_stays_close_to_the_exact_relation():
    hsi, msi = linear_scene(seed=3)
    stats = SceneStatistics.estimate(hsi, msi, subspace_dim=4)
    truth = subspace_coefficients(stats, hsi)
    error = np.abs(regression_prediction(stats, msi) - truth).max()
    # Measured 1.0 % (default detail ridge 3e-3): the ridge shrinks the fit slightly, it must
    # not distort it.
    assert error < 0.02 * np.abs(truth).max()


def test_detail_weights_follow_the_texture_not_the_average():
    # Two components: the first carries the MSI's texture exactly; the second follows the MSI's
    # smooth, large-scale pattern but has a texture of its own. Fitted on the whole signal, the
    # second component's weight is that of the large-scale pattern and the base would sharpen it
    # with the MSI's edges; fitted on the high-pass parts, its weight is close to zero.
    rng = np.random.default_rng(4)
    rows = cols = 40
    yy, xx = np.mgrid[0:rows, 0:cols] / rows
    smooth = np.sin(2 * np.pi * yy) + np.cos(2 * np.pi * xx)
    texture = rng.normal(size=(rows, cols))
    own_texture = rng.normal(size=(rows, cols))
    msi = np.stack([smooth + texture, rng.normal(size=(rows, cols)) * 0.01])
    first, second = smooth + texture, 4 * smooth + own_texture
    endmembers = rng.random((10, 2)) + np.eye(10, 2)
    hsi = endmembers @ np.stack([first.ravel(), second.ravel()]) + 1.0
    hsi = hsi.reshape(10, rows, cols)
    stats = SceneStatistics.estimate(hsi, msi, subspace_dim=2, detail_ridge=0.0)
    # The whole-signal weights, fitted here by plain least squares.
    coefficients = subspace_coefficients(stats, hsi)
    z = (msi.reshape(2, -1) - stats.msi_mean[:, None]) / stats.msi_std[:, None]
    design = np.vstack([z, np.ones((1, z.shape[1]))])
    full = np.linalg.lstsq(design.T, coefficients.T, rcond=None)[0].T[:, :2]
    # Map both onto the two components (the basis mixes them): predicted coefficient images.
    detail_prediction = stats.regression[:, :2] @ z
    full_prediction = full @ z
    to_components = np.linalg.lstsq(np.stack([first.ravel(), second.ravel()]).T, coefficients.T, rcond=None)[0]
    from_components = np.linalg.inv(to_components)
    detail_components = (detail_prediction.T @ from_components).T
    full_components = (full_prediction.T @ from_components).T
    # Whole-signal weights put the MSI's texture into the second component; detail weights
    # leave it (almost) out, and keep the first component's weight.
    assert abs(np.corrcoef(full_components[1], texture.ravel())[0, 1]) > 0.3
    assert detail_components[1].std() < 0.35 * full_components[1].std()
    np.testing.assert_allclose(detail_components[0], full_components[0], atol=0.2 * full_components[0].std())


def _assert_same_statistics(a, b):
    np.testing.assert_allclose(a.band_mean, b.band_mean, rtol=1e-10)
    assert a.scale == pytest.approx(b.scale, rel=1e-10)
    np.testing.assert_allclose(a.basis, b.basis, atol=1e-8)
    np.testing.assert_allclose(a.msi_mean, b.msi_mean, rtol=1e-10)
    np.testing.assert_allclose(a.msi_std, b.msi_std, rtol=1e-10)
    np.testing.assert_allclose(a.regression, b.regression, atol=1e-8)


def test_nan_pixels_and_invalid_pixels_are_left_out_of_the_fit():
    rng = np.random.default_rng(2)
    hsi = rng.random((10, 8, 9))
    msi = rng.random((3, 8, 9))
    # Without the detail step, which depends on where the pixels are and not only on which.
    reference = SceneStatistics.estimate(hsi[:, :, 2:], msi[:, :, 2:], subspace_dim=3, detail_ridge=None)

    damaged_hsi, damaged_msi = hsi.copy(), msi.copy()
    damaged_hsi[4, :, 0] = np.nan  # one band missing is enough to drop the pixel
    damaged_msi[:, :, 1] = 1e6  # finite nonsense, excluded only by the mask
    valid = np.ones((8, 9), bool)
    valid[:, 1] = False
    stats = SceneStatistics.estimate(damaged_hsi, damaged_msi, subspace_dim=3, valid=valid, detail_ridge=None)
    _assert_same_statistics(stats, reference)
    with_detail = SceneStatistics.estimate(damaged_hsi, damaged_msi, subspace_dim=3, valid=valid)
    assert np.isfinite(with_detail.regression).all()


def test_fewer_than_four_valid_pixels_is_an_error():
    rng = np.random.default_rng(0)
    hsi = rng.random((6, 5, 5))
    msi = rng.random((3, 5, 5))
    valid = np.zeros((5, 5), bool)
    valid[0, :3] = True
    with pytest.raises(ValueError, match="fewer than 4 pixels"):
        SceneStatistics.estimate(hsi, msi, 3, valid=valid)
    # The fourth pixel makes it fittable.
    valid[0, 3] = True
    SceneStatistics.estimate(hsi, msi, 3, valid=valid)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    network = NetworkConfig(4, 4, width=8, growth=4, blocks=(1, 1, 1, 1), attention_dim=8, heads=2, unshuffle=4)
    return randomise_head(SubspaceFusionModel(FusionModelConfig(network, subspace_dim=4)), seed).eval()


def scene_inputs(bands, lr_rows, lr_cols, scale, msi_bands=3, seed=0):
    """A random LR-HSI of six spectral signatures (more than the tests' subspaces hold) and an
    unrelated random MSI."""
    rng = np.random.default_rng(seed)
    lr = signature_mixture(rng, bands, 6, lr_rows, lr_cols).astype(np.float32)
    hr = rng.random((msi_bands, lr_rows * scale, lr_cols * scale)).astype(np.float32)
    return lr, hr


@pytest.mark.parametrize("lr_size,scale", [((5, 7), 3), ((3, 3), 2), ((6, 5), 4)])
def test_sizes_not_a_multiple_of_the_unshuffle_factor(lr_size, scale):
    model = tiny_model()
    lr, hr = scene_inputs(9, *lr_size, scale)
    stats = SceneStatistics.estimate(lr, blur_and_decimate(hr, scale), 4).to_tensors()
    with torch.no_grad():
        out = model(torch.from_numpy(lr)[None], torch.from_numpy(hr)[None], stats)
    assert out.image.shape == (1, 9, lr_size[0] * scale, lr_size[1] * scale)
    assert torch.isfinite(out.image).all()


def test_hr_size_must_be_a_multiple_of_the_lr_size():
    model = tiny_model()
    lr, hr = scene_inputs(9, 4, 4, 3)
    stats = SceneStatistics.estimate(lr, blur_and_decimate(hr, 3), 4).to_tensors()
    with pytest.raises(ValueError, match="integer multiple"):
        model(torch.from_numpy(lr)[None], torch.from_numpy(hr)[None, :, :12, :11], stats)


def _zero_head(model):
    with torch.no_grad():
        model.network.head_refine.weight.zero_()
        model.network.head_refine.bias.zero_()


@pytest.mark.parametrize(
    "degradation",
    [None, SpatialDegradation(4, "box", (0.0, 0.0), (0.5, -0.25)), SpatialDegradation(4, "gaussian", (0.4, 0.65))],
    ids=["wald", "box-offset", "anisotropic"],
)
def test_zero_head_output_keeps_the_lr_subspace_and_takes_the_rest_from_the_msi(degradation):
    # bicubic(LR) outside the subspace; inside it P·c + (I − P·D)·m, with P the consistent
    # interpolator (tested in test_interpolation.py), c the LR coefficients, m the MSI-predicted
    # ones, D and P those of the scene's degradation (the Wald Gaussian when none was fitted).
    model = tiny_model()
    _zero_head(model)
    scale = 4
    lr, hr = scene_inputs(9, 6, 5, scale, seed=4)
    statistics = SceneStatistics.estimate(lr, blur_and_decimate(hr, degradation or scale), 4)
    statistics.degradation = degradation
    stats = statistics.to_tensors()
    degradation = degradation or wald(scale)
    lr_t, hr_t = torch.from_numpy(lr)[None], torch.from_numpy(hr)[None]
    with torch.no_grad():
        out = model(lr_t, hr_t, stats).image
        coefficients, predicted = model.encode(lr_t, hr_t, stats)
    size = (24, 20)

    def consistent(x):
        return upsample_lr(x, degradation, kind="consistent")

    bicubic = upsample_lr(lr_t, degradation, "bicubic")
    if not any(degradation.offset):
        torch.testing.assert_close(bicubic, F.interpolate(lr_t, size=size, mode="bicubic", align_corners=False))
    subspace = consistent(coefficients) + predicted - consistent(degrade_torch(predicted, degradation))
    detail = subspace - upsample_lr(coefficients, degradation, "bicubic")
    expected = bicubic + stats["scale"] * torch.einsum("bk,nkhw->nbhw", stats["basis"][0], detail)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    # The MSI does carry detail here, so the comparison above is not bicubic against bicubic.
    assert (out - bicubic).abs().max() > 1e-1


@pytest.mark.parametrize(
    "degradation",
    [wald(4), wald(3, (1.0, -0.5)), SpatialDegradation(3, "box", (0.0, 0.0), (0.5, 0.0)), SpatialDegradation(4, "gaussian", (0.4, 0.65), (0.5, -0.5))],
    ids=["wald×4", "wald×3-offset", "box×3-offset", "anisotropic×4-offset"],
)
def test_the_network_correction_barely_changes_what_the_lr_hsi_sees(degradation):
    # The correction r goes through (I − P·D): degraded back to the LR grid, little of it is
    # left, so the network cannot contradict the LR-HSI. (Exactly nothing would be left with
    # an unregularised P; the regularisation lets a small share through.)
    scale = degradation.scale
    model = tiny_model(seed=2)
    assert model.network.head_refine.weight.abs().max() > 0
    lr, hr = scene_inputs(9, 12, 12, scale, seed=5)  # HR sides a multiple of the network's 4
    statistics = SceneStatistics.estimate(lr, blur_and_decimate(hr, degradation), 4)
    statistics.degradation = degradation
    stats = statistics.to_tensors()
    lr_t, hr_t = torch.from_numpy(lr)[None], torch.from_numpy(hr)[None]
    with torch.no_grad():
        with_correction, _ = model.subspace_detail(lr_t, hr_t, stats)
        coefficients, predicted = model.encode(lr_t, hr_t, stats)
        correction = model.network(coefficients, predicted).image - F.interpolate(
            coefficients, size=predicted.shape[-2:], mode="bicubic", align_corners=False
        )
        _zero_head(model)
        without, _ = model.subspace_detail(lr_t, hr_t, stats)
    added = with_correction - without
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    seen_added = degrade_torch(added, degradation)[inner].norm()
    seen_correction = degrade_torch(correction, degradation)[inner].norm()
    print(f"correction seen on the LR grid: {seen_added / seen_correction:.3f} of the raw correction's")
    assert added.abs().max() > 1e-2  # the correction is there, at high resolution
    assert seen_added < 0.05 * seen_correction  # measured 0.009–0.010


def test_statistics_of_a_larger_subspace_serve_a_smaller_model_exactly():
    # Teacher (larger K) and student train on one fit: the student reads its first K components,
    # which must be what a fit at its own K gives, and so fuse to the same image.
    rng = np.random.default_rng(7)
    lr = signature_mixture(rng, 20, 12, 12, 12).astype(np.float32)
    hr = rng.random((4, 36, 36)).astype(np.float32)
    msi_at_lr = blur_and_decimate(hr, 3)
    own = SceneStatistics.estimate(lr, msi_at_lr, subspace_dim=4)
    larger = SceneStatistics.estimate(lr, msi_at_lr, subspace_dim=9)
    np.testing.assert_allclose(larger.basis[:, :4], own.basis, atol=1e-10)
    np.testing.assert_allclose(larger.regression[:4], own.regression, atol=1e-10)
    assert np.abs(larger.basis[:, 4:]).max() > 0.1  # the larger fit does hold more components
    model = tiny_model(seed=3)
    lr_t, hr_t = torch.from_numpy(lr)[None], torch.from_numpy(hr)[None]
    with torch.no_grad():
        from_own = model(lr_t, hr_t, own.to_tensors()).image
        from_larger = model(lr_t, hr_t, larger.to_tensors()).image
    torch.testing.assert_close(from_larger, from_own, rtol=0, atol=1e-5)


def test_the_statistics_carry_the_scenes_degradation_to_the_model():
    rng = np.random.default_rng(8)
    lr = rng.random((9, 6, 6)).astype(np.float32)
    hr = rng.random((3, 18, 18)).astype(np.float32)
    statistics = SceneStatistics.estimate(lr, blur_and_decimate(hr, 3), 4)
    assert statistics.degradation is None and statistics.offset == (0.0, 0.0)
    box = SpatialDegradation(3, "box", (0.0, 0.0), (0.5, -1.0))
    statistics.degradation = box
    assert statistics.offset == (0.5, -1.0)
    assert statistics.to_tensors()["degradation"] == box
    other = SceneStatistics.estimate(lr, blur_and_decimate(hr, 3), 4)
    other.degradation = wald(3)
    with pytest.raises(ValueError, match="share one spatial degradation"):
        stack_statistics([statistics, other])
    # The degradation decides the fusion: the box's and the Wald Gaussian's differ.
    model = tiny_model(seed=1)
    lr_t, hr_t = torch.from_numpy(lr)[None], torch.from_numpy(hr)[None]
    with torch.no_grad():
        as_box = model(lr_t, hr_t, statistics.to_tensors()).image
        as_wald = model(lr_t, hr_t, other.to_tensors()).image
    assert (as_box - as_wald).abs().max() > 1e-2
    # Statistics fitted for another scale are refused, not silently rescaled.
    with pytest.raises(ValueError, match="scale 3"):
        model(torch.from_numpy(lr[:, :3, :3])[None], hr_t, statistics.to_tensors())


def test_an_untrained_correction_is_not_computed_and_the_output_is_unchanged():
    # With its output convolution at zero the network's correction is exactly zero; inference
    # skips the network (no fused feature comes back) and gives bit for bit the same image.
    model = tiny_model()
    _zero_head(model)
    lr, hr = scene_inputs(9, 6, 5, 4)
    stats = SceneStatistics.estimate(lr, blur_and_decimate(hr, 4), 4).to_tensors()
    inputs = (torch.from_numpy(lr)[None], torch.from_numpy(hr)[None], stats)
    assert model.correction_is_zero()
    with torch.no_grad():
        skipped = model(*inputs)
        model.skip_zero_correction = False
        computed = model(*inputs)
    assert skipped.fused is None and computed.fused is not None
    assert torch.equal(skipped.image, computed.image)
    # Training needs the features for the zeroed convolution's gradient: it always runs them.
    model.skip_zero_correction = True
    trained = model(*inputs)
    assert trained.fused is not None
    trained.image.sum().backward()
    assert model.network.head_refine.weight.grad.abs().sum() > 0
    # A trained (non-zero) head is always run.
    assert not tiny_model().correction_is_zero()
    with torch.no_grad():
        assert tiny_model()(*inputs).fused is not None


def _without(stats, fields):
    return {name: value for name, value in stats.items() if name not in fields}


def test_the_spectral_consistency_step_moves_the_fusion_towards_the_msi_and_the_truth(potsdam_c):
    # EnMAP Potsdam C (a validation cube) with a simulated WorldView-2 MSI at scale 4. The step
    # adds G·(m − A·x) through (I − P·D): the fused image's MSI residual shrinks, the LR-HSI sees
    # nothing of what was added, and the result is nearer the truth (measured +0.11 dB PSNR). Most
    # of the MSI residual is detail outside the student's components, which the step leaves alone.
    from csakd_qgis.datasets import case_statistics, make_wald_case, validation_sensors
    from csakd_qgis.metrics import psnr
    from csakd_qgis.model import SPECTRAL_MODEL_FIELDS, normalised_msi, spectral_consistency_gain
    from csakd_qgis.train import student_config

    k = student_config().subspace_dim
    case = make_wald_case(potsdam_c, validation_sensors()["WorldView-2"], 4)
    statistics = case_statistics(case, k)
    with_step = statistics.to_tensors()
    without_step = _without(with_step, SPECTRAL_MODEL_FIELDS)
    model = SubspaceFusionModel(student_config()).eval()
    lr_t, hr_t = torch.from_numpy(case.lr_hsi)[None], torch.from_numpy(case.hr_msi)[None]
    with torch.no_grad():
        detail_on, _ = model.subspace_detail(lr_t, hr_t, with_step)
        detail_off, _ = model.subspace_detail(lr_t, hr_t, without_step)
        bicubic_coefficients = upsample_lr(model.encode(lr_t, hr_t, with_step)[0], case.degradation, "bicubic")
        to_msi, gain = spectral_consistency_gain(with_step, k, case.degradation)
        assert gain.shape == (1, k, case.hr_msi.shape[0]) and to_msi.shape == (1, case.hr_msi.shape[0], k)

        def msi_residual(detail):
            # The part the step can change: what the LR grid does not see.
            image = bicubic_coefficients + detail
            residual = normalised_msi(hr_t, with_step) - torch.einsum("nmk,nkhw->nmhw", to_msi, image)
            return (residual - upsample_lr(degrade_torch(residual, case.degradation), case.degradation, "consistent")).norm()

        added = detail_on - detail_off
        inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
        seen = degrade_torch(added, case.degradation)[inner].norm() / degrade_torch(added, case.degradation).numel() ** 0.5
        spread = added.norm() / added.numel() ** 0.5
        fused_on = model(lr_t, hr_t, with_step).image[0].numpy()
        fused_off = model(lr_t, hr_t, without_step).image[0].numpy()
    print(f"MSI residual {msi_residual(detail_off):.1f} → {msi_residual(detail_on):.1f}; "
          f"PSNR {psnr(case.reference, fused_off):.3f} → {psnr(case.reference, fused_on):.3f} dB")
    assert msi_residual(detail_on) < 0.99 * msi_residual(detail_off)  # measured 6.08 → 5.93
    assert spread > 1e-3 and seen < 0.05 * spread
    assert psnr(case.reference, fused_on) > psnr(case.reference, fused_off) + 0.05


@pytest.mark.parametrize("sensor,scale", [("RGB", 3), ("Sentinel-2 10 m", 4)])
def test_detail_classes_add_what_one_scene_wide_regression_averages_away(potsdam_c, sensor, scale):
    # EnMAP Potsdam C (a validation cube), Wald pairs: per-class detail weights bring the fusion
    # nearer the truth than the scene-wide weights alone, without costing spectral angle
    # (measured: RGB ×3 +0.34 dB / −0.15°, Sentinel-2 10 m ×4 +0.20 dB / −0.08°).
    from csakd_qgis.datasets import case_statistics, make_wald_case, validation_sensors
    from csakd_qgis.metrics import psnr, sam
    from csakd_qgis.model import CLASS_FIELDS, DETAIL_CLASSES
    from csakd_qgis.train import student_config

    k = student_config().subspace_dim
    case = make_wald_case(potsdam_c, validation_sensors()[sensor], scale)
    statistics = case_statistics(case, k)
    assert statistics.class_weights.shape == (DETAIL_CLASSES, k, case.hr_msi.shape[0])
    again = case_statistics(case, k)
    np.testing.assert_array_equal(again.class_centres, statistics.class_centres)  # seeded: reproducible
    stats = statistics.to_tensors()
    model = SubspaceFusionModel(student_config()).eval()
    lr_t, hr_t = torch.from_numpy(case.lr_hsi)[None], torch.from_numpy(case.hr_msi)[None]
    with torch.no_grad():
        with_classes = model(lr_t, hr_t, stats).image[0].numpy()
        without = model(lr_t, hr_t, _without(stats, CLASS_FIELDS)).image[0].numpy()
    gain = psnr(case.reference, with_classes) - psnr(case.reference, without)
    spectral = sam(case.reference, with_classes) - sam(case.reference, without)
    print(f"{sensor} ×{scale}: PSNR {gain:+.3f} dB, SAM {spectral:+.3f}°")
    assert gain > 0.05
    assert spectral < 0.02


def test_a_larger_fit_serves_a_smaller_model_exactly_with_classes_and_the_msi_model(potsdam_c):
    # The teacher's fit (K = 32) serves the student (K = 16): the classes are found on the first
    # components, every component's class weights are fitted on their own, and the MSI model is
    # read for the first K components; so the student fuses as with a fit of its own.
    from csakd_qgis.datasets import case_statistics, make_wald_case, validation_sensors
    from csakd_qgis.train import student_config

    k = student_config().subspace_dim
    case = make_wald_case(potsdam_c, validation_sensors()["WorldView-2"], 3)
    own, larger = case_statistics(case, k), case_statistics(case, 32)
    assert own.class_weights is not None and own.msi_coefficient_cov is not None
    np.testing.assert_allclose(larger.class_centres, own.class_centres, atol=1e-6)
    np.testing.assert_allclose(larger.class_weights[:, :k], own.class_weights, atol=1e-6)
    model = SubspaceFusionModel(student_config()).eval()
    lr_t, hr_t = torch.from_numpy(case.lr_hsi)[None], torch.from_numpy(case.hr_msi)[None]
    with torch.no_grad():
        from_own = model(lr_t, hr_t, own.to_tensors()).image
        from_larger = model(lr_t, hr_t, larger.to_tensors()).image
    torch.testing.assert_close(from_larger, from_own, rtol=0, atol=1e-2)
    assert (from_own.abs().max()) > 100  # reflectance × 10⁴: the tolerance is relative to that


def tiny_grid_model(seed=0):
    from csakd_qgis.model import WAVELENGTH_GRID_NM

    torch.manual_seed(seed)
    g = WAVELENGTH_GRID_NM.size
    network = NetworkConfig(g, g, width=8, growth=4, blocks=(1, 1, 1, 1), attention_dim=8, heads=2, unshuffle=4)
    return randomise_head(SubspaceFusionModel(FusionModelConfig(network, subspace_dim=4, representation="grid")), seed).eval()


def test_a_grid_model_corrects_through_the_bands_centres_and_only_where_the_lr_hsi_cannot_see():
    """The grid representation (model.WAVELENGTH_GRID_NM): with the bands' centres the network
    runs on the grid and its correction, resampled onto the bands and the subspace, goes through
    the same (I − P·D) as the subspace's; without them the model is the base."""
    from csakd_qgis.model import wavelength_grid_maps

    scale = 4
    model = tiny_grid_model(seed=3)
    lr, hr = scene_inputs(9, 12, 12, scale, seed=5)
    wavelengths = np.linspace(450.0, 2400.0, 9)
    statistics = SceneStatistics.estimate(lr, blur_and_decimate(hr, scale), 4)
    base_stats = statistics.to_tensors()
    grid_stats = statistics.set_wavelengths(wavelengths).to_tensors()
    to, back = wavelength_grid_maps(wavelengths)
    np.testing.assert_allclose(grid_stats["grid_from_bands"][0].numpy(), to, rtol=1e-6)
    np.testing.assert_allclose(grid_stats["bands_from_grid"][0].numpy(), back, rtol=1e-6)
    lr_t, hr_t = torch.from_numpy(lr)[None], torch.from_numpy(hr)[None]
    with torch.no_grad():
        without_centres = model(lr_t, hr_t, base_stats)
        corrected = model(lr_t, hr_t, grid_stats)
        _zero_head(model)
        base = model(lr_t, hr_t, grid_stats)
    assert without_centres.fused is None and corrected.fused is not None
    assert torch.equal(without_centres.image, base.image)
    added = corrected.image - base.image
    assert added.abs().max() > 1e-3
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    assert degrade_torch(added, wald(scale))[inner].norm() < 0.05 * added[inner].norm()
    with pytest.raises(ValueError, match="3 band centres for 9 bands"):
        statistics.set_wavelengths(wavelengths[:3])


def test_the_aligned_frame_makes_one_basis_of_any_signs_and_rotation_of_the_components():
    """model.aligned_frame: U·R is the same for U and for U·Q (Q orthogonal within the signal
    subspace, sign flips included), so the aligned network's channels do not depend on the
    eigen-decomposition's conventions."""
    from csakd_qgis.model import aligned_frame, legendre_reference

    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(60, 16)))[0]
    basis[:, 11:] = 0.0  # beyond the signal subspace, as SceneStatistics.estimate leaves them
    rotation = np.eye(16)
    rotation[:11, :11] = np.linalg.qr(rng.normal(size=(11, 11)))[0]
    flips = np.diag(np.where(rng.random(16) < 0.5, -1.0, 1.0))
    assert (flips < 0).any()
    bases = torch.tensor(np.stack([basis, basis @ rotation, basis @ flips]))
    frame = aligned_frame(bases)
    torch.testing.assert_close(frame @ frame.transpose(1, 2), torch.eye(16, dtype=torch.float64).expand(3, 16, 16))
    aligned = bases @ frame
    torch.testing.assert_close(aligned[1], aligned[0])
    torch.testing.assert_close(aligned[2], aligned[0])
    assert not torch.allclose(aligned[0], bases[0])
    # The Procrustes optimum: no other rotation brings the components closer to the shapes.
    reference = torch.tensor(legendre_reference(60, 16))
    best = torch.linalg.norm(aligned[0] - reference)
    for _ in range(20):
        other = torch.tensor(basis @ np.linalg.qr(rng.normal(size=(16, 16)))[0])
        assert best <= torch.linalg.norm(other - reference)

    reference = legendre_reference(60, 4)
    np.testing.assert_allclose(reference.T @ reference, np.eye(4), atol=1e-12)
    assert np.allclose(reference[:, 0], reference[0, 0]) and reference[0, 0] > 0  # a level
    assert (np.diff(reference[:, 1]) > 0).all()  # a slope, rising along the bands
    np.testing.assert_allclose(reference[:, 2], reference[::-1, 2])  # a bend
    assert not legendre_reference(5, 8)[:, 5:].any()  # no more shapes than bands
    with pytest.raises(ValueError, match="at least one band"):
        legendre_reference(0, 2)


def _with_flipped_components(statistics, signs):
    """The same scene statistics with component k's sign flipped where signs[k] < 0: every
    field in coefficient units flipped with it, so the base is the same scene's."""
    from dataclasses import replace

    changes = {"basis": statistics.basis * signs, "regression": statistics.regression * signs[:, None]}
    if statistics.msi_coefficient_cov is not None:
        changes.update(msi_coefficient_cov=statistics.msi_coefficient_cov * signs,
                       detail_covariance=statistics.detail_covariance * np.outer(signs, signs))
    if statistics.class_centres is not None:
        changes.update(class_centres=statistics.class_centres * signs[: statistics.class_centres.shape[1]],
                       class_weights=statistics.class_weights * signs[None, :, None])
    return replace(statistics, **changes)


def test_an_aligned_model_gives_the_same_image_whatever_the_components_signs():
    """The "aligned" representation: the network sees Rᵀ·c and Rᵀ·m and its correction returns
    as R·δ' (model.aligned_frame), so when the eigen-decomposition flips components the fused
    image is the same; the principal components' network sees them flipped and its image
    changes. Untrained, both are the same base, also when the network is run."""
    from csakd_qgis.model import aligned_frame

    scale, k = 4, 8
    lr, hr = scene_inputs(9, 24, 24, scale, seed=5)  # enough pixels for the spectral classes
    statistics = SceneStatistics.estimate(lr, blur_and_decimate(hr, scale), k)
    assert statistics.class_centres is not None and statistics.msi_coefficient_cov is not None
    flipped = _with_flipped_components(statistics, np.array([1.0, -1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0]))
    network = NetworkConfig(k, k, width=8, growth=4, blocks=(1, 1, 1, 1), attention_dim=8, heads=2, unshuffle=4)
    torch.manual_seed(0)
    models = {name: SubspaceFusionModel(FusionModelConfig(network, k, name)) for name in ("aligned", "subspace")}
    models["subspace"].load_state_dict(models["aligned"].state_dict())
    lr_t, hr_t = torch.from_numpy(lr)[None], torch.from_numpy(hr)[None]
    seen, images = {}, {}
    for name, model in models.items():
        model.eval().skip_zero_correction = False  # run the network, and the frame, also untrained
        original = model.network.residual

        def spy(lr_input, hr_input, name=name, original=original):
            seen.setdefault(name, []).append(lr_input)
            return original(lr_input, hr_input)

        model.network.residual = spy
        with torch.no_grad():
            images[name, "untrained"] = [model(lr_t, hr_t, s.to_tensors()).image for s in (statistics, flipped)]
            randomise_head(model, 3)
            images[name, "trained"] = [model(lr_t, hr_t, s.to_tensors()).image for s in (statistics, flipped)]
    # The flip describes the same scene: the base is the same image, whichever the frame.
    base = images["subspace", "untrained"][0]
    for name in models:
        for image in images[name, "untrained"]:
            torch.testing.assert_close(image, base, atol=1e-3, rtol=1e-5)
    # The round trip Rᵀ… R: the aligned model's correction does not see the flip, the other's does.
    aligned, principal = images["aligned", "trained"], images["subspace", "trained"]
    assert (aligned[0] - base).abs().max() > 1e-2
    torch.testing.assert_close(aligned[1], aligned[0], atol=1e-3, rtol=1e-5)
    assert (principal[1] - principal[0]).abs().max() > 1e-2
    # What the aligned network reads: the coefficients in the aligned basis U·R.
    stats = statistics.to_tensors()
    aligned_basis = (stats["basis"] @ aligned_frame(stats["basis"]))[0]
    expected = torch.einsum("bk,bhw->khw", aligned_basis, lr_t[0] - stats["band_mean"][0, :, None, None]) / stats["scale"][0]
    torch.testing.assert_close(seen["aligned"][0][0, :, :24, :24], expected, atol=1e-4, rtol=1e-4)


def test_the_representation_is_part_of_the_config_and_old_configs_are_the_subspace():
    from csakd_qgis import train

    grid = train.student_config(representation="grid")
    assert grid.channels == 43 and grid.network.hsi_channels == 43
    assert FusionModelConfig.from_dict(grid.to_dict()) == grid
    old = train.student_config().to_dict()
    del old["representation"]
    assert FusionModelConfig.from_dict(old).representation == "subspace"
    with pytest.raises(ValueError, match="representation must be one of"):
        train.student_config(representation="pixels")
    with pytest.raises(ValueError, match="must both equal the grid's 43 channels"):
        SubspaceFusionModel(FusionModelConfig(train.student_config().network, 16, "grid"))


def test_the_networks_correction_changes_nothing_the_msi_or_the_lr_hsi_sees(potsdam_c):
    """EnMAP Potsdam C with a simulated Sentinel-2 MSI at scale 4, a student with a random output
    convolution (as a trained one has): what its network adds to the base lies in the null space
    of the MSI's linear model A (model.msi_null_projector) and in what the LR grid cannot see, so
    the fused image's simulated MSI and LR-HSI stay the base's. (A grid student's correction in
    400–700 nm, where the MSI measures, had lost up to 2.3 dB on a validation cube.)"""
    from csakd_qgis.datasets import case_statistics, make_wald_case, validation_sensors
    from csakd_qgis.model import msi_null_projector, spectral_consistency_gain
    from csakd_qgis.train import student_config

    k = student_config().subspace_dim
    case = make_wald_case(potsdam_c, validation_sensors()["Sentinel-2 10 m"], 4)
    stats = case_statistics(case, k).to_tensors()
    model = randomise_head(SubspaceFusionModel(student_config()), seed=2).eval()
    base = SubspaceFusionModel(student_config()).eval()
    lr_t, hr_t = torch.from_numpy(case.lr_hsi)[None], torch.from_numpy(case.hr_msi)[None]
    with torch.no_grad():
        added = model.subspace_detail(lr_t, hr_t, stats)[0] - base.subspace_detail(lr_t, hr_t, stats)[0]
        to_msi, _ = spectral_consistency_gain(stats, k, case.degradation)
        seen_by_msi = torch.einsum("nmk,nkhw->nmhw", to_msi, added)
        projector = msi_null_projector(to_msi)
    assert added.norm() > 1e-3 * added.numel() ** 0.5
    assert seen_by_msi.norm() < 1e-4 * added.norm() * to_msi.norm()
    torch.testing.assert_close(projector @ projector, projector, atol=1e-5, rtol=0)
    torch.testing.assert_close(to_msi @ projector, torch.zeros_like(to_msi), atol=1e-5, rtol=0)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    assert degrade_torch(added, case.degradation)[inner].norm() < 0.05 * added[inner].norm()


@pytest.mark.parametrize("representation, unshuffle", [("subspace", 4), ("grid", 1)])
def test_a_training_step_makes_no_tensor_off_the_models_device(potsdam_c, representation, unshuffle):
    """A co-training step (teacher and student forward, both losses, backward) with every input
    and weight on PyTorch's 'meta' device: a tensor made inside the models or losses without the
    inputs' device lands on the CPU and the step raises, as it does on a GPU. (The first run on a
    GPU stopped at its first step: the consistency step's identity matrices were made on the CPU.)"""
    from csakd_qgis import train
    from csakd_qgis.datasets import case_statistics, make_wald_case, validation_sensors
    from csakd_qgis.losses import student_loss, teacher_loss

    teacher_cfg = train.teacher_config(representation=representation, unshuffle=unshuffle)
    student_cfg = train.student_config(representation=representation, unshuffle=unshuffle, width=16)
    k = train.shared_statistics_dim(teacher_cfg, student_cfg)
    case = make_wald_case(potsdam_c, validation_sensors()["Sentinel-2 10 m"], 4, crop=(0, 0, 32, 32))
    statistics = case_statistics(case, k).set_wavelengths(case.wavelengths_nm)
    lr, hr, stats, reference = train.prepare_batch([case], k, statistics)
    meta = torch.device("meta")
    lr, hr, reference = lr.to(meta), hr.to(meta), reference.to(meta)
    stats = {name: value.to(meta) if isinstance(value, torch.Tensor) else value for name, value in stats.items()}
    teacher = randomise_head(SubspaceFusionModel(teacher_cfg), seed=1)
    student = randomise_head(SubspaceFusionModel(student_cfg), seed=2)
    distiller = train.Distiller(teacher, student).to(meta)
    norm = stats["scale"].view(-1, 1, 1, 1)
    (target,) = train.crop_interior(reference / norm, lr_size=lr.shape[-1])
    teacher_out = teacher(lr, hr, stats)
    (teacher_image,) = train.crop_interior(teacher_out.image / norm, lr_size=lr.shape[-1])
    teacher_loss(teacher_image, target).backward()
    student_out = student(lr, hr, stats)
    (student_image,) = train.crop_interior(student_out.image / norm, lr_size=lr.shape[-1])
    loss = student_loss(student_image, target, teacher_image.detach(), distiller.adapter(student_out.fused),
                        teacher_out.fused.detach())
    loss.backward()
    assert student_out.image.device == meta and student_out.image.shape == reference.shape
    head = student.network.head_refine.weight
    assert head.grad is not None and head.grad.device == meta
