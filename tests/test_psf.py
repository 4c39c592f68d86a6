"""The spatial degradation value (csakd_qgis.psf): its operators, on real cubes, and the PSF a
user can state."""

import math

import numpy as np
import pytest
import torch

from csakd_qgis.psf import (
    SpatialDegradation,
    decimation_matrix,
    degrade,
    degrade_torch,
    mtf_at_nyquist,
    parse_psf,
    reflect_index,
    sigma_from_mtf,
    wald,
)

DEGRADATIONS = {
    "wald ×3": wald(3),
    "wald ×4 offset": wald(4, (1.0, -0.75)),
    "gaussian ×2 anisotropic offset": SpatialDegradation(2, "gaussian", (0.35, 0.8), (0.5, -0.25)),
    "gaussian ×3 anisotropic offset": SpatialDegradation(3, "gaussian", (0.4, 0.65), (0.5, -0.5)),
    "gaussian ×8": SpatialDegradation(8, "gaussian", (0.45, 0.45)),
    "box ×3": SpatialDegradation(3, "box", (0.0, 0.0)),
    "box ×4 offset": SpatialDegradation(4, "box", (0.0, 0.0), (0.5, -1.25)),
    "box-gaussian ×3 offset": SpatialDegradation(3, "box-gaussian", (0.3, 0.5), (-2.5, 0.25)),
    "box-gaussian ×5": SpatialDegradation(5, "box-gaussian", (0.2, 0.2)),
}


@pytest.fixture(scope="module")
def potsdam_patch(potsdam_c):
    """40 bands of EnMAP Potsdam block C, 80 × 60 pixels (multiples of 2, 4 and 5 but not 3 or 8)."""
    return np.ascontiguousarray(potsdam_c.data[::5, :80, :60])


def kernel_moments(degradation, axis):
    """(centre, variance) of the degradation's kernel along ``axis`` in HR pixels, relative to
    the LR pixel's first HR pixel k·s."""
    weights, first = degradation.kernel(axis)
    positions = first + np.arange(len(weights))
    centre = float(weights @ positions)
    return centre, float(weights @ (positions - centre) ** 2)


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_numpy_and_torch_degrade_alike_on_a_real_cube(potsdam_patch, name):
    degradation = DEGRADATIONS[name]
    s = degradation.scale
    rows, cols = potsdam_patch.shape[1] // s * s, potsdam_patch.shape[2] // s * s
    cube = potsdam_patch[:, :rows, :cols].astype(np.float64)
    expected = degrade(cube, degradation)
    result = degrade_torch(torch.from_numpy(cube)[None], degradation)[0].numpy()
    assert result.shape == expected.shape == (cube.shape[0], rows // s, cols // s)
    # The same operator to float64 precision, up to the edges (both mirror the image there).
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-12 * np.abs(cube).max())
    # In float32 as the fusion runs it, to float32 precision.
    single = degrade_torch(torch.from_numpy(cube.astype(np.float32))[None], degradation)[0].numpy()
    assert degrade(cube.astype(np.float32), degradation).dtype == np.float32
    np.testing.assert_allclose(single, expected, rtol=0, atol=2e-6 * np.abs(cube).max())
    # The degradation is not a no-op on this cube, and another PSF gives another image.
    other = wald(s) if degradation != wald(s) else SpatialDegradation(s, "box", (0.0, 0.0))
    assert np.abs(degrade(cube, other) - expected).max() > 1e-3 * np.abs(cube).max()


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_the_box_psf_is_the_plain_mean_of_each_footprint(potsdam_c, scale):
    cube = potsdam_c.data[::7, : 64 // scale * scale, : 56 // scale * scale].astype(np.float64)
    bands, rows, cols = cube.shape
    means = cube.reshape(bands, rows // scale, scale, cols // scale, scale).mean(axis=(2, 4))
    box = SpatialDegradation(scale, "box", (0.0, 0.0))
    np.testing.assert_allclose(degrade(cube, box), means, rtol=1e-12)
    np.testing.assert_allclose(degrade_torch(torch.from_numpy(cube)[None], box)[0].numpy(), means, rtol=1e-12)
    # Moved by one whole LR pixel down and two HR pixels right: the means of the moved
    # footprints (away from the right and bottom edges, where the image is mirrored).
    moved = degrade(cube, box.with_offset((scale, 2.0)))
    shifted = cube[:, scale:, 2:]
    inner_rows, inner_cols = rows // scale - 1, (cols - 2) // scale
    expected = shifted[:, : inner_rows * scale, : inner_cols * scale].reshape(
        bands, inner_rows, scale, inner_cols, scale
    ).mean(axis=(2, 4))
    np.testing.assert_allclose(moved[:, :inner_rows, :inner_cols], expected, rtol=1e-12)


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_each_kernel_is_centred_on_the_footprint_with_the_variance_of_its_family(name):
    degradation = DEGRADATIONS[name]
    s = degradation.scale
    for axis in (0, 1):
        weights, _ = degradation.kernel(axis)
        assert weights.sum() == pytest.approx(1.0, abs=1e-12) and (weights >= 0).all()
        centre, variance = kernel_moments(degradation, axis)
        offset = degradation.offset[axis]
        # Exact for a box; a Gaussian sampled at a fractional centre and cut at 4σ is off by
        # a few 1e-4 HR pixels.
        assert centre == pytest.approx((s - 1) / 2 + offset, abs=1e-12 if degradation.family == "box" else 1e-3)
        box = SpatialDegradation(s, "box", (0.0, 0.0), (offset, offset))
        if degradation.family == "box":
            if float(offset).is_integer():
                assert variance == pytest.approx((s * s - 1) / 12.0, abs=1e-12)  # s equal HR taps
        elif degradation.family == "gaussian":
            # A sampled Gaussian of σ ≥ 0.7 HR pixel has the continuous one's variance to < 1 %.
            assert variance == pytest.approx((degradation.sigma[axis] * s) ** 2, rel=0.01)
        else:
            # Variances add under convolution: the box's plus the (sampled) Gaussian's.
            gaussian = SpatialDegradation(s, "gaussian", degradation.sigma)
            assert variance == pytest.approx(kernel_moments(box, axis)[1] + kernel_moments(gaussian, axis)[1], rel=0.02)


@pytest.mark.parametrize("scale", [3, 4])
def test_a_box_between_pixels_weighs_the_two_pixels_it_cuts_by_their_overlap(scale):
    # A footprint moved by a fraction a of an HR pixel covers 1 − a of its first pixel and a of
    # the one past its end: exactly the mix of the boxes at the two whole-pixel positions.
    for a in (0.25, 0.5):
        between = decimation_matrix(12 * scale, SpatialDegradation(scale, "box", (0.0, 0.0), (a, a)), 0)
        before = decimation_matrix(12 * scale, SpatialDegradation(scale, "box", (0.0, 0.0)), 0)
        after = decimation_matrix(12 * scale, SpatialDegradation(scale, "box", (0.0, 0.0), (1.0, 1.0)), 0)
        np.testing.assert_allclose(between[:-1], (1 - a) * before[:-1] + a * after[:-1], rtol=0, atol=1e-15)


def test_an_anisotropic_psf_blurs_each_axis_with_its_own_sigma():
    both = SpatialDegradation(3, "gaussian", (0.4, 0.65), (0.5, -0.5))
    rows = SpatialDegradation(3, "gaussian", (0.4, 0.4), (0.5, 0.5))
    cols = SpatialDegradation(3, "gaussian", (0.65, 0.65), (-0.5, -0.5))
    np.testing.assert_array_equal(decimation_matrix(60, both, 0), decimation_matrix(60, rows, 0))
    np.testing.assert_array_equal(decimation_matrix(60, both, 1), decimation_matrix(60, cols, 1))
    assert not np.allclose(decimation_matrix(60, both, 0), decimation_matrix(60, both, 1))


@pytest.mark.parametrize("name", [n for n, d in DEGRADATIONS.items() if not any(d.offset)])
def test_an_image_mirrored_at_its_edge_degrades_to_its_degradation_mirrored(potsdam_patch, name):
    # The half-sample symmetric borders of the degradation: what lets the consistent
    # interpolator stay exact up to the edge.
    degradation = DEGRADATIONS[name]
    s = degradation.scale
    cube = potsdam_patch[:, : 40 // s * s, : 40 // s * s].astype(np.float64)
    mirrored = np.concatenate([cube, cube[:, :, ::-1]], axis=2)
    low = degrade(cube, degradation)
    np.testing.assert_allclose(degrade(mirrored, degradation), np.concatenate([low, low[:, :, ::-1]], axis=2), rtol=1e-10)


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_an_lr_pixel_reads_no_further_than_the_reach(name):
    degradation = DEGRADATIONS[name]
    s, reach = degradation.scale, degradation.reach_hr()
    n_lr = 12
    for axis in (0, 1):
        matrix = decimation_matrix(n_lr * s, degradation, axis)
        for k in range(reach // s + 1, n_lr - reach // s - 1):  # LR pixels whose taps are not mirrored
            taps = np.flatnonzero(matrix[k])
            assert taps.min() >= k * s - reach and taps.max() < (k + 1) * s + reach, (axis, k, taps)
    np.testing.assert_array_equal(reflect_index(np.arange(-7, 17), 10), np.pad(np.arange(10), 7, mode="symmetric"))


def test_the_value_is_checked_hashable_and_moved_only_by_its_own_methods():
    assert SpatialDegradation(3, "gaussian", 0.4).sigma == (0.4, 0.4)
    for bad, match in (
        (dict(scale=3, family="lanczos"), "unknown PSF family"),
        (dict(scale=0), "scale must be a positive integer"),
        (dict(scale=3, sigma=(0.4, -0.1)), "must not be negative"),
    ):
        with pytest.raises(ValueError, match=match):
            SpatialDegradation(**bad)
    a = SpatialDegradation(3, "box-gaussian", (0.3, 0.5), (0.5, -1))
    b = SpatialDegradation(3.0, "box-gaussian", [0.3, 0.5], [0.5, -1.0])
    assert a == b and hash(a) == hash(b) and len({a, b, wald(3)}) == 2
    assert SpatialDegradation(**a.to_dict()) == a
    moved = a.with_offset((1.0, 2.0))
    assert moved.offset == (1.0, 2.0) and moved.sigma == a.sigma and a.offset == (0.5, -1.0)
    reduced = a.at_scale(4)
    assert (reduced.scale, reduced.family, reduced.sigma, reduced.offset) == (4, "box-gaussian", (0.3, 0.5), (0.0, 0.0))
    with pytest.raises(Exception):
        a.scale = 4  # frozen: operators cached per value must not change under it
    assert wald(4, (0.5, 0.0)) == SpatialDegradation(4, "gaussian", (0.53, 0.53), (0.5, 0.0))


def test_the_mtf_at_nyquist_is_that_of_the_operator_applied():
    # σ = 0.53 HSI pixels is the Wald protocol's "MTF ≈ 0.25 at Nyquist".
    assert sigma_from_mtf(0.25) == pytest.approx(0.53, abs=0.005)
    for mtf in (0.1, 0.25, 0.3, 0.6):
        assert mtf_at_nyquist(sigma_from_mtf(mtf)) == pytest.approx(mtf, rel=1e-12)
    for bad in (0.0, 1.0, 1.2, -0.3):
        with pytest.raises(ValueError, match="between 0 and 1"):
            sigma_from_mtf(bad)
    # The discrete kernel's response at the LR Nyquist frequency (half a cycle per LR pixel).
    s = 8
    for sigma in (0.35, 0.53, 0.8):
        weights, first = SpatialDegradation(s, "gaussian", (sigma, sigma)).kernel(0)
        taps = first + np.arange(len(weights))
        response = abs(np.sum(weights * np.exp(-2j * np.pi * taps / (2 * s))))
        assert response == pytest.approx(mtf_at_nyquist(sigma), abs=0.01)
    weights, first = SpatialDegradation(s, "box", (0.0, 0.0)).kernel(0)
    response = abs(np.sum(weights * np.exp(-2j * np.pi * (first + np.arange(len(weights))) / (2 * s))))
    assert response == pytest.approx(1 / (s * math.sin(math.pi / (2 * s))), rel=1e-12)  # ≈ 2/π


@pytest.mark.parametrize(
    "text,family,sigma",
    [
        ("box", "box", (0.0, 0.0)),
        ("average", "box", (0.0, 0.0)),
        ("Aggregation", "box", (0.0, 0.0)),
        ("gaussian:0.5", "gaussian", (0.5, 0.5)),
        ("Gaussian: 0.45, 0.6", "gaussian", (0.45, 0.6)),
        ("gaussian:.35", "gaussian", (0.35, 0.35)),
        ("box-gaussian:0.3", "box-gaussian", (0.3, 0.3)),
        ("box-gaussian:0.2,0.4", "box-gaussian", (0.2, 0.4)),
        ("mtf:0.25", "gaussian", (0.53, 0.53)),
        ("MTF:0.3,0.4", "gaussian", (sigma_from_mtf(0.3), sigma_from_mtf(0.4))),
    ],
)
def test_the_psf_forms_a_user_can_give(text, family, sigma):
    parsed = parse_psf(text, 4)
    assert isinstance(parsed, SpatialDegradation)
    assert (parsed.scale, parsed.family, parsed.offset) == (4, family, (0.0, 0.0))
    np.testing.assert_allclose(parsed.sigma, sigma, atol=0.005)


def test_auto_means_estimate_and_anything_else_is_refused_with_the_accepted_forms():
    for text in ("auto", "AUTO", " auto ", "", None):
        assert parse_psf(text, 3) is None
    for text in ("lanczos", "gaussian", "gaussian:", "gaussian:-0.5", "gaussian:0.5,0.6,0.7", "mtf", "box:2", "sigma=0.5"):
        with pytest.raises(ValueError, match="not understood: use auto, box, gaussian:SIGMA"):
            parse_psf(text, 3)
    with pytest.raises(ValueError, match="σ > 0"):
        parse_psf("gaussian:0", 3)
    for text in ("mtf:0", "mtf:1", "mtf:1.5"):
        with pytest.raises(ValueError, match="between 0 and 1"):
            parse_psf(text, 3)


def test_describe_names_what_the_log_reports():
    assert "pixel aggregation" in parse_psf("box", 3).describe()
    text = parse_psf("mtf:0.25", 3).describe()
    assert "σ = 0.53" in text and "MTF at Nyquist 0.25" in text
    anisotropic = SpatialDegradation(3, "gaussian", (0.4, 0.65), (0.5, -0.5)).describe()
    assert "0.40 (rows) × 0.65 (columns)" in anisotropic and "+0.50 rows, -0.50 columns" in anisotropic
