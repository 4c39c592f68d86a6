"""Reference fusion methods every learned result is shown beside.

- :func:`bicubic_upsample`: the floor (spectrally consistent, no spatial detail);
- :func:`gsa`: adaptive Gram-Schmidt per MSI band group (Aiazzi et al. 2007);
- :func:`cnmf`: coupled non-negative matrix factorisation (Yokoya et al. 2012);
- :func:`hysure`: subspace + vector total variation by ADMM (Simões et al. 2015).

All return float64 (bands, rows, cols). CNMF and HySure are told the true spectral response
and the true spatial degradation (as the two per-axis matrices of the separable PSF and
decimation): they are the oracle a blind method is held against. They take seconds per small
case, so they belong to benchmarks (see ``bench.cached``), not to fusion.

Measured with the defaults (Wald protocol, validation cubes whole, Sentinel-2 B2/B3/B4/B8
MSI, PSNR dB / SAM °; Gaussian = σ 0.53·s, box = plain mean of the s x s footprint; GSA is
not told the PSF and degrades the MSI with the Gaussian; seconds on one busy core):

=====================  ====  =====  ============  ============  ============  ============
cube                   s     PSF    bicubic       GSA           CNMF          HySure
=====================  ====  =====  ============  ============  ============  ============
AVIRIS Jasper Ridge    4     Gauss  23.34 / 7.59  31.42 / 6.16  34.11 / 4.45  35.43 / 4.05
AVIRIS Jasper Ridge    4     box    24.52 / 6.54  28.68 / 7.36  34.72 / 4.37  35.09 / 4.04
EnMAP Potsdam C        4     Gauss  23.43 / 8.14  34.75 / 6.44  35.84 / 5.19  36.23 / 4.96
EnMAP Potsdam C        4     box    24.47 / 7.72  29.57 / 8.49  35.89 / 4.74  36.56 / 4.95
HyMap02 Berlin         4     Gauss  19.49 / 8.43  31.84 / 6.88  31.87 / 5.47  34.61 / 4.01
HyMap02 Berlin         4     box    19.92 / 7.89  27.05 / 11.19 32.17 / 5.35  34.74 / 4.01
AVIRIS Jasper Ridge    3     Gauss  24.90 / 6.24  32.70 / 5.21  34.21 / 4.38  36.90 / 3.46
AVIRIS Jasper Ridge    3     box    26.55 / 5.19  29.92 / 6.25  34.87 / 4.45  36.51 / 3.52
EnMAP Potsdam C        3     Gauss  24.51 / 7.33  35.39 / 5.73  35.50 / 4.94  36.78 / 4.44
EnMAP Potsdam C        3     box    25.95 / 6.78  30.23 / 8.25  35.66 / 5.04  36.81 / 4.17
HyMap02 Berlin         3     Gauss  20.22 / 7.54  32.64 / 6.14  32.02 / 5.73  35.62 / 3.54
HyMap02 Berlin         3     box    20.85 / 6.83  27.42 / 10.76 32.17 / 4.95  35.31 / 3.82
=====================  ====  =====  ============  ============  ============  ============

CNMF took 2–6 s per case, HySure 4–10 s (100 x 100 x 198 Jasper Ridge the slowest); a
120 x 120 x 198 case with an 8-band MSI takes about 4 s (CNMF) and 25 s (HySure) on two
shared cores.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .degradation import blur_and_decimate

__all__ = ["cubic_kernel", "upsample_matrix", "bicubic_upsample", "gsa", "cnmf", "hysure"]

_KEYS_A = -0.5


def cubic_kernel(x, a: float = _KEYS_A) -> np.ndarray:
    """Keys cubic convolution kernel; a = -0.5 reproduces quadratics exactly."""
    t = np.abs(np.asarray(x, dtype=np.float64))
    t2, t3 = t * t, t * t * t
    near = (a + 2.0) * t3 - (a + 3.0) * t2 + 1.0
    far = a * t3 - 5.0 * a * t2 + 8.0 * a * t - 4.0 * a
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


def upsample_matrix(n_lr: int, n_hr: int, scale: float) -> np.ndarray:
    """n_hr x n_lr float64 bicubic interpolation matrix along one axis.

    HR pixel ``i`` sits at LR coordinate (i + 0.5)/scale − 0.5, i.e. LR
    pixel ``k`` is centred on HR coordinate k·s + (s−1)/2 (the half-pixel,
    "align_corners=False" convention, matching :func:`blur_and_decimate`).
    Samples beyond the edge repeat the edge pixel.
    """
    u = (np.arange(n_hr, dtype=np.float64) + 0.5) / float(scale) - 0.5
    base = np.floor(u).astype(np.int64)
    taps = base[:, None] + np.arange(-1, 3)[None, :]
    w = cubic_kernel(u[:, None] - taps)
    mat = np.zeros((n_hr, n_lr), dtype=np.float64)
    rows = np.broadcast_to(np.arange(n_hr)[:, None], taps.shape)
    np.add.at(mat, (rows, np.clip(taps, 0, n_lr - 1)), w)
    return mat


def _pair_scale(scale) -> Tuple[float, float]:
    if np.ndim(scale) == 0:
        return float(scale), float(scale)
    sy, sx = scale
    return float(sy), float(sx)


def bicubic_upsample(
    lr,
    scale: Union[float, Sequence[float]],
    out_shape: Optional[Tuple[int, int]] = None,
) -> np.ndarray:
    """Bicubic (Keys, a = −0.5) upsampling of a (B, h, w) image; float64 output.

    ``scale`` is HR pixels per LR pixel (a number or (sy, sx)); it may be
    non-integer.  ``out_shape`` (H, W) defaults to round(h·sy), round(w·sx).
    Each axis is one matrix product, so the result is exact and fast.
    """
    a = np.asarray(lr, dtype=np.float64)
    squeeze = a.ndim == 2
    if squeeze:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"expected (bands, rows, cols), got shape {a.shape}")
    sy, sx = _pair_scale(scale)
    h, w = a.shape[1:]
    if out_shape is None:
        out_shape = (int(round(h * sy)), int(round(w * sx)))
    H, W = (int(v) for v in out_shape)
    my = upsample_matrix(h, H, sy)
    mx = upsample_matrix(w, W, sx)
    out = np.matmul(np.matmul(my, a), mx.T)
    return out[0] if squeeze else out


def _lstsq_with_const(A: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, float]:
    """Weights w and constant c minimising ‖A w + c − y‖ (A: n x k)."""
    design = np.hstack([A, np.ones((A.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef[:-1], float(coef[-1])


def gsa(lr_hsi, hr_msi, scale: int) -> np.ndarray:
    """Adaptive Gram-Schmidt (GSA) fusion applied per MSI band group.

    1. Upsample the LR-HSI bicubically to the MSI grid (HSI_up).
    2. Degrade the MSI to the LR grid with the Wald blur/decimation.
    3. Assign every HSI band to the MSI band it correlates best with at low
       resolution; MSI bands that win no HSI band are unused.
    4. Per group: least squares at low resolution of the degraded MSI band
       on the group's LR-HSI bands plus a constant gives the weights of the
       intensity I = Σ w_b·HSI_up_b + c; the MSI band is equalised to the
       mean and standard deviation of I, both measured at low resolution
       (degraded MSI vs. LR intensity); detail = MSI_eq − I; each band gets
       fused_b = HSI_up_b + g_b·detail with g_b = cov(HSI_up_b, I)/var(I).

    ``hr_msi`` rows/cols are cropped to multiples of ``scale``; the LR-HSI
    must then be (at least) (H/scale, W/scale).  Returns float64 (B, H, W).
    """
    s = int(scale)
    hsi = np.asarray(lr_hsi, dtype=np.float64)
    msi = np.asarray(hr_msi, dtype=np.float64)
    if hsi.ndim != 3 or msi.ndim != 3:
        raise ValueError("lr_hsi and hr_msi must be (bands, rows, cols)")
    H, W = (msi.shape[1] // s) * s, (msi.shape[2] // s) * s
    msi = msi[:, :H, :W]
    h, w = H // s, W // s
    if hsi.shape[1] < h or hsi.shape[2] < w:
        raise ValueError(
            f"LR-HSI {hsi.shape[1:]} too small for MSI {msi.shape[1:]} at scale {s}"
        )
    hsi = hsi[:, :h, :w]
    B, M = hsi.shape[0], msi.shape[0]

    up = bicubic_upsample(hsi, s, (H, W))
    msi_lr = blur_and_decimate(msi, s)

    hv = hsi.reshape(B, -1)
    mv = msi_lr.reshape(M, -1)
    hc = hv - hv.mean(axis=1, keepdims=True)
    mc = mv - mv.mean(axis=1, keepdims=True)
    hn = np.linalg.norm(hc, axis=1)
    mn = np.linalg.norm(mc, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (hc @ mc.T) / (hn[:, None] * mn[None, :])
    corr = np.nan_to_num(corr, nan=-np.inf)
    group = np.argmax(corr, axis=1)

    fused = up.copy()
    upv = up.reshape(B, -1)
    fv = fused.reshape(B, -1)
    for m in range(M):
        idx = np.flatnonzero(group == m)
        if idx.size == 0 or mn[m] == 0:
            continue
        wts, c = _lstsq_with_const(hv[idx].T, mv[m])
        intensity = wts @ upv[idx] + c
        i_lr = wts @ hv[idx] + c
        i_std, p_std = i_lr.std(), mv[m].std()
        if i_std == 0 or p_std == 0 or intensity.std() == 0:
            continue
        # Mean/std equalisation uses statistics taken at the same (low)
        # resolution on both sides.  Matching the sharp MSI band to the
        # bicubic intensity instead would shrink its contrast by the
        # smoothing ratio and lift dark pixels (water), which costs several
        # degrees of SAM on the real cubes.
        p_eq = (msi[m].ravel() - mv[m].mean()) * (i_std / p_std) + i_lr.mean()
        detail = p_eq - intensity
        ic = intensity - intensity.mean()
        gains = (upv[idx] - upv[idx].mean(axis=1, keepdims=True)) @ ic / (ic @ ic)
        fv[idx] += gains[:, None] * detail[None, :]
    return fused


# --- model-based fusion given the true degradation (oracle references) -------------------


def _degradation_inputs(lr_hsi, hr_msi, srf, rows_matrix, cols_matrix):
    """Checked float64 arrays (Yh, Ym, R, Rm, Cm) for :func:`cnmf` and :func:`hysure`."""
    yh = np.asarray(lr_hsi, dtype=np.float64)
    ym = np.asarray(hr_msi, dtype=np.float64)
    r = np.asarray(srf, dtype=np.float64)
    rm = np.asarray(rows_matrix, dtype=np.float64)
    cm = np.asarray(cols_matrix, dtype=np.float64)
    if yh.ndim != 3 or ym.ndim != 3:
        raise ValueError("lr_hsi and hr_msi must be (bands, rows, cols)")
    (B, h, w), (M, H, W) = yh.shape, ym.shape
    if r.shape != (M, B):
        raise ValueError(f"srf must be (MSI bands, HSI bands) = {(M, B)}, got {r.shape}")
    if rm.shape != (h, H) or cm.shape != (w, W):
        raise ValueError(
            f"rows_matrix must be {(h, H)} and cols_matrix {(w, W)} (LR x HR per axis), "
            f"got {rm.shape} and {cm.shape}"
        )
    for name, a in (("lr_hsi", yh), ("hr_msi", ym), ("srf", r), ("rows_matrix", rm), ("cols_matrix", cm)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite values; fill or mask them first")
    return yh, ym, r, rm, cm


def _data_scale(yh: np.ndarray) -> float:
    # Both methods work on data divided by this, so that their weights (δ, λ) do not depend
    # on the units (digital numbers or reflectance).
    c = float(np.percentile(np.abs(yh), 99.9))
    return c if c > 0 else 1.0


def _spatial(images: np.ndarray, rm: np.ndarray, cm: np.ndarray) -> np.ndarray:
    """(n, H, W) → (n, h, w): the separable degradation rm @ image @ cmᵀ."""
    return np.matmul(np.matmul(rm, images), cm.T)


def _successive_projection(y: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` columns of y (bands x pixels) picked by successive projection.

    The pixel of largest norm is taken, its direction projected out of all pixels, and so on
    (Araújo et al. 2001; Gillis & Vavasis 2014). Like VCA, which the CNMF paper uses, it picks
    the purest pixels under the linear mixing model, but deterministically.
    """
    resid = y.copy()
    picked = []
    for _ in range(min(count, y.shape[1])):
        norms = np.einsum("ij,ij->j", resid, resid)
        j = int(np.argmax(norms))
        if norms[j] <= 1e-12 * max(norms.max(), 1e-300):
            break
        u = resid[:, j] / np.sqrt(norms[j])
        resid -= np.outer(u, u @ resid)
        picked.append(j)
    return np.array(picked, dtype=np.int64)


_TINY = 1e-12


def _nmf_update_h(y, wmat, hmat):
    """One Lee–Seung multiplicative update of the abundances H in Y ≈ W H."""
    hmat *= (wmat.T @ y) / np.maximum(wmat.T @ wmat @ hmat, _TINY)


def _nmf_update_w(y, wmat, hmat, rows):
    """Multiplicative update of W's first ``rows`` rows (the sum-to-one row stays fixed)."""
    w = wmat[:rows]
    w *= (y[:rows] @ hmat.T) / np.maximum(w @ (hmat @ hmat.T), _TINY)


def _unmix(y, wmat, hmat, rows, first, iterations, tol):
    """NMF of y ≈ W H: ``first`` ("w" or "h") alone until it converges, then both alternately.

    The CNMF paper's inner loop: the factor that was just handed over from the other image is
    held fixed while the other one adapts to it, then both are refined. Stops when the
    relative decrease of ‖Y − W H‖² on the data rows falls below ``tol``.
    """
    def cost():
        return float(np.sum((y[:rows] - wmat[:rows] @ hmat) ** 2))

    for update_both in (False, True):
        before = cost()
        for _ in range(iterations):
            if update_both or first == "h":
                _nmf_update_h(y, wmat, hmat)
            if update_both or first == "w":
                _nmf_update_w(y, wmat, hmat, rows)
            now = cost()
            if before - now < tol * now:
                break
            before = now


def cnmf(
    lr_hsi,
    hr_msi,
    srf,
    rows_matrix,
    cols_matrix,
    endmembers: int = 30,
    outer_iterations: int = 3,
    inner_iterations: int = 200,
    sum_to_one: float = 0.15,
    tol: float = 1e-4,
    floor: float = 1e-6,
) -> np.ndarray:
    """Coupled non-negative matrix factorisation (CNMF) fusion, given the true degradation.

    Yokoya, Yairi & Iwasaki, "Coupled Nonnegative Matrix Factorization Unmixing for
    Hyperspectral and Multispectral Data Fusion", IEEE TGRS 50(2), 2012. Both images are
    unmixed with the linear mixing model, the HSI as Yh ≈ Wh Hh (endmember spectra Wh, LR
    abundances Hh) and the MSI as Ym ≈ Wm Hm (HR abundances Hm); the factorisations are
    coupled through the sensor model: Wm starts from R·Wh (spectral response), Hh from
    Hm degraded spatially (Hh = rows_matrix · Hm · cols_matrixᵀ per endmember). Each outer
    iteration unmixes the HSI (Wh adapts to the handed-over Hh first, then both) and the MSI
    (Hm adapts to R·Wh first, then both), by Lee–Seung multiplicative updates. The fused image
    is Wh·Hm. Sum-to-one of the abundances is enforced softly as in the paper: data and
    endmember matrices gain a constant row ``sum_to_one`` (δ) that the updates leave fixed.

    Initialisation: the endmembers are picked from the LR-HSI by successive projection (a
    deterministic pure-pixel search, in place of the paper's VCA), the first LR abundances
    are 1/endmembers and adapt to them before the alternation starts.

    Args:
        lr_hsi: (B, h, w) LR-HSI; hr_msi: (M, H, W) HR-MSI in the same units.
        srf: (M, B) spectral response, each row summing to 1 (hr_msi ≈ srf · X).
        rows_matrix, cols_matrix: (h, H) and (w, W), the separable spatial degradation,
            lr_hsi[b] ≈ rows_matrix @ X[b] @ cols_matrixᵀ (e.g.
            :func:`csakd_qgis.psf.decimation_matrix`).
        endmembers: number of endmembers D.
        outer_iterations: coupled MSI/HSI unmixing rounds (≥ 1) after the initial HSI
            unmixing; 1/3/6 rounds measured 33.5/34.1/34.3 dB mean PSNR at 1.9/5.0/10.2 s
            per case on the cases below (3 kept).
        inner_iterations: cap of multiplicative updates per unmixing stage; ``tol`` is the
            relative cost decrease at which a stage stops early.
        sum_to_one: δ, the weight of the sum-to-one row, on data scaled to its 99.9th percentile.
        floor: inputs are clipped to ≥ floor × that scale (multiplicative updates need
            non-negative data; noise makes a few samples negative).

    Defaults measured on the three validation cubes (×4, Sentinel-2 10 m bands, Gaussian
    and box PSFs): 20/30/40 endmembers gave 33.6/34.0/34.2 dB mean PSNR (averaged over
    δ = 0.05 and 0.5; 40 takes twice the time of 30); δ between 0.05 and 0.5 moves it by at
    most 0.2 dB (δ = 0.15: 34.1 dB). The stages stop on ``tol`` long
    before ``inner_iterations``: a 120 x 120 x 198 case takes about 4 s on two cores.

    Returns (B, H, W) float64 in the inputs' units. Raises ValueError on inconsistent shapes,
    non-finite inputs, no endmember or no outer iteration.
    """
    yh, ym, r, rm, cm = _degradation_inputs(lr_hsi, hr_msi, srf, rows_matrix, cols_matrix)
    if int(outer_iterations) < 1 or int(endmembers) < 1:
        raise ValueError("cnmf needs at least one endmember and one outer iteration")
    (B, h, w), (M, H, W) = yh.shape, ym.shape
    c = _data_scale(yh)
    delta = float(sum_to_one)
    yh_aug = np.vstack([np.maximum(yh.reshape(B, -1) / c, floor), np.full((1, h * w), delta)])
    ym_aug = np.vstack([np.maximum(ym.reshape(M, -1) / c, floor), np.full((1, H * W), delta)])
    d = int(endmembers)
    picked = _successive_projection(yh_aug[:B], d)
    d = picked.size
    wh = np.vstack([yh_aug[:B, picked], np.full((1, d), delta)])
    hh = np.full((d, h * w), 1.0 / d)
    _unmix(yh_aug, wh, hh, B, "h", inner_iterations, tol)
    # The HR abundances carry over from one round to the next; the MSI endmembers restart
    # from R·Wh every round, which is what couples the two factorisations.
    hm = np.full((d, H * W), 1.0 / d)
    for _ in range(int(outer_iterations)):
        wm = np.vstack([r @ wh[:B], np.full((1, d), delta)])
        _unmix(ym_aug, wm, hm, M, "h", inner_iterations, tol)
        hh = np.maximum(_spatial(hm.reshape(d, H, W), rm, cm).reshape(d, -1), _TINY)
        _unmix(yh_aug, wh, hh, B, "w", inner_iterations, tol)
    return (wh[:B] @ hm).reshape(B, H, W) * c


def _neumann_laplacian_eigenvalues(n: int) -> np.ndarray:
    # DᵀD of the forward difference with a zero last row (Neumann border) is diagonal in the
    # orthonormal DCT-II basis with these eigenvalues.
    return 2.0 - 2.0 * np.cos(np.pi * np.arange(n) / n)


def _diff_rows(z):
    out = np.zeros_like(z)
    out[:, :-1] = z[:, 1:] - z[:, :-1]
    return out


def _diff_cols(z):
    out = np.zeros_like(z)
    out[:, :, :-1] = z[:, :, 1:] - z[:, :, :-1]
    return out


def _diff_rows_t(g):
    out = np.zeros_like(g)
    out[:, 1:] += g[:, :-1]
    out[:, :-1] -= g[:, :-1]
    return out


def _diff_cols_t(g):
    out = np.zeros_like(g)
    out[:, :, 1:] += g[:, :, :-1]
    out[:, :, :-1] -= g[:, :, :-1]
    return out


def hysure(
    lr_hsi,
    hr_msi,
    srf,
    rows_matrix,
    cols_matrix,
    subspace_dim: int = 30,
    lambda_phi: float = 3e-4,
    lambda_m: float = 1.0,
    mu: float = 0.05,
    iterations: int = 300,
    basis: str = "endmembers",
) -> np.ndarray:
    """HySure fusion (subspace + vector total variation, ADMM), given the true degradation.

    Simões, Bioucas-Dias, Almeida & Chanussot, "A Convex Formulation for Hyperspectral Image
    Superresolution via Subspace-Based Regularization", IEEE TGRS 53(6), 2015. The HR image
    is X = E·Z with E (B x K) a basis of the LR-HSI's spectral subspace and Z (K x H·W) the
    solution of the convex problem

        min_Z ½‖Yh − E Z S‖² + (λm/2)‖Ym − R E Z‖² + λφ Σ_pixels ‖(Dh Z, Dv Z)‖₂

    (S the spatial degradation, R the spectral response, Dh/Dv vertical/horizontal forward
    differences; the last term is the vector total variation coupling all K components),
    solved by ADMM with the splits V1 = Z (HSI term), V4 = Z (MSI term), V2 = Dh Z,
    V3 = Dv Z. Every sub-problem is solved exactly:

    * V1: our degradation is separable, S(v) = rows_matrix · v · cols_matrixᵀ with the
      reflect borders and the decimation inside the matrices, so the normal matrix
      EᵀE ⊗ (SᵀS) + μI is diagonal in the product of the eigenbases of EᵀE,
      rows_matrixᵀrows_matrix and cols_matrixᵀcols_matrix (K x K, H x H, W x W
      eigendecompositions, computed once). The paper instead splits off a circular blur
      and diagonalises it by FFT; that does not hold for reflect borders, and this
      solve needs no inner iterations (conjugate gradients would).
    * V4: one K x K system, (λm (RE)ᵀRE + μI), shared by all pixels.
    * Z: (2I + DhᵀDh + DvᵀDv) Z = …, diagonal in the DCT-II basis (Neumann borders).
    * V2, V3: vector soft thresholding with threshold λφ/μ.

    ``basis``: "endmembers" (default) takes E as K pixels of the LR-HSI picked by successive
    projection, in the role of the VCA endmembers the authors' experiments use; "svd" takes
    the first K left singular vectors (the paper's other option). Measured on the three
    validation cubes (×4, Sentinel-2 10 m bands, Gaussian and box PSFs): endmembers with
    K = 10 gave 34.5 dB mean PSNR against 29.9 dB for the SVD basis (SVD at K = 4: 31.2 dB);
    K = 20/30 gave 35.2/35.4 dB; λφ = 1e-4 is 0.2 dB higher in PSNR than 3e-4 but 0.2° worse
    in SAM, 1e-3 is 0.5 dB lower; μ = 0.005 and 0.05 agree within 0.2 dB; 100/300/600
    iterations gave 35.3/35.4/35.5 dB.

    The spectral response and blur are the given (true) ones: the paper's blur/response
    estimation is not run. Data are divided by their 99.9th percentile, so λφ and λm are
    relative to that scale; the output is clipped at 0 (reflectance is non-negative).

    Args:
        lr_hsi: (B, h, w); hr_msi: (M, H, W); srf: (M, B), rows summing to 1;
        rows_matrix (h, H), cols_matrix (w, W): the separable spatial degradation
            (see :func:`cnmf`).
        subspace_dim: K. lambda_phi: λφ. lambda_m: λm (weight of the MSI term). mu: the
            ADMM penalty μ. iterations: ADMM iterations. basis: "endmembers" or "svd".

    Memory: about ten (K, H, W) float64 arrays; time 8–10 s for a 100 x 100 x 198 case on
    one core.

    Returns (B, H, W) float64 in the inputs' units. Raises ValueError on inconsistent shapes,
    non-finite inputs or an unknown basis.
    """
    from scipy.fft import dctn, idctn

    yh, ym, r, rm, cm = _degradation_inputs(lr_hsi, hr_msi, srf, rows_matrix, cols_matrix)
    (B, h, w), (M, H, W) = yh.shape, ym.shape
    c = _data_scale(yh)
    yh = yh.reshape(B, -1) / c
    ym = ym.reshape(M, -1) / c
    k = int(min(subspace_dim, B, h * w))
    if basis == "svd":
        e = np.linalg.svd(yh, full_matrices=False)[0][:, :k]
    elif basis == "endmembers":
        e = yh[:, _successive_projection(yh, k)]
        k = e.shape[1]
    else:
        raise ValueError(f"basis must be 'svd' or 'endmembers', got {basis!r}")
    mu = float(mu)
    lambda_m = float(lambda_m)

    # HSI term: ½‖Yh − E V S‖² + (μ/2)‖V − T‖². Its normal matrix EᵀE ⊗ (CᵀC ⊗ RᵀR) + μI is
    # diagonal in the product of the eigenbases of EᵀE, rows_matrixᵀrows_matrix and
    # cols_matrixᵀcols_matrix: solved exactly, no inner iterations.
    alpha, pe = np.linalg.eigh(e.T @ e)
    lam_r, ur = np.linalg.eigh(rm.T @ rm)
    lam_c, uc = np.linalg.eigh(cm.T @ cm)
    hsi_denom = np.maximum(alpha, 0.0)[:, None, None] * lam_r[None, :, None] * lam_c[None, None, :] + mu
    hsi_fixed = np.matmul(np.matmul(rm.T, (e.T @ yh).reshape(k, h, w)), cm)

    def solve_hsi(target):
        t = np.tensordot(pe.T, hsi_fixed + mu * target, axes=1)
        t = np.matmul(np.matmul(ur.T, t), uc) / hsi_denom
        return np.tensordot(pe, np.matmul(np.matmul(ur, t), uc.T), axes=1)

    # MSI term: (λm/2)‖Ym − R E V‖² + (μ/2)‖V − T‖², one K x K system shared by all pixels.
    re = r @ e
    msi_inverse = np.linalg.inv(lambda_m * (re.T @ re) + mu * np.eye(k))
    msi_fixed = lambda_m * (re.T @ ym).reshape(k, H, W)

    def solve_msi(target):
        return np.tensordot(msi_inverse, msi_fixed + mu * target, axes=1)

    # Z: (2I + DhᵀDh + DvᵀDv) Z = …, diagonal in the DCT-II basis (Neumann borders).
    lap = 2.0 + _neumann_laplacian_eigenvalues(H)[:, None] + _neumann_laplacian_eigenvalues(W)[None, :]
    threshold = float(lambda_phi) / mu

    # Start from the bicubic image's coefficients (its HSI data term is already small).
    up = bicubic_upsample(yh.reshape(B, h, w), (H / h, W / w), (H, W)).reshape(B, -1)
    z = np.linalg.lstsq(e, up, rcond=None)[0].reshape(k, H, W)
    v1, v2, v3, v4 = z.copy(), _diff_rows(z), _diff_cols(z), z.copy()
    u1, u2, u3, u4 = (np.zeros_like(z) for _ in range(4))
    for _ in range(int(iterations)):
        rhs = (v1 - u1) + (v4 - u4) + _diff_rows_t(v2 - u2) + _diff_cols_t(v3 - u3)
        z = idctn(dctn(rhs, type=2, axes=(1, 2), norm="ortho") / lap, type=2, axes=(1, 2), norm="ortho")
        v1 = solve_hsi(z + u1)
        v4 = solve_msi(z + u4)
        dz_r, dz_c = _diff_rows(z), _diff_cols(z)
        gr, gc = dz_r + u2, dz_c + u3
        norm = np.sqrt(np.sum(gr * gr + gc * gc, axis=0, keepdims=True))
        shrink = np.maximum(norm - threshold, 0.0) / np.maximum(norm, _TINY)
        v2, v3 = gr * shrink, gc * shrink
        u1 += z - v1
        u4 += z - v4
        u2 += dz_r - v2
        u3 += dz_c - v3
    out = (e @ z.reshape(k, -1)).reshape(B, H, W) * c
    return np.maximum(out, 0.0)
