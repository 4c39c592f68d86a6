"""Everything ``make train`` reads, in memory or packed into one compact file.

A :class:`TrainingSet` holds the training cubes, the validation cubes and the multispectral
sensors (SRFs) that training simulates MSIs with. :func:`load_training_set` reads it from the
shared data folder (GeoTIFF, ENVI and MATLAB files, which need rasterio and SciPy);
:func:`write_pack` stores it in one ``.npz`` file that :func:`read_pack` reads back with
NumPy alone. The pack is what travels to a machine with an accelerator for a long run:
the shared data folder does not travel and that machine has no GDAL.

Why quantised: the cubes as float16 with NumPy's deflate take 103 MiB (EO cubes alone 52 MiB),
too much to send with the project to a machine for one run. Each band is quantised to a
uniform step set by a target PSNR against that band's peak (default
:data:`DEFAULT_PACK_PSNR_DB` = 60 dB, where fusion's own errors are 30–45 dB, so the packing
error is at most 0.3 % of the error power training reduces), and the codes are stored as
differences between neighbouring bands, which deflate compresses twice as well (measured on
the 30 cubes: 60 dB, EO cubes 33.1 MiB as codes, 16.9 MiB as band differences; laboratory
cubes 23.3 and 13.6 MiB).

    python -m csakd_qgis.training_set build/train/training_set.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .datasets import HyperspectralCube
from .srf import SensorResponse

DEFAULT_PACK_PSNR_DB = 60.0
PACK_FORMAT = "csakd-training-set"
PACK_VERSION = 1


@dataclass
class TrainingSet:
    """The data of one training run (``make train``).

    ``training``: cubes training crops are cut from (the five training cubes, then the corpus);
    ``validation``: cubes the validation cases are made from, never trained on;
    ``sensors``: the SRFs training draws MSIs from (:func:`datasets.training_sensors`);
    ``validation_sensors``: label → SRF of the validation cases (:func:`datasets.validation_sensors`);
    ``source``: where it was read from, for the model card.
    """

    training: List[HyperspectralCube]
    validation: List[HyperspectralCube]
    sensors: List[SensorResponse]
    validation_sensors: Dict[str, SensorResponse]
    source: str = "the shared data folder"


def load_training_set(data_dir=None, corpus: bool = True) -> TrainingSet:
    """The training set from the shared data folder (``data_dir``, default ``../shared/data``):
    :func:`datasets.training_cubes` plus :func:`datasets.corpus_cubes` when ``corpus``, the
    validation cubes and every sensor. Raises FileNotFoundError when a file is missing."""
    from .datasets import corpus_cubes, training_cubes, training_sensors, validation_cubes, validation_sensors

    return TrainingSet(
        training_cubes(data_dir) + (corpus_cubes(data_dir) if corpus else []),
        validation_cubes(data_dir),
        training_sensors(),
        validation_sensors(),
        str(data_dir) if data_dir else "the shared data folder",
    )


def quantise(data: np.ndarray, psnr_db: float):
    """Per-band uniform quantisation of a (B, H, W) cube.

    Band b's step is Δ_b = peak_b · 10^(−psnr_db/20) · √12, peak_b = max |x_b|: uniform rounding
    error has RMS Δ/√12, so each band's PSNR against its peak is about ``psnr_db`` (higher where
    the data itself sits on a coarser grid). Returns (codes (B, H, W) int16 as differences along
    the band axis, steps (B,) float64). Raises ValueError for non-finite values or a
    ``psnr_db`` whose codes would not fit 16 bits (above 90 dB).
    """
    if not 20.0 <= psnr_db <= 90.0:
        raise ValueError(f"the packing PSNR must be between 20 and 90 dB, got {psnr_db}")
    data = np.asarray(data, dtype=np.float64)
    if not np.isfinite(data).all():
        raise ValueError("the cube has NaN or infinite values; bad bands must be removed before packing")
    peak = np.abs(data).max(axis=(1, 2))
    steps = np.where(peak > 0, peak, 1.0) * 10.0 ** (-psnr_db / 20.0) * np.sqrt(12.0)
    codes = np.rint(data / steps[:, None, None]).astype(np.int32)
    # Neighbouring bands differ by far less than they measure: their differences deflate to half.
    return np.diff(codes, axis=0, prepend=0).astype(np.int16), steps


def dequantise(codes: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The (B, H, W) float32 cube of :func:`quantise`'s band differences and steps."""
    return (np.cumsum(codes.astype(np.int32), axis=0) * steps[:, None, None]).astype(np.float32)


def band_psnr(reference: np.ndarray, approximation: np.ndarray) -> np.ndarray:
    """(B,) PSNR in dB of each band of ``approximation`` against ``reference``'s peak (inf where
    they are equal)."""
    reference = np.asarray(reference, dtype=np.float64)
    error = np.sqrt(((np.asarray(approximation, dtype=np.float64) - reference) ** 2).mean(axis=(1, 2)))
    peak = np.abs(reference).max(axis=(1, 2))
    with np.errstate(divide="ignore"):
        return 20.0 * np.log10(np.where(error > 0, peak / np.maximum(error, 1e-300), np.inf))


def write_pack(training_set: TrainingSet, path: Union[str, Path], psnr_db: float = DEFAULT_PACK_PSNR_DB) -> Dict:
    """Write ``training_set`` to one compressed ``.npz`` file (quantised as :func:`quantise`).

    The file is written beside ``path`` first and renamed into place, so an interrupted write
    never leaves a half-written pack. Returns the manifest stored with it: format, version,
    ``psnr_db``, and per cube its name, role, shape, weight and the measured worst band PSNR
    of the packed values. Raises ValueError as :func:`quantise` does, files.OutputError when
    the file cannot be written.
    """
    from .files import atomic_output

    arrays: Dict[str, np.ndarray] = {}
    cubes_manifest = []
    roles = [("training", c) for c in training_set.training] + [("validation", c) for c in training_set.validation]
    for index, (role, cube) in enumerate(roles):
        codes, steps = quantise(cube.data, psnr_db)
        arrays[f"cube{index}_codes"] = codes
        arrays[f"cube{index}_steps"] = steps
        if cube.wavelengths_nm is not None:
            arrays[f"cube{index}_wavelengths"] = np.asarray(cube.wavelengths_nm, dtype=np.float64)
        worst = float(band_psnr(cube.data, dequantise(codes, steps)).min())
        cubes_manifest.append({"name": cube.name, "role": role, "shape": list(cube.data.shape),
                               "weight": cube.weight, "worst_band_psnr_db": round(worst, 2)})
    sensors_manifest = []
    named = [(None, s) for s in training_set.sensors] + list(training_set.validation_sensors.items())
    for index, (label, sensor) in enumerate(named):
        arrays[f"sensor{index}_wavelengths"] = sensor.wavelengths_nm
        arrays[f"sensor{index}_responses"] = sensor.responses
        sensors_manifest.append({"name": sensor.name, "bands": sensor.band_names, "note": sensor.note,
                                 "validation_label": label})
    manifest = {"format": PACK_FORMAT, "version": PACK_VERSION, "psnr_db": psnr_db,
                "source": training_set.source, "cubes": cubes_manifest, "sensors": sensors_manifest}
    arrays["manifest"] = np.array(json.dumps(manifest))

    with atomic_output(Path(path)) as temporary, open(temporary, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return manifest


def read_pack(path: Union[str, Path]) -> TrainingSet:
    """The :class:`TrainingSet` stored by :func:`write_pack`, with NumPy alone.
    Raises FileNotFoundError when ``path`` is missing and ValueError when it is not a pack
    of this format and version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training-set pack at {path}; write one with `python -m csakd_qgis.training_set {path}`")
    with np.load(path, allow_pickle=False) as pack:
        try:
            manifest = json.loads(str(pack["manifest"]))
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path} is not a training-set pack (no readable manifest: {error})") from None
        if manifest.get("format") != PACK_FORMAT or manifest.get("version") != PACK_VERSION:
            raise ValueError(
                f"{path} is a pack of format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                f"this code reads {PACK_FORMAT!r} version {PACK_VERSION}: write it again"
            )
        roles: Dict[str, List[HyperspectralCube]] = {"training": [], "validation": []}
        for index, entry in enumerate(manifest["cubes"]):
            key = f"cube{index}_wavelengths"
            wavelengths = pack[key] if key in pack.files else None
            data = dequantise(pack[f"cube{index}_codes"], pack[f"cube{index}_steps"])
            roles[entry["role"]].append(HyperspectralCube(entry["name"], data, wavelengths, entry["weight"]))
        sensors, validation_sensors = [], {}
        for index, entry in enumerate(manifest["sensors"]):
            sensor = SensorResponse(entry["name"], entry["bands"], pack[f"sensor{index}_wavelengths"],
                                    pack[f"sensor{index}_responses"], entry["note"])
            if entry["validation_label"] is None:
                sensors.append(sensor)
            else:
                validation_sensors[entry["validation_label"]] = sensor
    return TrainingSet(roles["training"], roles["validation"], sensors, validation_sensors,
                       f"the pack {path.name} ({manifest['psnr_db']:g} dB, from {manifest['source']})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the .npz file to write (replaced atomically)")
    parser.add_argument("--data", default=None, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--psnr-db", type=float, default=DEFAULT_PACK_PSNR_DB,
                        help=f"each band's PSNR after packing, against its peak (20–90; default {DEFAULT_PACK_PSNR_DB:g})")
    parser.add_argument("--no-corpus", dest="corpus", action="store_false", help="leave the shared corpus out")
    args = parser.parse_args(argv)
    if not 20.0 <= args.psnr_db <= 90.0:  # before the data is read (15 s)
        parser.error(f"--psnr-db must be between 20 and 90 dB, got {args.psnr_db:g}")
    try:
        manifest = write_pack(load_training_set(args.data, args.corpus), args.output, args.psnr_db)
    except (OSError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    size = Path(args.output).stat().st_size
    worst = min(manifest["cubes"], key=lambda c: c["worst_band_psnr_db"])
    print(f"wrote {args.output}: {len(manifest['cubes'])} cubes, {len(manifest['sensors'])} sensors, "
          f"{size / 2**20:.1f} MiB; worst band {worst['worst_band_psnr_db']:.1f} dB ({worst['name']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
