"""Sensor-agnostic fusion around the CSAKD network.

Users bring any hyperspectral sensor (20 to 300 bands) and any multispectral one (3 to 13
bands). The network itself sees neither: it works in a K-dimensional spectral subspace of
the scene.

* :class:`SceneStatistics` holds what is fitted once per scene on the low-resolution grid:
  the LR-HSI's band means, its principal spectral basis U (B×K) and a scalar scale, and a
  linear regression that predicts the K subspace coefficients from the MSI bands (fitted
  where both are observed, at low resolution).
* The network's inputs are the LR-HSI's subspace coefficients and the MSI mapped through
  that regression, so both have K channels whatever the sensors.
* Its base keeps what the LR-HSI measured and takes from the MSI only what the LR-HSI cannot
  see: the subspace image is P·c + (I − P·D)·m, with c the LR-HSI's coefficients, m the
  MSI-predicted ones, D the Wald degradation and P its exact right inverse
  (interpolation.py), so that the result degraded again is c. Where the MSI predicts a
  component poorly the regression shrinks it, so the base is already a sound classical
  fusion; the network's correction goes through the same (I − P·D), so it can only add what
  the LR-HSI does not contradict, and first through the null space of the MSI's linear model
  (:func:`msi_null_projector`), so that it adds nothing the MSI measures either: where the MSI
  measures, the base is already close and a learnt correction lost.
* How the MSI's detail maps to the components' depends on the materials at an edge, so the
  detail weights are fitted per spectral class of the scene as well, and each HR pixel takes
  the classes' weights by its soft membership (:meth:`SceneStatistics.fit_detail_classes`,
  :func:`class_conditional_prediction`).
* The MSI is a linear function of the spectra (its sensor's SRFs): fitted at low resolution in
  the subspace, that model says at high resolution what the fused image still gets wrong in the
  MSI's bands, and a last, closed-form step (:func:`spectral_consistency_gain`) adds the part of
  the correction the LR-HSI cannot see, so that the result is consistent with both images.
* Only components above the LR-HSI's noise are sharpened (:func:`signal_subspace_dimension`):
  a noisy scene keeps fewer than K.
* The full spectrum is bicubic(LR-HSI) + ρ·U·(detail): everything of the LR-HSI outside the
  subspace is kept as bicubic upsampling, so no band's information is thrown away.
* The network's channels are one of three representations. The K components themselves
  (``"subspace"``, the shipped student) mean something else in every scene, and in every part
  of one: their signs are a convention and components of similar variance mix. The same K
  components rotated towards fixed shapes along the bands (``"aligned"``, :func:`aligned_frame`)
  keep the base and the subspace and hide those conventions from the network, so that a
  correction learnt on one part of a scene holds on another (learnability.py); the user's own
  training (user_training.py) uses it. The base's spectrum on a fixed wavelength grid
  (``"grid"``, :data:`WAVELENGTH_GRID_NM`) means the same in every scene, so that what the
  network learns from some scenes can carry to others (a plain network does:
  representation_probe.py; the student's does in the paper's full-resolution layout, not in
  the bundled space-to-depth one: learnability.py); its correction is resampled onto the bands
  and projected onto the subspace, where it goes through the same (I − P·D) and consistency
  step. The bundled models are in the subspace.
* The scene's spatial degradation (psf.SpatialDegradation: the PSF estimated from the pair or
  given by the user, and a measured misregistration, registration.py) is part of the
  statistics: D and the interpolators then blur as the sensor did and sample the LR pixels
  where they really are.

Statistics are fitted on the whole scene, never per tile, so that tiles agree with each other.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .interpolation import upsample_lr
from .psf import SpatialDegradation, degrade_torch, wald
from .network import CSAKDNet, NetworkConfig, NetworkOutput, upsample
from .srf import linear_resampling_matrix

# Ridge of the detail regression, relative to the MSI detail's mean variance: larger values
# trade PSNR for SAM. Measured on the 27 validation cases with the consistent base (K = 8): 1e-3 →
# 34.23 dB / 5.29°, 2e-3 → 34.14 / 5.22, 3e-3 → 34.06 / 5.17; 2e-3 is the smallest at which
# the SAM is below GSA's on every case (an 8-band MSI's collinear bands otherwise inject
# spectrally wrong detail into HyMap's SWIR).
DETAIL_RIDGE = 2e-3
# The spectral consistency step's noise floor, relative to the MSI detail's variance (see
# spectral_consistency_gain). Measured with the blind PSF on the 27 validation cases, mean PSNR /
# SAM against no step (34.81 dB / 4.94°): floor 3e-3 +0.13 dB / +0.022°, 1e-2 +0.10 / +0.018
# (×3 and ×8 only: 1e-3 +0.14 / +0.029; ×4 only: 3e-2 +0.07 / +0.011). AVIRIS Jasper Ridge with
# WorldView-2 gains 0.45–0.67 dB and SAM at 1e-2; smaller floors gain more there but cost HyMap
# Berlin with WorldView-2 up to 0.2° SAM.
SPECTRAL_CONSISTENCY_FLOOR = 1e-2
# Spectral classes of the context-adaptive detail weights (SceneStatistics.fit_detail_classes),
# measured on the 27 validation cases (after the spectral consistency step): 4 classes +0.154 dB
# PSNR / −0.047° SAM, 6 classes +0.153 / −0.064, 8 classes +0.110 / −0.055; worst case −0.04 dB.
# Shrinkage 200 pixels: 50 gained more on some cases (+0.4 dB) but cost HyMap Berlin with an RGB
# camera 1.9° SAM; 1000 kept a third of the gain.
DETAIL_CLASSES = 6
CLASS_COMPONENTS = 6
CLASS_SHRINKAGE_PIXELS = 200.0
CLASS_MIN_PIXELS = 50


# Below this many bands the noise estimate of signal_subspace_dimension is not used: it counts
# what a band does not share with the others as noise, which holds for a hyperspectral cube's
# hundreds of narrow, strongly correlated bands but not for a few broad ones (six or eight
# independent smooth bands were all taken for noise). The sensors this plugin serves have 50
# (CAVE-like laboratory cubes have 31) to several hundred bands.
MIN_BANDS_FOR_NOISE_ESTIMATE = 50


def signal_subspace_dimension(covariance: torch.Tensor, pixels: int, eigenvalues: np.ndarray, basis: np.ndarray) -> int:
    """How many of the leading components carry more signal than noise (HySime's rule).

    covariance (B, B): of the LR-HSI's centred pixels (float64), estimated on ``pixels`` pixels;
    eigenvalues (K,) and basis (B, K): its leading eigenpairs, in order. Each band's noise
    variance is what remains of it regressed on all the other bands, σ²_b = 1 / (C⁻¹)_bb,
    enlarged by n / (n − B) for the B − 1 fitted regressors (Bioucas-Dias & Nascimento,
    "Hyperspectral subspace identification", IEEE TGRS 46(8), 2008). Component k is kept while
    its power λ_k exceeds twice its noise power u_kᵀ·diag(σ²)·u_k, the condition under which
    keeping it lowers the expected squared error. Returns K when there are too few pixels
    (n ≤ 2·B) or too few bands (B < MIN_BANDS_FOR_NOISE_ESTIMATE) to estimate the noise, or
    the image is constant.

    Why: a component the noise dominates is passed on by the consistent interpolator, which
    undoes the PSF's smoothing, and it carries no detail the MSI could predict. Measured at
    scale 4 with a Sentinel-2 MSI and 30 dB noise on the LR-HSI, the three validation cubes'
    PSNR / SAM with 16 components: 32.67 dB / 7.45°, 31.46 / 5.83, 32.45 / 7.25 without the
    rule, 33.07 / 7.08, 31.92 / 5.22, 32.80 / 6.44 with it (8–11 components kept; GSA's SAM
    7.39°, 7.33°, 7.66°); without noise the rule keeps 40–69 components, so nothing changes.
    """
    bands = covariance.shape[0]
    k = basis.shape[1]
    power = float(covariance.diagonal().mean())
    if pixels <= 2 * bands or bands < MIN_BANDS_FOR_NOISE_ESTIMATE or not power > 0:
        return k
    regularised = covariance + 1e-9 * power * torch.eye(bands, dtype=covariance.dtype)
    noise = (pixels / (pixels - bands)) / torch.linalg.inv(regularised).diagonal().numpy()
    if not np.isfinite(noise).all():
        return k
    noise_power = np.einsum("bk,b,bk->k", basis, noise, basis)
    above = eigenvalues > 2 * noise_power
    return k if above.all() else int(np.argmin(above))


# The fixed wavelength grid of the "grid" representation: 50 nm steps over the range that
# Earth-observation imaging spectrometers cover, finer than the SWIR's broad features and than
# any MSI band, coarse enough that its 43 channels cost the network little.
WAVELENGTH_GRID_NM = np.arange(400.0, 2501.0, 50.0)
REPRESENTATIONS = ("subspace", "aligned", "grid")


def wavelength_grid_maps(wavelengths_nm: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(to (G, B), back (B, G)) float64 for a sensor whose B band centres are ``wavelengths_nm``:
    ``to`` resamples a spectrum onto :data:`WAVELENGTH_GRID_NM` by linear interpolation (zero rows
    where the grid lies more than 25 nm beyond the bands), ``back`` a grid spectrum onto the bands
    from the covered grid points alone (srf.linear_resampling_matrix). Raises ValueError for
    non-finite centres."""
    wavelengths = np.asarray(wavelengths_nm, dtype=np.float64)
    to = linear_resampling_matrix(wavelengths, WAVELENGTH_GRID_NM)
    covered = to.sum(1) > 0
    back = np.zeros((wavelengths.size, WAVELENGTH_GRID_NM.size))
    back[:, covered] = linear_resampling_matrix(WAVELENGTH_GRID_NM[covered], wavelengths, reach_nm=np.inf)
    return to, back


def representation_channels(representation: str, subspace_dim: int) -> int:
    """The network's channels in ``representation``: the subspace's K, or the grid's 43 points.
    Raises ValueError for another representation."""
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
    return WAVELENGTH_GRID_NM.size if representation == "grid" else subspace_dim


@functools.lru_cache(maxsize=64)
def legendre_reference(bands: int, k: int) -> np.ndarray:
    """(bands, k) float64 orthonormal columns: the Legendre polynomials P_0 … P_{k−1} of each
    band's place in the band order (the first band at −1, the last at +1), orthonormalised over
    the bands (Gram–Schmidt in the polynomials' order, each keeping its polynomial's sign).
    Shapes that mean the same for every sensor: a level, a slope, a bend across its spectrum.
    Band numbers rather than band centres, so that every path (training crops, fusion, the
    user's own training, cubes whose centres are unknown) places the shapes alike. Columns
    beyond ``bands`` are zero (a subspace has no more components than bands). Read-only;
    raises ValueError for ``bands`` or ``k`` below 1."""
    if bands < 1 or k < 1:
        raise ValueError(f"reference shapes need at least one band and one shape, got {bands} bands, k = {k}")
    shapes = min(k, bands)
    q, r = np.linalg.qr(np.polynomial.legendre.legvander(np.linspace(-1.0, 1.0, bands), shapes - 1))
    reference = np.zeros((bands, k))
    # QR's signs are LAPACK's choice: make each column keep its polynomial's sign.
    reference[:, :shapes] = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    reference.flags.writeable = False
    return reference


def aligned_frame(basis: torch.Tensor) -> torch.Tensor:
    """(N, K, K) orthogonal R for scene bases ``basis`` (N, B, K) (orthonormal columns, zero
    columns beyond the signal subspace): the rotation of the scene's components that brings
    them closest to the reference shapes L = :func:`legendre_reference`, argmin over orthogonal
    R of ‖U·R − L‖ (the orthogonal Procrustes problem: R = W·Vᵀ for Uᵀ·L = W·Σ·Vᵀ; Schönemann,
    Psychometrika 31, 1966). U·R does not depend on the signs or the order the
    eigen-decomposition gave the components, nor on any rotation among them, as long as the
    shapes reach every signal component (Uᵀ·L of full rank on them; a component nearly
    orthogonal to all K shapes, say a narrow absorption feature when K is far below the band
    count, is placed unstably). The "aligned" representation's network sees the coefficients
    Rᵀ·c and its correction δ' returns as R·δ'. The K × K decomposition runs in double
    precision on the CPU, whatever the basis's device and precision.

    Why: a principal component's sign is a convention and components of similar variance mix
    from scene to scene, so a network on the raw components learns a correction whose channels
    mean something else in the next scene, or the next part of one. Measured on the four CAVE
    laboratory scenes, top three quarters against bottom quarter (RGB ×4), the leading
    components' signed cosines between the two parts' bases were ≥ 0.95 on cloth and feathers
    and −0.88 (oil painting) and −0.80, −0.61, −0.66 (thread spools) on the scenes where the
    learnt correction lost (learnability.py). Computed here from the basis alone, so that
    teacher and student, which read the first K of one fit, each align their own K, and the
    scene statistics and the base are unchanged. No gradient flows through it (the basis is
    the scene's, not learnt)."""
    with torch.no_grad():
        reference = torch.from_numpy(np.array(legendre_reference(*basis.shape[-2:])))
        w, _, vh = torch.linalg.svd(basis.detach().to("cpu", torch.float64).transpose(-1, -2) @ reference)
        return (w @ vh).to(basis.device, basis.dtype)


@dataclass
class SceneStatistics:
    band_mean: np.ndarray  # (B,)
    scale: float  # ρ: one number, so that the subspace keeps the bands' relative weight
    basis: np.ndarray  # (B, K), orthonormal columns, zero beyond signal_components
    msi_mean: np.ndarray  # (M,)
    msi_std: np.ndarray  # (M,)
    regression: np.ndarray  # (K, M + 1): coefficients ≈ regression @ [normalised MSI; 1]
    # How the LR-HSI was made from the HR scene: PSF, scale and the LR pixel centres' offset
    # (psf.py). None means the Wald protocol's Gaussian at the scale of the images given.
    degradation: Optional[SpatialDegradation] = None
    # The MSI's linear model in the subspace (fitted at low resolution, see :meth:`fit_regression`
    # and :meth:`detail_weights`), for the spectral consistency step (:func:`spectral_consistency_gain`);
    # None where too few pixels allowed the detail fit, and the step is then skipped.
    msi_coefficient_cov: Optional[np.ndarray] = None  # (M, K): covariance of the normalised MSI and the coefficients
    coefficient_variance: Optional[np.ndarray] = None  # (K,)
    detail_covariance: Optional[np.ndarray] = None  # (K, K): of the coefficients' high-pass part
    msi_detail_variance: Optional[np.ndarray] = None  # (M,): of the normalised MSI's high-pass part
    # Detail weights per spectral class (see :meth:`fit_detail_classes`); None: one set for the scene.
    class_centres: Optional[np.ndarray] = None  # (J, D) in coefficient units
    class_spread: Optional[float] = None
    class_weights: Optional[np.ndarray] = None  # (J, K, M)
    # Leading components above the LR-HSI's noise (signal_subspace_dimension); the basis's
    # columns beyond them are zero. None: not estimated (all K kept).
    signal_components: Optional[int] = None
    # The "grid" representation's maps between the bands and WAVELENGTH_GRID_NM
    # (wavelength_grid_maps, set by set_wavelengths); None: band centres unknown, and a grid
    # model then adds nothing to the base.
    grid_from_bands: Optional[np.ndarray] = None  # (G, B)
    bands_from_grid: Optional[np.ndarray] = None  # (B, G)

    def set_wavelengths(self, wavelengths_nm: Optional[np.ndarray]) -> "SceneStatistics":
        """Record the LR-HSI's band centres (B,) in nm for the "grid" representation (None
        forgets them); returns self. Raises ValueError when their count is not B."""
        if wavelengths_nm is None:
            self.grid_from_bands = self.bands_from_grid = None
            return self
        if len(wavelengths_nm) != self.band_mean.shape[0]:
            raise ValueError(f"{len(wavelengths_nm)} band centres for {self.band_mean.shape[0]} bands")
        self.grid_from_bands, self.bands_from_grid = wavelength_grid_maps(wavelengths_nm)
        return self

    @property
    def offset(self) -> Tuple[float, float]:
        return self.degradation.offset if self.degradation is not None else (0.0, 0.0)

    @classmethod
    def estimate(
        cls,
        lr_hsi: np.ndarray,
        msi_at_lr: np.ndarray,
        subspace_dim: int,
        valid: Optional[np.ndarray] = None,
        max_pixels: int = 200_000,
        ridge: float = 1e-3,
        seed: int = 0,
        detail_ridge: Optional[float] = DETAIL_RIDGE,
        regression: bool = True,
    ) -> "SceneStatistics":
        """Fit the scene's statistics on the LR grid.

        lr_hsi (B, h, w) and msi_at_lr (M, h, w): the MSI degraded onto the LR-HSI's grid.
        valid (h, w): pixels where both inputs have data. At most ``max_pixels`` random
        pixels are used, which keeps a very large scene's fit fast and its memory bounded.
        The regression's weights are then refitted on the images' detail (see
        :meth:`detail_weights`), unless ``detail_ridge`` is None. ``regression`` False leaves
        the regression at zero (the MSI's means and deviations are set) for a later
        :meth:`fit_regression`, when the MSI's degradation is still to be estimated.
        """
        bands, rows, cols = lr_hsi.shape
        msi_bands = msi_at_lr.shape[0]
        if msi_at_lr.shape[1:] != (rows, cols):
            raise ValueError(f"MSI at LR {msi_at_lr.shape[1:]} does not match the LR-HSI grid {(rows, cols)}")
        _, index = _fit_pixels(lr_hsi, msi_at_lr, valid, max_pixels, seed)
        # In double precision (an exactly low-rank scene is reproduced to 1e-9), through torch:
        # its threads follow the thread policy (threads.py), while numpy's BLAS threads spin
        # against any other load (beside one busy process on 2 cores this fit took 0.9 s).
        # Double precision only for the chosen pixels: a large scene's whole cube in float64
        # would cost several times its own memory.
        centred = _chosen_pixels(lr_hsi, index)
        band_mean = centred.mean(1)
        centred -= band_mean[:, None]
        scale = float(torch.sqrt(centred.square().mean())) or 1.0
        centred /= scale
        k = min(subspace_dim, bands)
        covariance = centred @ centred.T / centred.shape[1]
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues, eigenvectors, band_mean = eigenvalues.numpy(), eigenvectors.numpy(), band_mean.numpy()
        basis = eigenvectors[:, ::-1][:, :k]
        # A sign convention makes the basis reproducible across platforms and runs.
        basis = basis * np.where(basis.sum(0) < 0, -1.0, 1.0)
        # Components beyond the signal subspace are left to the bicubic part of every spectrum
        # (a zero column adds nothing), so a teacher's larger fit still serves a student exactly.
        signal = signal_subspace_dimension(covariance, centred.shape[1], eigenvalues[::-1][:k].copy(), basis)
        basis[:, signal:] = 0.0
        if k < subspace_dim:
            basis = np.concatenate([basis, np.zeros((bands, subspace_dim - k))], axis=1)
        statistics = cls(band_mean, scale, basis, np.zeros(msi_bands), np.ones(msi_bands), np.zeros((subspace_dim, msi_bands + 1)),
                         signal_components=signal)
        if regression:
            statistics.fit_regression(lr_hsi, msi_at_lr, valid, max_pixels, ridge, seed, detail_ridge)
        else:
            statistics.msi_mean, statistics.msi_std = _mean_and_deviation(msi_at_lr.reshape(msi_bands, -1)[:, index])
        return statistics

    def fit_regression(
        self,
        lr_hsi: np.ndarray,
        msi_at_lr: np.ndarray,
        valid: Optional[np.ndarray] = None,
        max_pixels: int = 200_000,
        ridge: float = 1e-3,
        seed: int = 0,
        detail_ridge: Optional[float] = DETAIL_RIDGE,
    ) -> None:
        """(Re)fit the MSI → subspace regression with this basis (see :meth:`estimate`)."""
        bands, rows, cols = lr_hsi.shape
        msi_bands = msi_at_lr.shape[0]
        z = msi_at_lr.reshape(msi_bands, -1)
        keep, index = _fit_pixels(lr_hsi, msi_at_lr, valid, max_pixels, seed)
        centred = _chosen_pixels(lr_hsi, index) - torch.from_numpy(self.band_mean)[:, None]
        coefficients = (torch.from_numpy(np.ascontiguousarray(self.basis.T)) @ centred).numpy() / self.scale
        z = z[:, index].astype(np.float64)
        msi_mean, msi_std = _mean_and_deviation(z)
        design = np.concatenate([(z - msi_mean[:, None]) / msi_std[:, None], np.ones((1, z.shape[1]))])
        gram = design @ design.T / design.shape[1] + ridge * np.eye(msi_bands + 1)
        self.msi_mean, self.msi_std = msi_mean, msi_std
        self.regression = np.linalg.solve(gram, design @ coefficients.T / design.shape[1]).T
        centred_coefficients = coefficients - coefficients.mean(1, keepdims=True)
        self.msi_coefficient_cov = design[:-1] @ centred_coefficients.T / design.shape[1]
        self.coefficient_variance = np.maximum(centred_coefficients.var(1), 1e-12)
        if detail_ridge is None:
            return
        weights = self.detail_weights(lr_hsi, msi_at_lr, keep.reshape(rows, cols), max_pixels, detail_ridge)
        if weights is not None:
            self.regression = np.concatenate([weights, self.regression[:, -1:]], axis=1)

    def detail_weights(
        self, lr_hsi: np.ndarray, msi_at_lr: np.ndarray, valid: np.ndarray, max_pixels: int, ridge: float = DETAIL_RIDGE
    ) -> Optional[np.ndarray]:
        """(K, M) weights that predict the subspace coefficients' spatial detail from the MSI's,
        fitted on the high-pass parts of both at low resolution; None when the image is too
        small or too sparse to fit them.

        The detail is what the base injects, and what the MSI says about it differs from what it
        says about the whole signal: a component the MSI predicts well on average but whose
        texture it does not share (NIR or SWIR seen from an RGB camera) gets small weights here
        and is not sharpened with another band's edges. (Measured on the 27 validation cases:
        +0.5 dB PSNR and −0.4° SAM against weights from the whole signal.)

        The same high-pass parts also set the statistics' detail_covariance and
        msi_detail_variance (the spectral consistency step's prior and floor) and the spectral
        classes (:meth:`fit_detail_classes`).
        """
        rows, cols = valid.shape
        step = max(1, int(math.ceil(math.sqrt(rows * cols / max_pixels))))
        lr, msi, valid = lr_hsi[:, ::step, ::step], msi_at_lr[:, ::step, ::step], valid[::step, ::step]
        rows, cols = (valid.shape[0] // 2) * 2, (valid.shape[1] // 2) * 2
        if min(rows, cols) < 6:
            return None
        lr, msi, valid = lr[:, :rows, :cols], msi[:, :rows, :cols], valid[:rows, :cols]
        # In float32 and through torch (a float64 band mean made the whole cube float64, and
        # numpy's einsum does not use BLAS: 0.4 s of a 512² scene's fit, now 0.03 s).
        centred = torch.from_numpy(np.ascontiguousarray(lr, dtype=np.float32)) - torch.from_numpy(
            self.band_mean.astype(np.float32))[:, None, None]
        if not valid.all():
            centred[:, torch.from_numpy(~valid)] = 0.0
        basis = torch.from_numpy(self.basis.T.astype(np.float32))
        coefficients = (basis @ centred.reshape(centred.shape[0], -1)).reshape(-1, rows, cols).numpy() / np.float32(self.scale)
        normalised = np.where(valid, (msi - self.msi_mean[:, None, None]) / self.msi_std[:, None, None], 0).astype(np.float32)
        detail = _high_pass(np.concatenate([coefficients, normalised]))
        # Only pixels whose neighbourhood is all data: a gap's edge is not texture. (The image's
        # own border stays: small scenes cannot spare it, and its replicated edge is harmless.)
        padded = np.pad(valid, 2, mode="edge")
        usable = valid.copy()
        for dr in range(-2, 3):
            for dc in range(-2, 3):
                usable &= padded[2 + dr : 2 + dr + rows, 2 + dc : 2 + dc + cols]
        k, m = coefficients.shape[0], normalised.shape[0]
        if usable.sum() < 10 * (m + 1):
            return None
        target = detail[:k][:, usable].astype(np.float64)
        inputs = detail[k:][:, usable].astype(np.float64)
        gram = inputs @ inputs.T / inputs.shape[1]
        self.detail_covariance = target @ target.T / target.shape[1]
        self.msi_detail_variance = np.diag(gram).copy()
        gram += ridge * np.trace(gram) / m * np.eye(m)
        weights = np.linalg.solve(gram, inputs @ target.T / inputs.shape[1]).T
        self.fit_detail_classes(coefficients[:, usable], target, inputs, weights, ridge)
        return weights

    def fit_detail_classes(
        self, features: np.ndarray, target: np.ndarray, inputs: np.ndarray, weights: np.ndarray, ridge: float = DETAIL_RIDGE
    ) -> None:
        """Detail weights per spectral class (context-adaptive injection): the scene's LR pixels
        are clustered on their first CLASS_COMPONENTS coefficients (k-means, seeded k-means++
        start, so a scene always gives the same classes) into DETAIL_CLASSES classes, and each
        class gets its own (K, M) detail weights, fitted like the global ones on its own pixels and
        shrunk towards the global ``weights`` (a class of n pixels counts as n against
        CLASS_SHRINKAGE_PIXELS of the global fit).

        features (K, n) coefficients, target (K, n) and inputs (M, n) their and the MSI's
        high-pass parts, of the same n pixels. Sets class_centres (J, D), class_spread (the mean
        squared distance of a pixel to its class centre) and class_weights (J, K, M); leaves them
        None when the subspace has fewer than CLASS_COMPONENTS components or there are fewer
        than CLASS_MIN_PIXELS pixels per class on average.

        Why: an edge between two materials carries, beyond the MSI's bands (SWIR seen from a
        VNIR camera), a spectral difference that depends on the materials, which one scene-wide
        regression averages away; after the spectral consistency step nearly all of the error is
        in the directions the MSI cannot see (measured on the nine ×4 Wald cases: 69–100 %).
        Restaino et al., "Context-adaptive pansharpening based on image segmentation", IEEE TGRS
        55(2), 2017, do the same for pansharpening with hard segments; here the classes are soft
        at high resolution (:func:`class_conditional_prediction`).
        """
        self.class_centres = self.class_spread = self.class_weights = None
        k, n = features.shape
        m = inputs.shape[0]
        # Classes on components that are partly noise would be noise too.
        kept = k if self.signal_components is None else min(k, self.signal_components)
        if kept < CLASS_COMPONENTS or n < DETAIL_CLASSES * CLASS_MIN_PIXELS:
            return
        points = torch.from_numpy(np.ascontiguousarray(features[:CLASS_COMPONENTS].T, dtype=np.float64))
        centres, labels = _kmeans(points, DETAIL_CLASSES)
        class_weights = []
        for j in range(DETAIL_CLASSES):
            chosen = (labels == j).numpy()
            count = int(chosen.sum())
            if count < 5 * (m + 1):
                class_weights.append(weights)
                continue
            own_inputs, own_target = inputs[:, chosen], target[:, chosen]
            gram = own_inputs @ own_inputs.T / count
            gram += ridge * np.trace(gram) / m * np.eye(m)
            own = np.linalg.solve(gram, own_inputs @ own_target.T / count).T
            class_weights.append((count * own + CLASS_SHRINKAGE_PIXELS * weights) / (count + CLASS_SHRINKAGE_PIXELS))
        self.class_centres = centres.numpy()
        self.class_spread = float((points - centres[labels]).square().sum(1).mean()) or 1.0
        self.class_weights = np.stack(class_weights)

    def to_tensors(self, device="cpu", dtype=torch.float32) -> Dict[str, torch.Tensor]:
        """The statistics as tensors with a leading batch dimension of 1."""
        return stack_statistics([self], device, dtype)


def _fit_pixels(lr_hsi, msi_at_lr, valid, max_pixels: int, seed: int):
    """Pixels where both images have data (flat mask) and at most ``max_pixels`` of them, drawn
    at random (sorted flat indexes)."""
    keep = np.isfinite(lr_hsi).all(0).reshape(-1) & np.isfinite(msi_at_lr).all(0).reshape(-1)
    if valid is not None:
        keep &= valid.reshape(-1)
    index = np.flatnonzero(keep)
    if index.size < 4:
        raise ValueError("fewer than 4 pixels where both images have data: cannot fit the scene")
    if index.size > max_pixels:
        index = np.sort(np.random.default_rng(seed).choice(index, max_pixels, replace=False))
    return keep, index


def _kmeans(points: torch.Tensor, classes: int, iterations: int = 20):
    """(centres (J, D), labels (n,)) of k-means on (n, D) points, started by k-means++ with a
    fixed seed (Arthur & Vassilvitskii, SODA 2007), so that a scene always gives the same classes."""
    generator = torch.Generator().manual_seed(0)
    centres = points[torch.randint(points.shape[0], (1,), generator=generator)]
    for _ in range(classes - 1):
        distance = torch.cdist(points, centres).min(1).values.square()
        if not distance.sum() > 0:  # fewer distinct points than classes
            distance = torch.ones_like(distance)
        centres = torch.cat([centres, points[torch.multinomial(distance / distance.sum(), 1, generator=generator)]])
    for _ in range(iterations):
        labels = torch.cdist(points, centres).argmin(1)
        for j in range(classes):
            members = labels == j
            if members.any():
                centres[j] = points[members].mean(0)
    return centres, torch.cdist(points, centres).argmin(1)


def _chosen_pixels(image: np.ndarray, index: np.ndarray) -> torch.Tensor:
    """(C, n) float64 tensor (a copy) of the pixels at flat indexes ``index`` of a (C, h, w) image."""
    flat = image.reshape(image.shape[0], -1)
    chosen = flat if index.size == flat.shape[1] else flat[:, index]
    return torch.from_numpy(chosen.astype(np.float64))


def _mean_and_deviation(samples: np.ndarray):
    """Per-band mean and standard deviation of (M, n) samples in double precision; a constant
    band's deviation is 1 so that standardising it gives zeros, not NaN."""
    samples = samples.astype(np.float64)
    mean, deviation = samples.mean(1), samples.std(1)
    deviation[deviation == 0] = 1.0
    return mean, deviation


def _high_pass(image: np.ndarray) -> np.ndarray:
    """image − its Wald degradation by 2 upsampled again: (C, h, w) with h, w even."""
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None]
    low = upsample(degrade_torch(tensor, wald(2)), tuple(image.shape[-2:]), mode="bicubic")
    return (tensor - low)[0].numpy()


SPECTRAL_MODEL_FIELDS = ("msi_coefficient_cov", "coefficient_variance", "detail_covariance", "msi_detail_variance")
CLASS_FIELDS = ("class_centres", "class_spread", "class_weights")
GRID_FIELDS = ("grid_from_bands", "bands_from_grid")


def stack_statistics(statistics, device="cpu", dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """Batch the statistics of several scenes (same band counts) for one forward pass."""
    stacked = {
        name: torch.as_tensor(np.stack([np.asarray(getattr(s, name)) for s in statistics]), dtype=dtype, device=device)
        for name in ("band_mean", "basis", "msi_mean", "msi_std", "regression")
    }
    stacked["scale"] = torch.tensor([s.scale for s in statistics], dtype=dtype, device=device)
    for fields in (SPECTRAL_MODEL_FIELDS, CLASS_FIELDS, GRID_FIELDS):
        if all(getattr(s, name) is not None for s in statistics for name in fields):
            for name in fields:
                stacked[name] = torch.as_tensor(np.stack([np.asarray(getattr(s, name)) for s in statistics]), dtype=dtype, device=device)
    degradations = {s.degradation for s in statistics}
    if len(degradations) > 1:
        raise ValueError("a batch must share one spatial degradation (PSF, scale and offset)")
    stacked["degradation"] = degradations.pop()
    return stacked


def scene_degradation(stats: Dict, scale: int) -> SpatialDegradation:
    """The batch's spatial degradation at ``scale`` (the Wald protocol's when none was fitted).
    Raises ValueError when the statistics were fitted for another scale."""
    degradation = stats.get("degradation")
    if degradation is None:
        return wald(scale)
    if degradation.scale != scale:
        raise ValueError(f"the scene's degradation is for scale {degradation.scale}, the images are at scale {scale}")
    return degradation


@dataclass(frozen=True)
class FusionModelConfig:
    """The network, the subspace's K, and what the network's channels are (REPRESENTATIONS:
    the K components, or the G points of WAVELENGTH_GRID_NM)."""

    network: NetworkConfig
    subspace_dim: int
    representation: str = "subspace"

    def __post_init__(self):
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {self.representation!r}")

    @property
    def channels(self) -> int:
        """The network's input and output channels (:func:`representation_channels`)."""
        return representation_channels(self.representation, self.subspace_dim)

    def to_dict(self) -> Dict:
        return {"network": self.network.to_dict(), "subspace_dim": self.subspace_dim, "representation": self.representation}

    @classmethod
    def from_dict(cls, data: Dict) -> "FusionModelConfig":
        # Bundles from before the grid representation have no such field: the subspace.
        return cls(NetworkConfig.from_dict(data["network"]), int(data["subspace_dim"]), data.get("representation", "subspace"))


class SubspaceFusionModel(nn.Module):
    """The CSAKD network wrapped for any sensor pair (see the module docstring)."""

    def __init__(self, config: FusionModelConfig):
        super().__init__()
        if config.network.hsi_channels != config.channels or config.network.msi_channels != config.channels:
            raise ValueError(
                f"the network's input channels must both equal the {config.representation}'s {config.channels} channels"
            )
        self.config = config
        self.network = CSAKDNet(config.network)
        # An untrained model is exactly the classical base; training only ever adds to it,
        # instead of first unlearning a random residual.
        nn.init.zeros_(self.network.head_refine.weight)
        nn.init.zeros_(self.network.head_refine.bias)
        # Inference skips the network while its correction is exactly zero (subspace_detail);
        # benchmarks of the network's own cost switch this off.
        self.skip_zero_correction = True

    @property
    def pad_multiple(self) -> int:
        return self.config.network.unshuffle

    def encode(self, lr_hsi: torch.Tensor, hr_msi: torch.Tensor, stats: Dict[str, torch.Tensor]):
        """(N,B,h,w), (N,M,H,W) → subspace coefficients (N,K,h,w), MSI-predicted coefficients (N,K,H,W)
        (with the scene-wide regression)."""
        return self._encode(lr_hsi, normalised_msi(hr_msi, stats), stats)

    def _encode(self, lr_hsi: torch.Tensor, msi: torch.Tensor, stats: Dict[str, torch.Tensor]):
        """:meth:`encode` of an MSI already standardised (:func:`normalised_msi`)."""
        # Only the first K components of the statistics: they equal a fit at K (the basis is
        # the leading eigenvectors in order, and each component's regression is fitted on its
        # own), so a teacher and a student with different subspaces train on one fit.
        n, k = lr_hsi.shape[0], self.config.subspace_dim
        centred = lr_hsi - stats["band_mean"].view(n, -1, 1, 1)
        coefficients = torch.einsum("nbk,nbhw->nkhw", stats["basis"][..., :k], centred) / stats["scale"].view(n, 1, 1, 1)
        regression = stats["regression"][:, :k]
        weights, intercept = regression[..., :-1], regression[..., -1]
        predicted = torch.einsum("nkm,nmhw->nkhw", weights, msi) + intercept.view(n, -1, 1, 1)
        return coefficients, predicted

    def forward(
        self, lr_hsi: torch.Tensor, hr_msi: torch.Tensor, stats: Dict[str, torch.Tensor]
    ) -> NetworkOutput:
        """Fused full spectrum (N,B,H,W) and the network's fused feature.

        H and W must be an integer multiple s of h and w; any size is accepted (inputs are
        padded internally to what the network needs).
        """
        detail, fused = self.subspace_detail(lr_hsi, hr_msi, stats)
        return NetworkOutput(compose_spectrum(lr_hsi, detail, stats), fused)

    def correction_is_zero(self) -> bool:
        """True while the output convolution is all zeros (an untrained model): the network's
        correction is then exactly zero whatever its input."""
        head = self.network.head_refine
        return not (bool(head.weight.any()) or bool(head.bias is not None and head.bias.any()))

    def subspace_detail(self, lr_hsi: torch.Tensor, hr_msi: torch.Tensor, stats: Dict[str, torch.Tensor]):
        """The K-channel detail (N,K,H,W) that :func:`compose_spectrum` adds to the bicubic
        LR-HSI, and the network's fused feature (None when the network was not run: an untrained
        model without gradients, whose correction is zero).

        The subspace image is x = P·c + (I − P·D)(m + r), then x + (I − P·D)·G·(m̃ − A·x): P the
        consistent interpolator, D the scene's spatial degradation, c the LR-HSI's coefficients,
        m the MSI-predicted ones (with each pixel's spectral classes' weights, see
        :func:`class_conditional_prediction`), r the network's correction, m̃ the standardised
        MSI and A, G the MSI's model and gain of :func:`spectral_consistency_gain`. Its
        degradation is c whatever m, r and the step add, so neither the regressions, the network
        nor the step can contradict what the LR-HSI measured; they only add what it cannot see.
        The detail is that image minus the bicubic c that :func:`compose_spectrum` starts from.

        Tiles are blended in this K-channel space rather than over hundreds of bands: the
        spectrum is linear in the detail, so blending either gives the same result.
        """
        lr_rows, lr_cols = lr_hsi.shape[-2:]
        hr_rows, hr_cols = hr_msi.shape[-2:]
        scale = hr_rows // lr_rows
        if hr_rows != scale * lr_rows or hr_cols != scale * lr_cols:
            raise ValueError(
                f"high-resolution size {(hr_rows, hr_cols)} is not an integer multiple of {(lr_rows, lr_cols)}"
            )
        degradation = scene_degradation(stats, scale)
        msi = normalised_msi(hr_msi, stats)
        coefficients, predicted = self._encode(lr_hsi, msi, stats)

        def consistent(x):
            return upsample_lr(x, degradation, "consistent")

        def invisible(x):
            return x - consistent(degrade_torch(x, degradation))

        measured = consistent(coefficients)
        base = measured - upsample_lr(coefficients, degradation, "bicubic")
        by_class = class_conditional_prediction(msi, measured + invisible(predicted), stats)
        if by_class is not None:
            predicted = by_class

        step = spectral_consistency_gain(stats, coefficients.shape[1], degradation)

        def completed(added: torch.Tensor) -> torch.Tensor:
            # The subspace image measured + added (added: the part the LR-HSI cannot see), made
            # consistent with the MSI (spectral_consistency_gain), as detail over bicubic(c).
            if step is not None:
                to_msi, gain = step
                residual = msi - torch.einsum("nmk,nkhw->nmhw", to_msi, measured + added)
                added = added + invisible(torch.einsum("nkm,nmhw->nkhw", gain, residual))
            return base + added

        if self.skip_zero_correction and not torch.is_grad_enabled() and self.correction_is_zero():
            # The network would be run only for its output to be multiplied by zero: the base is
            # exact without it (a 512² scene, median of 3 alternating runs: 4.3 s instead of
            # 5.6 s). Training always runs it, since the zeroed convolution's gradient needs the
            # features.
            return completed(invisible(predicted)), None
        grid = self.config.representation == "grid"
        if grid and "grid_from_bands" not in stats:
            # Without the bands' centres there is no grid to correct on: the base alone.
            return completed(invisible(predicted)), None

        k = coefficients.shape[1]
        lr_input, hr_input = coefficients, predicted
        frame = aligned_frame(stats["basis"][..., :k]) if self.config.representation == "aligned" else None
        if frame is not None:
            lr_input, hr_input = (torch.einsum("nkj,nkhw->njhw", frame, x) for x in (coefficients, predicted))
        if grid:
            # The base's spectrum on the grid, less the scene's mean spectrum, ÷ scale: the
            # LR-HSI's, and the fused one with the MSI-predicted detail, from the same K components
            # through a small per-scene matrix. Centred because with the mean added (values up to
            # 4.3 against a detail of a few tenths) the student could not even fit 4 fixed batches:
            # +0.003 dB after 80 steps at 1e-4, centred +0.72 dB (the subspace's +0.26).
            to_grid = torch.einsum("ngb,nbk->ngk", stats["grid_from_bands"], stats["basis"][..., :k])

            def on_grid(x):
                return torch.einsum("ngk,nkhw->nghw", to_grid, x)

            lr_input, hr_input = on_grid(coefficients), on_grid(measured + invisible(predicted))
        pad_rows = _lr_padding(lr_rows, scale, self.pad_multiple)
        pad_cols = _lr_padding(lr_cols, scale, self.pad_multiple)
        padded_lr = F.pad(lr_input, (0, pad_cols, 0, pad_rows), mode="replicate")
        padded_hr = F.pad(hr_input, (0, pad_cols * scale, 0, pad_rows * scale), mode="replicate")
        correction, fused = self.network.residual(padded_lr, padded_hr)
        correction = correction[..., :hr_rows, :hr_cols]
        if grid:
            # Back onto the bands, then onto the subspace (coefficients are Uᵀ·(x − mean)/ρ, and
            # the grid already holds x/ρ).
            from_grid = torch.einsum("nbk,nbg->nkg", stats["basis"][..., :k], stats["bands_from_grid"])
            correction = torch.einsum("nkg,nghw->nkhw", from_grid, correction)
        if frame is not None:
            correction = torch.einsum("nkj,njhw->nkhw", frame, correction)
        if step is not None:
            # Only what the MSI cannot see either: where the MSI measures, the base is already
            # close, and a learnt correction there lost (a grid student, 600 steps, on the 27
            # validation cases: −0.26 to −2.3 dB in 400–700 nm, +0.25 to +0.65 dB beyond 1000 nm).
            correction = torch.einsum("nkj,njhw->nkhw", msi_null_projector(step[0]), correction)
        return completed(invisible(predicted + correction)), fused


def normalised_msi(hr_msi: torch.Tensor, stats: Dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,M,H,W) MSI standardised with the scene's band means and deviations."""
    n = hr_msi.shape[0]
    return (hr_msi - stats["msi_mean"].view(n, -1, 1, 1)) / stats["msi_std"].view(n, -1, 1, 1)


def class_conditional_prediction(msi: torch.Tensor, image: torch.Tensor, stats: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The MSI-predicted coefficients (N,K,H,W) with the detail weights of each pixel's
    spectral classes (SceneStatistics.fit_detail_classes), or None when the statistics have no
    classes or the subspace is smaller than the classes' features.

    msi (N,M,H,W): standardised (:func:`normalised_msi`); image (N,K,H,W): the fused subspace
    image with the scene-wide weights, which decides each pixel's classes. A pixel belongs to
    class j with weight softmax_j(−‖x − centre_j‖² / (2·spread)) over its first D coefficients, so
    its weights change smoothly across a class boundary instead of jumping.
    """
    if "class_centres" not in stats:
        return None
    n, k = image.shape[:2]
    centres = stats["class_centres"]
    dims = centres.shape[-1]
    if k < dims:
        return None
    rows, cols = image.shape[-2:]
    points = image[:, :dims].reshape(n, dims, -1).transpose(1, 2)
    distance = torch.cdist(points, centres).square()
    membership = torch.softmax(-distance / (2 * stats["class_spread"].view(n, 1, 1)), dim=-1)
    weights = stats["class_weights"][:, :, :k]
    membership = membership.transpose(1, 2).reshape(n, -1, rows, cols)
    # Σ_j γ_j(x)·W_j·m(x), one class at a time: a (N,J,K,H,W) temporary would be J times the
    # subspace image.
    predicted = stats["regression"][:, :k, -1].view(n, k, 1, 1).expand(n, k, rows, cols).clone()
    for j in range(weights.shape[1]):
        predicted += membership[:, j : j + 1] * torch.einsum("nkm,nmhw->nkhw", weights[:, j], msi)
    return predicted


def spectral_consistency_gain(
    stats: Dict[str, torch.Tensor], k: int, degradation: SpatialDegradation, floor: float = SPECTRAL_CONSISTENCY_FLOOR
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(A (N,M,k), G (N,k,M)) of the spectral consistency step, or None when the statistics
    carry no MSI model (a scene too small for the detail fit).

    The MSI is a linear function of the scene's spectra (its SRFs), so the standardised MSI m is
    modelled as A·x + n in the first k subspace coefficients x, with A fitted at low resolution
    (A = Cov(m, c) / Var(c): the components are uncorrelated) and n what the subspace does not
    explain. At high resolution the fused image's MSI residual r = m − A·x is what the MSI says
    is still wrong; the step adds G·r, G = Σ·Aᵀ(A·Σ·Aᵀ + N)⁻¹, the linear MMSE gain under a
    prior Σ (the coefficients' high-pass covariance at low resolution) and a noise N: n's
    variance, which the PSF's averaging hid at low resolution (÷ Σh², the sum of the squared
    PSF weights: white noise's variance after the PSF), plus ``floor`` × the MSI detail's
    variance. The caller passes G·r through (I − P·D), so the step never contradicts the LR-HSI.
    Like the data term of HySure (Simões et al., IEEE TGRS 2015) and the Bayesian fusion of
    Hardie, Eismann & Wilson (IEEE TIP 2004), solved in closed form for a linear prior.
    """
    if "msi_coefficient_cov" not in stats:
        return None
    dtype = stats["msi_coefficient_cov"].dtype
    covariance = stats["msi_coefficient_cov"][..., :k].double()
    variance = stats["coefficient_variance"][..., :k].double()
    prior = stats["detail_covariance"][..., :k, :k].double()
    to_msi = covariance / variance[:, None, :]
    unexplained = (1.0 - (covariance.square() / variance[:, None, :]).sum(-1)).clamp_min(0.0)
    (wy, _), (wx, _) = degradation.kernel(0), degradation.kernel(1)
    averaging = float(np.square(wy).sum() * np.square(wx).sum())
    noise = torch.diag_embed(unexplained / averaging + floor * stats["msi_detail_variance"].double())
    prior_to_msi = prior @ to_msi.transpose(1, 2)
    innovation = to_msi @ prior_to_msi + noise
    innovation = innovation + 1e-9 * innovation.diagonal(dim1=1, dim2=2).mean(-1).view(-1, 1, 1) * torch.eye(
        innovation.shape[-1], dtype=innovation.dtype, device=innovation.device)
    gain = torch.linalg.solve(innovation, prior_to_msi.transpose(1, 2)).transpose(1, 2)
    return to_msi.to(dtype), gain.to(dtype)


def msi_null_projector(to_msi: torch.Tensor) -> torch.Tensor:
    """(N,K,K) orthogonal projector onto the subspace coefficients the MSI's linear model A
    (N,M,K) (:func:`spectral_consistency_gain`) cannot see: I − Aᵀ(A·Aᵀ)⁻¹A, so that A·(P·x) = 0.
    A correction passed through it leaves the fused image's simulated MSI as it was. A tiny
    ridge keeps A·Aᵀ invertible when MSI bands are nearly collinear in the subspace."""
    a = to_msi.double()
    gram = a @ a.transpose(1, 2)
    gram = gram + 1e-9 * gram.diagonal(dim1=1, dim2=2).mean(-1).view(-1, 1, 1) * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    projector = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device) - a.transpose(1, 2) @ torch.linalg.solve(gram, a)
    return projector.to(to_msi.dtype)


def compose_spectrum(
    lr_hsi: torch.Tensor, detail: torch.Tensor, stats: Dict[str, torch.Tensor], window: Optional[Tuple[int, int]] = None,
    scale: Optional[int] = None,
) -> torch.Tensor:
    """bicubic(LR-HSI) + ρ·U·detail: (N,B,h,w) and (N,K,s·h,s·w) → (N,B,s·h,s·w).

    ``window`` = (row, col): the detail (N,K,rows,cols) covers only that part of the HR grid
    (``scale`` s then required), and only that part of the spectra is computed. Everything of
    the LR-HSI outside the subspace is kept as bicubic upsampling. Bicubic interpolation at an
    integer scale reaches 2 LR pixels (3 with an offset), so a window of the LR-HSI with that
    much margin gives exactly the whole image's values inside it.
    """
    if window is None:
        scale = detail.shape[-2] // lr_hsi.shape[-2]
        hr_window = None
    else:
        if scale is None:
            raise ValueError("compose_spectrum needs the scale when the detail covers a window")
        hr_window = (window[0], window[1]) + tuple(detail.shape[-2:])
    n, k = detail.shape[:2]
    spectra = upsample_lr(lr_hsi, scene_degradation(stats, scale), "bicubic", hr_window)
    # Added in place, as one batched product: the spectra of a 224-band 256² block are 59 MB,
    # and every temporary of that size costs its page faults again (a 512² scene spent 2.3 s
    # of system time, most of it there).
    weighted = stats["basis"][..., :k] * stats["scale"].view(-1, 1, 1)
    spectra.view(n, spectra.shape[1], -1).baddbmm_(weighted, detail.reshape(n, k, -1))
    return spectra


def _lr_padding(lr_size: int, scale: int, multiple: int) -> int:
    pad = 0
    while ((lr_size + pad) * scale) % multiple:
        pad += 1
    return pad
