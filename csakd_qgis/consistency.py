"""Quality of a fusion on a real pair, where no high-resolution reference exists (protocol.md §2).

* spectral consistency: the fused image averaged back onto the LR-HSI's grid, against the LR-HSI;
* spatial consistency: the fused image mapped to the MSI's bands by a linear regression fitted at
  low resolution (LR-HSI → MSI averaged onto the LR grid), against the HR-MSI.

Both are reported for the fused image and for bicubic upsampling of the LR-HSI onto the same
grid (perfectly spectrally consistent, spatially poor), so neither number is read alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .transforms import compose


@dataclass
class Consistency:
    spectral_relative_rmse: float  # RMSE(degraded fused, LR-HSI) / mean(LR-HSI)
    spectral_sam: float  # degrees
    spatial_psnr: float  # MSI predicted from the image vs the real MSI, dB (per-band peak)
    spatial_highpass_correlation: float  # correlation of their high-pass parts


@dataclass
class ConsistencyReport:
    fused: Consistency
    bicubic: Consistency
    # Relative RMSE against the LR-HSI on the working grid of the images degraded with the PSF
    # the fusion estimated (stored in the output's metadata); None when the output has none.
    psf_fused: Optional[float] = None
    psf_bicubic: Optional[float] = None

    def table(self, pair: str = "the pair") -> str:
        """The numbers as a text table headed with the name of the ``pair`` they were measured on."""
        rows = [
            f"consistency on {pair}",
            "                                   fused   bicubic",
            f"spectral: relative RMSE vs LR-HSI  {self.fused.spectral_relative_rmse:7.4f}   {self.bicubic.spectral_relative_rmse:7.4f}",
            f"spectral: SAM vs LR-HSI (°)        {self.fused.spectral_sam:7.3f}   {self.bicubic.spectral_sam:7.3f}",
            f"spatial: PSNR vs HR-MSI (dB)       {self.fused.spatial_psnr:7.2f}   {self.bicubic.spatial_psnr:7.2f}",
            f"spatial: high-pass correlation     {self.fused.spatial_highpass_correlation:7.4f}   {self.bicubic.spatial_highpass_correlation:7.4f}",
        ]
        if self.psf_fused is not None:
            rows.insert(3, f"spectral, estimated PSF: rel. RMSE {self.psf_fused:7.4f}   {self.psf_bicubic:7.4f}")
        return "\n".join(rows)


def _read_on_grid(path, crs, transform, width, height, resampling, indexes=None) -> np.ndarray:
    import rasterio
    from rasterio.vrt import WarpedVRT

    from .georaster import read_as_float

    with rasterio.open(path) as dataset, WarpedVRT(
        dataset, crs=crs, transform=transform, width=width, height=height, resampling=resampling,
        src_nodata=dataset.nodata, nodata=dataset.nodata if dataset.nodata is not None else -3.4e38,
    ) as vrt:
        return read_as_float(vrt, indexes=indexes)


def _highpass(image: np.ndarray) -> np.ndarray:
    from scipy.ndimage import uniform_filter

    return image - uniform_filter(image, size=(1, 5, 5), mode="nearest")


def _measure(image_hr, image_lr, lr_hsi, msi_hr, regression, valid_hr, valid_lr) -> Consistency:
    from .metrics import psnr, sam

    difference = (image_lr - lr_hsi)[:, valid_lr]
    relative_rmse = float(np.sqrt(np.mean(difference**2)) / np.mean(np.abs(lr_hsi[:, valid_lr])))
    spectral_angle = sam(lr_hsi, image_lr, valid=valid_lr)
    bands = image_hr.shape[0]
    flat = image_hr.reshape(bands, -1)
    predicted = (regression[:, :-1] @ flat + regression[:, -1:]).reshape(msi_hr.shape)
    spatial_psnr = psnr(msi_hr, predicted, valid=valid_hr)
    a, b = _highpass(predicted)[:, valid_hr], _highpass(msi_hr)[:, valid_hr]
    correlation = float(np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)]))
    return Consistency(relative_rmse, spectral_angle, spatial_psnr, correlation)


def consistency_report(lr_path: Path, hr_path: Path, fused_path: Path, ridge: float = 1e-3) -> ConsistencyReport:
    """Both consistencies of ``fused_path`` and of bicubic upsampling, on the fused grid."""
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(fused_path) as fused_ds:
        crs, transform, width, height = fused_ds.crs, fused_ds.transform, fused_ds.width, fused_ds.height
        good = [i + 1 for i in range(fused_ds.count) if fused_ds.tags(i + 1).get("bbl", "1") != "0"]
    with rasterio.open(lr_path) as lr_ds:
        lr_transform = compose(transform, transform.scale(lr_ds.transform.a / transform.a, lr_ds.transform.e / transform.e))
        lr_width = int(width * transform.a / lr_ds.transform.a)
        lr_height = int(height * transform.e / lr_ds.transform.e)
    fused = _read_on_grid(fused_path, crs, transform, width, height, Resampling.nearest, good)
    bicubic = _read_on_grid(lr_path, crs, transform, width, height, Resampling.cubic, good)
    msi = _read_on_grid(hr_path, crs, transform, width, height, Resampling.nearest)
    lr_hsi = _read_on_grid(lr_path, crs, lr_transform, lr_width, lr_height, Resampling.nearest, good)
    fused_lr = _read_on_grid(fused_path, crs, lr_transform, lr_width, lr_height, Resampling.average, good)
    bicubic_lr = _read_on_grid(lr_path, crs, transform, width, height, Resampling.cubic, good)
    msi_lr = _read_on_grid(hr_path, crs, lr_transform, lr_width, lr_height, Resampling.average)
    # The bicubic image, degraded the same way as the fused one.
    import tempfile

    import rasterio as rio

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bicubic.tif"
        with rio.open(path, "w", driver="GTiff", width=width, height=height, count=len(good), dtype="float32",
                      crs=crs, transform=transform, nodata=np.nan) as dst:
            dst.write(bicubic_lr)
        bicubic_lr = _read_on_grid(path, crs, lr_transform, lr_width, lr_height, Resampling.average)

    valid_lr = np.isfinite(lr_hsi).all(0) & np.isfinite(fused_lr).all(0) & np.isfinite(bicubic_lr).all(0) & np.isfinite(msi_lr).all(0)
    valid_hr = np.isfinite(fused).all(0) & np.isfinite(bicubic).all(0) & np.isfinite(msi).all(0)
    design = np.concatenate([lr_hsi[:, valid_lr], np.ones((1, int(valid_lr.sum())))])
    target = msi_lr[:, valid_lr]
    scale = np.abs(design).mean(1, keepdims=True) + 1e-12
    gram = (design / scale) @ (design / scale).T
    gram += ridge * np.trace(gram) / gram.shape[0] * np.eye(gram.shape[0])
    coefficients = np.linalg.solve(gram, (design / scale) @ target.T).T / scale.T
    fused_c = np.nan_to_num(fused)
    bicubic_c = np.nan_to_num(bicubic)
    psf = psf_consistency(lr_path, fused_path, good)
    return ConsistencyReport(
        _measure(fused_c, fused_lr, lr_hsi, msi, coefficients, valid_hr, valid_lr),
        _measure(bicubic_c, bicubic_lr, lr_hsi, msi, coefficients, valid_hr, valid_lr),
        *(psf if psf is not None else (None, None)),
    )


def psf_consistency(lr_path: Path, fused_path: Path, bands) -> Optional[Tuple[float, float]]:
    """(fused, bicubic) relative RMSE against the LR-HSI on the fusion's working grid, each
    image degraded with the spatial degradation the fusion used (the output's CSAKD_PSF
    metadata, psf.SpatialDegradation). None when the output does not record it.

    This is the consistency the fusion promises: its output, blurred as the sensor blurs,
    gives back the LR-HSI (box-averaging, the other measure, assumes a box PSF)."""
    import json

    import rasterio
    import torch
    from rasterio.enums import Resampling

    from affine import Affine

    from .interpolation import upsample_lr
    from .psf import SpatialDegradation, degrade
    from .transforms import compose

    with rasterio.open(fused_path) as fused_ds:
        recorded = fused_ds.tags().get("CSAKD_PSF")
        crs, transform, width, height = fused_ds.crs, fused_ds.transform, fused_ds.width, fused_ds.height
    if not recorded:
        return None
    degradation = SpatialDegradation(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in json.loads(recorded).items()})
    s = degradation.scale
    rows, cols = height // s, width // s
    fused = _read_on_grid(fused_path, crs, transform, cols * s, rows * s, Resampling.nearest, bands)
    lr = _read_on_grid(lr_path, crs, compose(transform, Affine.scale(s)), cols, rows, Resampling.average, bands)
    valid = np.isfinite(lr).all(0)
    lr_filled = np.where(np.isfinite(lr), lr, np.nanmean(lr, axis=(1, 2), keepdims=True)).astype(np.float32)
    bicubic = upsample_lr(torch.from_numpy(lr_filled)[None], degradation, "bicubic")[0].numpy()
    degraded_fused = degrade(np.nan_to_num(fused).astype(np.float32), degradation)
    degraded_bicubic = degrade(bicubic.astype(np.float32), degradation)
    # Two LR pixels in from the edges: the output is mirrored there, the LR-HSI is not.
    inner = np.zeros_like(valid)
    inner[2:-2, 2:-2] = True
    valid &= inner & np.isfinite(fused).all(0)[: rows * s : s, : cols * s : s]
    norm = np.mean(np.abs(lr[:, valid]))

    def relative(image):
        return float(np.sqrt(np.mean((image[:, valid] - lr[:, valid]) ** 2)) / norm)

    return relative(degraded_fused), relative(degraded_bicubic)
