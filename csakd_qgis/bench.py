"""`make bench`: size, speed, memory and quality, side by side, from one run.

1. Network size and cost: the paper's teacher and student (172 bands, 4-band MSI, ×4) beside
   the bundled teacher and student and the full-resolution student (the layout whose
   correction carries to unseen scenes, README 'The layout that carries') — parameters, MACs
   per 256×256 output tile, and measured forward time per tile on this machine.
2. Quality on the validation cubes (Wald protocol, never trained on): bicubic, GSA, the
   bundled teacher and student, per case and on average.
3. End-to-end fusion of a 224-band scene to 512×512 and 2048×2048 outputs against
   `gdalwarp -r cubic` writing the same grid with the same creation options: time, ratio,
   peak memory (each run in its own process), on the idle machine and again beside busy
   processes (a desktop doing other work), with the torch thread count the fusion chose.
4. Batch throughput: scenes per hour for 4 equal scenes on a Dask LocalCluster of 1 and of 2
   single-threaded workers (`python -m csakd_qgis.bench --throughput-only` runs this alone).

Also: what the networks add over their untrained base against CNMF and HySure, realistic PSFs,
noisy and misregistered inputs, the scene correction on and off (on the validation cubes and on
cubes held out from every choice it makes), scene adaptation, and distillation within one
scene (the teacher, the distilled student and the student trained without the teacher).

Results are printed and saved to build/bench/results.json and results.md; each section's as it
ends in results.partial.json, which replaces the results only once every section is done, so a
stopped run keeps what it measured. ``--only SECTION …`` runs sections alone, into
results-<sections>.json (and .partial.json, .md) beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "build" / "bench" / "results.json"
CACHE = ROOT / "build" / "bench" / "cache"
PAPER = {
    "paper teacher": {"params_m": 26.8, "gmacs": 942, "seconds": 9.8},
    "paper student": {"params_m": 7.44, "gmacs": 145, "seconds": 1.77},
}


def _feed(digest, part) -> None:
    if isinstance(part, np.ndarray):
        a = np.ascontiguousarray(part)
        digest.update(f"ndarray {a.dtype.str} {a.shape}".encode())
        digest.update(a.tobytes())
    elif isinstance(part, dict):
        digest.update(b"dict")
        for key in sorted(part, key=repr):
            _feed(digest, key)
            _feed(digest, part[key])
    elif isinstance(part, (list, tuple)):
        digest.update(f"seq {len(part)}".encode())
        for item in part:
            _feed(digest, item)
    else:
        digest.update(f"{type(part).__name__} {part!r}".encode())
    digest.update(b";")


def cached(key_parts: Sequence, compute: Callable[[], np.ndarray], folder: Path = CACHE) -> np.ndarray:
    """``compute()``'s array, stored under ``folder`` and reused while ``key_parts`` are unchanged.

    For the slow baselines (CNMF, HySure): key_parts name everything the result depends on —
    the method and its version, its parameters and its input arrays (hashed by dtype, shape
    and bytes; dicts by sorted keys; other values by repr). The file is
    ``<sha256 of the key>.npy``, written to a temporary name and renamed, so an interrupted
    run never leaves a truncated entry. Delete the folder to recompute everything.
    """
    digest = hashlib.sha256()
    _feed(digest, list(key_parts))
    path = Path(folder) / f"{digest.hexdigest()}.npy"
    if path.is_file():
        return np.load(path)
    result = np.asarray(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")
    np.save(partial, result)
    os.replace(partial, path)
    return result


def _time_forward(run, repeats: int) -> float:
    run()  # warm-up: the first call builds the convolution kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


FULL_RESOLUTION_STUDENT = "full-resolution student"


def network_costs(repeats: int) -> List[Dict]:
    import torch

    from .api import load_model
    from .bundle import default_model_path
    from .model import SceneStatistics, SubspaceFusionModel
    from .network import CSAKDNet, count_macs, count_parameters, paper_student_config, paper_teacher_config
    from .synthetic import signature_mixture
    from .train import student_config

    torch.set_flush_denormal(True)
    rows = []
    lr_shape, hr_shape = (1, 172, 64, 64), (1, 4, 256, 256)
    for name, config in (("paper teacher", paper_teacher_config()), ("paper student", paper_student_config())):
        net = CSAKDNet(config).eval()
        lr, hr = torch.randn(lr_shape), torch.randn(hr_shape)
        with torch.inference_mode():
            seconds = _time_forward(lambda: net(lr, hr), 1 if "teacher" in name else max(1, repeats // 2))
        rows.append({"model": name, "params": count_parameters(net), "macs": count_macs(net, lr_shape, hr_shape),
                     "seconds": seconds, "note": "172-band input, 4-band MSI"})
    rng = np.random.default_rng(0)
    # Spectra of 40 random signatures (uniform noise would have no component above its noise,
    # model.signal_subspace_dimension, and the timed subspace would be all zeros).
    lr_np = signature_mixture(rng, 172, 40, 64, 64).astype(np.float32)
    hr_np = rng.random((4, 256, 256), dtype=np.float32)
    models = {f"bundled {role}": load_model(default_model_path().with_name(f"csakd_{role}.json"), "cpu")[0]
              for role in ("teacher", "student")}
    # The layout in which the student's correction carried to unseen scenes (README, 'The layout
    # that carries'): the paper's full resolution, 16 features, the aligned frame. Untrained: its
    # cost does not depend on its weights.
    models[FULL_RESOLUTION_STUDENT] = SubspaceFusionModel(student_config(representation="aligned", unshuffle=1, width=16)).eval()
    for name, model in models.items():
        k = model.config.subspace_dim
        # Band centres spread over the grid's range, so that a model on the wavelength grid runs
        # its network (without them it is the base); a subspace model does not read them.
        stats = SceneStatistics.estimate(lr_np, hr_np[:, ::4, ::4], k).set_wavelengths(np.linspace(420.0, 2450.0, 172))
        stats = stats.to_tensors()
        lr, hr = torch.from_numpy(lr_np)[None], torch.from_numpy(hr_np)[None]
        # The network's cost, even while its correction is zero (fusion then skips it); the
        # loaded model is shared (cached), so the switch is put back.
        model.skip_zero_correction = False
        try:
            with torch.inference_mode():
                seconds = _time_forward(lambda: model(lr, hr, stats), repeats)
        finally:
            model.skip_zero_correction = True
        c = model.config.channels  # the network's channels: K, or the wavelength grid's points
        rows.append({"model": name, "params": count_parameters(model),
                     "macs": count_macs(model.network, (1, c, 64, 64), (1, c, 256, 256)), "seconds": seconds,
                     "note": "same 172-band tile, incl. subspace projection and full-spectrum output"})
    return rows


def quality(data_dir=None) -> Dict:
    from .api import fuse_case, load_model
    from .bundle import default_model_path
    from .datasets import validation_cases
    from .train import baseline_metrics, summarise, _metrics

    cases = validation_cases(data_dir)
    table = baseline_metrics(cases)
    for role in ("teacher", "student"):
        model, _ = load_model(default_model_path().with_name(f"csakd_{role}.json"), "cpu")
        table[role] = [_metrics(c, fuse_case(c, model=model)) for c in cases]
    return {"cases": table, "summary": {name: summarise(rows) for name, rows in table.items()}}


ADAPTATION_BUDGETS = (0.0, 1.0, 3.0)
ADAPTATION_SCALES = (2, 3)


def adaptation(budgets=ADAPTATION_BUDGETS, data_dir=None) -> Dict:
    """Scene adaptation (ADAPT_MINUTES) at each budget in ``budgets`` on Wald cases with a known
    truth (every validation cube, Sentinel-2 10 m, scales 2 and 3: at 4 two of the three cubes
    are too small to set a reduced pair aside for training), fused as users fuse: the gain
    the adaptation measured on the scene's own reduced pair, and the PSNR/SAM the fused image
    reaches at full resolution against the truth."""
    from .api import fuse_case, load_model
    from .bundle import default_model_path
    from .datasets import make_wald_case, validation_cubes, validation_sensors
    from .train import _metrics

    student, _ = load_model(default_model_path(), "cpu")
    sensor = validation_sensors()["Sentinel-2 10 m"]
    rows = []
    for cube in validation_cubes(data_dir):
        for scale in ADAPTATION_SCALES:
            case = make_wald_case(cube, sensor, scale)
            row = {"cube": cube.name, "scale": scale}
            for minutes in budgets:
                said = []
                # Adaptation alone: the scene correction (measured by scene_correction_gain) left out.
                fused = fuse_case(case, model=student, adapt_minutes=minutes, log=said.append, scene_correction=False)
                row[f"{minutes:g} min"] = dict(_metrics(case, fused), log=next((m for m in said if "adaptation" in m), ""))
            rows.append(row)
            print(f"  {cube.name} ×{scale}: " + ", ".join(f"{b:g} min {row[f'{b:g} min']['psnr']:.2f} dB" for b in budgets), flush=True)
    return {"budgets": [f"{b:g} min" for b in budgets], "cases": rows}


# The label of the Wald protocol's Gaussian among the scene correction's PSFs (results written
# before the PSF was recorded were all made with it).
WALD_PSF = "Wald's Gaussian"
# Scales at which the scene correction is measured on the validation cubes and the corpus's
# airborne cubes, where fusion can check it (scene_correction.reduction_for): at ×2 all but the
# Salton Sea subset (25×28 HSI pixels), at ×3 AVIRIS Jasper Ridge and fourteen of the corpus,
# reduced ×2 (all too small for ×3).
SCENE_CORRECTION_SCALES = (2, 3)
# The corpus's laboratory scenes (512²): checked at their own scale at ×3 and ×4, reduced ×2 at ×8.
LABORATORY_SCALES = (3, 4, 8)


def scene_correction_cases(data_dir=None) -> List[Dict]:
    """The Wald cases the scene correction is measured on, as {"set", "psf", "case"} dicts.

    "validation": the validation cubes at :data:`SCENE_CORRECTION_SCALES` under Wald's PSF and
    every realistic PSF variant (datasets.validation_psfs), with every validation MSI.
    "held out": the training corpus (datasets.corpus_cubes), on which the scene correction's
    threshold was not chosen (its fits' budget and step and number of networks were compared
    on quarters of these cases, beside validation ones): its Earth-observation cubes at
    :data:`SCENE_CORRECTION_SCALES` under the same PSFs, with Sentinel-2 10 m and WorldView-2
    (and RGB under Wald's PSF) where band centres are known and one band-group MSI per cube
    (datasets.band_group_response, seeded by the cube's name) where they are not; its
    laboratory scenes at :data:`LABORATORY_SCALES` under Wald's PSF and box aggregation with
    RGB. Cubes too small to check the correction at a scale (scene_correction.reduction_for,
    as fusion decides) are left out there."""
    import zlib

    from .datasets import (LABORATORY_WEIGHT, band_group_response, corpus_cubes, make_wald_case, validation_cubes,
                           validation_psfs, validation_sensors)
    from .psf import wald
    from .scene_correction import reduction_for

    sensors = validation_sensors()
    found = []

    def add(set_name, cube, scale, psfs, msis):
        for psf_name, psf in psfs.items():
            for label, sensor, response in msis(psf_name):
                case = make_wald_case(cube, sensor, scale, psf=psf, response=response)
                case.sensor = label
                found.append({"set": set_name, "psf": psf_name, "case": case})

    def every_psf(scale):
        return {WALD_PSF: wald(scale), **validation_psfs(scale)}

    def too_small(cube, scale):
        return reduction_for(scale, tuple(n // scale for n in cube.data.shape[1:])) is None

    for cube in validation_cubes(data_dir):
        for scale in SCENE_CORRECTION_SCALES:
            if not too_small(cube, scale):
                add("validation", cube, scale, every_psf(scale), lambda _: [(k, v, None) for k, v in sensors.items()])
    for cube in corpus_cubes(data_dir):
        laboratory = cube.weight == LABORATORY_WEIGHT
        for scale in LABORATORY_SCALES if laboratory else SCENE_CORRECTION_SCALES:
            if too_small(cube, scale):
                continue
            psfs = every_psf(scale)
            if laboratory:
                add("held out", cube, scale, {k: psfs[k] for k in (WALD_PSF, "box")}, lambda _: [("RGB", sensors["RGB"], None)])
            elif cube.wavelengths_nm is None:
                response, label = band_group_response(cube.data.shape[0], np.random.default_rng(zlib.crc32(cube.name.encode())))
                add("held out", cube, scale, psfs, lambda _: [(label, "band groups", response)])
            else:
                add("held out", cube, scale, psfs, lambda psf_name: [
                    (k, v, None) for k, v in sensors.items() if k != "RGB" or psf_name == WALD_PSF])
    return found


def scene_correction_gain(data_dir=None) -> Dict:
    """The scene correction (scene_correction.py) on Wald cases with a known truth where the
    cubes are large enough to check it (:func:`scene_correction_cases`), fused as users fuse
    (PSF estimated) with and without it: PSNR/SAM against the truth, and what the log said."""
    from .api import fuse_case, load_model
    from .bundle import default_model_path
    from .train import _metrics

    student, _ = load_model(default_model_path(), "cpu")
    rows = []
    for item in scene_correction_cases(data_dir):
        case, said = item["case"], []
        row = {"set": item["set"], "psf": item["psf"], "cube": case.cube, "sensor": case.sensor, "scale": case.scale,
               "off": _metrics(case, fuse_case(case, model=student, scene_correction=False)),
               "on": _metrics(case, fuse_case(case, model=student, scene_correction=True, log=said.append))}
        row["log"] = next((m for m in reversed(said) if m.startswith("scene correction:")), "")
        rows.append(row)
        print(f"  {item['set']}: {case.cube} ×{case.scale} {item['psf']} {case.sensor}: off {row['off']['psnr']:.2f}, "
              f"on {row['on']['psnr']:.2f} dB", flush=True)
    return {"cases": rows}


def scene_correction_lines(result: Dict) -> List[str]:
    """One line per set of :func:`scene_correction_gain`'s cases, then one per scale and one per
    PSF within a set that holds more than one."""
    lines = []
    for set_name in dict.fromkeys(r.get("set", "validation") for r in result["cases"]):
        rows = [r for r in result["cases"] if r.get("set", "validation") == set_name]
        groups = {"": rows}
        for kind, key in (("scale", lambda r: r["scale"]), ("PSF", lambda r: r.get("psf", WALD_PSF))):
            values = list(dict.fromkeys(key(r) for r in rows))
            if len(values) > 1:
                for value in values:
                    groups[(kind, value)] = [r for r in rows if key(r) == value]
        for label, group in groups.items():
            gain = np.array([r["on"]["psnr"] - r["off"]["psnr"] for r in group])
            sam = np.array([r["on"]["sam"] - r["off"]["sam"] for r in group])
            applied = sum(r["log"].startswith("scene correction: applied") for r in group)
            scales = "/".join(map(str, sorted({r["scale"] for r in group})))
            psf = f", PSF {label[1]}" if label and label[0] == "PSF" else ""
            what = f"{set_name}, {len(group)} ×{scales} Wald cases{psf}"
            lines.append(f"{'  ' if label else ''}scene correction on {what}: applied on {applied}; full-resolution "
                         f"PSNR {gain.mean():+.2f} dB on average against without, better on {int(np.sum(gain > 0.005))}, "
                         f"worse on {int(np.sum(gain < -0.005))}, worst {gain.min():+.2f} dB; SAM {sam.mean():+.3f}° on average")
    return lines


# Distillation where the students learn: within one large laboratory scene (no Earth-observation
# cube here has the pixels, README 'Where it stands'), the learnability probe's within-scene
# setting, the distilled student given the held-out part's inputs as its transfer set.
DISTILLATION_SCENE = "cave_feathers"
DISTILLATION_SENSOR = "RGB"
DISTILLATION_SCALE = 4
DISTILLATION_STEPS = 1000
DISTILLATION_EVERY = 250


def distillation(data_dir=None, steps: int = DISTILLATION_STEPS) -> Dict:
    """Online distillation (the paper's co-training) with a transfer set (Hinton et al. 2015),
    measured where training moves the students: the learnability probe (learnability.probe) on the top
    three quarters of :data:`DISTILLATION_SCENE` (its MSI :data:`DISTILLATION_SENSOR`, scale
    :data:`DISTILLATION_SCALE`, 64-pixel crops, 1e-4), measured on its bottom quarter. The
    student without the teacher (the control), the student co-trained with the teacher and given
    the bottom quarter's inputs, not its reference, as its transfer set
    (train.distillation_step), and the teacher, all from their untrained states on the same
    labelled batches: (step, gain in dB on the bottom quarter over the untrained student, i.e.
    its classical base) every :data:`DISTILLATION_EVERY` steps. The distilled student has seen
    the bottom quarter's inputs, so its gain there is transductive. Raises FileNotFoundError
    without the corpus, ValueError when the corpus holds no single :data:`DISTILLATION_SCENE`."""
    from .datasets import corpus_cubes, validation_sensors
    from .learnability import probe, split_rows

    found = [c for c in corpus_cubes(data_dir) if DISTILLATION_SCENE in c.name]
    if len(found) != 1:
        raise ValueError(f"the corpus holds {len(found)} cubes named {DISTILLATION_SCENE!r}; the distillation "
                         "section needs exactly one")
    (cube,) = found
    train_part, held_out = split_rows(cube)
    result = probe([train_part], [held_out], validation_sensors()[DISTILLATION_SENSOR],
                   scale=DISTILLATION_SCALE, steps=steps, memorise_steps=0, held_out_batches=4, crop=64,
                   lr=1e-4, evaluate_every=DISTILLATION_EVERY, distil=True, transfer=True, log=lambda line: print(f"  {line}", flush=True))
    return {"scene": cube.name, "sensor": DISTILLATION_SENSOR, "scale": DISTILLATION_SCALE, "steps": steps,
            "control": result.held_out_gain_db, "distilled": result.distilled_gain_db,
            "teacher": result.teacher_gain_db}


def distillation_lines(result: Dict) -> List[str]:
    """One line per evaluation of :func:`distillation`, then the two comparisons at the last one."""
    lines = [f"step {step}: student without the teacher {control:+.3f} dB, distilled student {distilled:+.3f} dB, "
             f"teacher {teacher:+.3f} dB"
             for (step, control), (_, distilled), (_, teacher) in
             zip(result["control"], result["distilled"], result["teacher"])]
    (_, control), (_, distilled), (_, teacher) = result["control"][-1], result["distilled"][-1], result["teacher"][-1]
    lines.append(f"distillation within {result['scene']} ({result['sensor']} ×{result['scale']}, {result['steps']} "
                 f"steps, held-out quarter): distilled student {'ahead of' if distilled > control else 'not ahead of'} "
                 f"the one trained without the teacher by {distilled - control:+.3f} dB; teacher "
                 f"{'ahead of' if teacher > distilled else 'not ahead of'} the distilled student by {teacher - distilled:+.3f} dB")
    return lines


def _adaptation_lines(result: Dict) -> List[str]:
    budgets = result["budgets"]
    lines = []
    for label in budgets[1:]:
        gain = [r[label]["psnr"] - r[budgets[0]]["psnr"] for r in result["cases"]]
        lines.append(f"scene adaptation {label}: full-resolution PSNR {np.mean(gain):+.2f} dB on average against "
                     f"{budgets[0]}, better on {sum(g > 0.005 for g in gain)}/{len(gain)}, worse on "
                     f"{sum(g < -0.005 for g in gain)}/{len(gain)}")
    return lines


# A small launcher forks the measured command: Linux keeps a process's peak-memory record
# across fork and exec, so a command started straight from this (large) process would
# report this process's memory as its own.
_LAUNCHER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "print('PEAK_KB', usage.ru_maxrss, flush=True)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def robustness(data_dir=None) -> Dict:
    """Scale 4, Sentinel-2 10 m: 30 dB noise on either input, and the LR-HSI shifted by 1 HR pixel."""
    from .api import fuse_case, load_model
    from .baselines import bicubic_upsample, gsa
    from .bundle import default_model_path
    from .datasets import make_wald_case, validation_cubes, validation_sensors
    from .train import _metrics

    sensor = validation_sensors()["Sentinel-2 10 m"]
    variants = {
        "HSI noise 30 dB": {"hsi_snr_db": 30.0},
        "MSI noise 30 dB": {"msi_snr_db": 30.0},
        "HSI shifted 1 px": {"shift": (1.0, 1.0)},
    }
    student, _ = load_model(default_model_path(), "cpu")
    rows = []
    for cube in validation_cubes(data_dir):
        for label, options in variants.items():
            case = make_wald_case(cube, sensor, 4, rng=np.random.default_rng(0), **options)
            case.sensor = label
            rows.append({
                "bicubic": _metrics(case, bicubic_upsample(case.lr_hsi, 4, case.reference.shape[1:])),
                "gsa": _metrics(case, gsa(case.lr_hsi, case.hr_msi, 4)),
                "student": _metrics(case, fuse_case(case, model=student)),
            })
    return {"cases": rows}


PSF_VARIANT_SCALES = (3, 4)
# The oracle model-based baselines are slow (tens of seconds per case): run at one scale.
ORACLE_SCALE = 4


def psf_variants(data_dir=None, oracle_baselines: bool = True) -> Dict:
    """Every validation cube (Sentinel-2 10 m MSI) degraded with the realistic PSFs of
    datasets.validation_psfs at scales 3 and 4: the bundled student with the PSF estimated
    blind, the same student told the true PSF, GSA, bicubic and, at scale 4, CNMF and HySure
    told the true PSF and SRF (oracles; cached on disk)."""
    from .api import fuse_case, load_model
    from .baselines import bicubic_upsample, gsa
    from .bundle import default_model_path
    from .datasets import make_wald_case, spectral_response_matrix, validation_cubes, validation_psfs, validation_sensors
    from .train import _metrics

    sensor = validation_sensors()["Sentinel-2 10 m"]
    student, _ = load_model(default_model_path(), "cpu")
    rows = []
    for cube in validation_cubes(data_dir):
        response, _ = spectral_response_matrix(sensor, cube.wavelengths_nm)
        for scale in PSF_VARIANT_SCALES:
            for label, psf in validation_psfs(scale).items():
                case = make_wald_case(cube, sensor, scale, psf=psf.with_offset((0.0, 0.0)), shift=psf.offset)
                case.sensor = label
                estimate = []
                row = {
                    "bicubic": _metrics(case, bicubic_upsample(case.lr_hsi, scale, case.reference.shape[1:])),
                    "gsa": _metrics(case, gsa(case.lr_hsi, case.hr_msi, scale)),
                    "blind": _metrics(case, fuse_case(case, model=student, log=estimate.append)),
                    "told": _metrics(case, fuse_case(case, model=student, psf=case.degradation)),
                    "estimate": next((line for line in estimate if line.startswith("estimated PSF")), ""),
                }
                if oracle_baselines and scale == ORACLE_SCALE:
                    row.update(oracles(case, response))
                rows.append(row)
                print(f"  {cube.name} ×{scale} {label}: blind {row['blind']['psnr']:.2f} dB, told {row['told']['psnr']:.2f}, "
                      f"GSA {row['gsa']['psnr']:.2f}", flush=True)
    return {"cases": rows}


def oracles(case, response: np.ndarray) -> Dict[str, Dict]:
    """CNMF and HySure on a Wald case, told its true PSF (case.degradation) and SRF (response,
    M×B): {"cnmf": metrics, "hysure": metrics}; results cached on disk, keyed by the inputs and
    the baselines' source, so a changed method is recomputed."""
    from . import baselines
    from .psf import decimation_matrix
    from .train import _metrics

    version = hashlib.sha256(Path(baselines.__file__).read_bytes()).hexdigest()
    rows_matrix = decimation_matrix(case.reference.shape[1], case.degradation, 0)
    cols_matrix = decimation_matrix(case.reference.shape[2], case.degradation, 1)
    found = {}
    for name in ("cnmf", "hysure"):
        method = getattr(baselines, name)
        fused = cached(
            [name, version, case.lr_hsi, case.hr_msi, response, rows_matrix, cols_matrix],
            lambda: method(case.lr_hsi, case.hr_msi, response, rows_matrix, cols_matrix),
        )
        found[name] = _metrics(case, fused)
    return found


def network_gain(data_dir=None, oracle_baselines: bool = True) -> Dict:
    """What the trained networks add (issue: a student that earns its place): on the Wald
    validation cases and every validation cube under the realistic PSFs (scales 3 and 4,
    Sentinel-2 10 m), as users run it (PSF estimated from the pair): the untrained base (the
    student's architecture before any step: its zeroed output convolution makes it exactly the
    classical base), the bundled student, the same student trained without its teacher (when
    its bundle is there) and the bundled teacher; at scale 4, CNMF and HySure told the truth."""
    from .api import fuse_case, load_model
    from .bundle import default_model_path
    from .datasets import make_wald_case, spectral_response_matrix, validation_cases, validation_cubes, validation_psfs, validation_sensors
    from .model import SubspaceFusionModel
    from .train import CONTROL_BUNDLE, _metrics

    models = {}
    for role, name in (("student", "csakd_student.json"), ("teacher", "csakd_teacher.json"), ("control", CONTROL_BUNDLE)):
        path = default_model_path().with_name(name)
        if path.exists():
            models[role], _ = load_model(path, "cpu")
    models["base"] = SubspaceFusionModel(models["student"].config).eval()
    cases = validation_cases(data_dir)
    sensors = validation_sensors()
    sensor = sensors["Sentinel-2 10 m"]
    cubes = {cube.name: cube for cube in validation_cubes(data_dir)}
    for cube in cubes.values():
        for scale in PSF_VARIANT_SCALES:
            for label, psf in validation_psfs(scale).items():
                case = make_wald_case(cube, sensor, scale, psf=psf.with_offset((0.0, 0.0)), shift=psf.offset)
                case.sensor = f"Sentinel-2 10 m, {label}"
                cases.append(case)
    rows = []
    for case in cases:
        # The networks compared as they are; the scene correction (fitted per scene on top of
        # whichever model fuses) measured apart, on the student.
        row = {role: _metrics(case, fuse_case(case, model=model, scene_correction=False)) for role, model in models.items()}
        said = []
        row["scene"] = _metrics(case, fuse_case(case, model=models["student"], scene_correction=True, log=said.append))
        row["scene"]["applied"] = any(line.startswith("scene correction: applied") for line in said)
        if oracle_baselines and case.scale == ORACLE_SCALE:
            label = case.sensor.split(",")[0]
            response, _ = spectral_response_matrix(sensors[label], cubes[case.cube].wavelengths_nm)
            row.update(oracles(case, response))
        rows.append(row)
        print(f"  {case.cube} ×{case.scale} {case.sensor}: "
              + ", ".join(f"{role} {m['psnr']:.2f}" for role, m in row.items()), flush=True)
    return {"cases": rows}


GAIN_COLUMNS = ("base", "student", "scene", "control", "teacher", "cnmf", "hysure")


def _gain_table(result: Dict, markdown: bool) -> str:
    columns = [c for c in GAIN_COLUMNS if any(c in r for r in result["cases"])]
    lines = []
    if markdown:
        lines += ["| cube | MSI, PSF | scale | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for row in result["cases"]:
        case = row["student"]
        cells = [f"{row[c]['psnr']:.2f} / {row[c]['sam']:.2f}" if c in row else "–" for c in columns]
        if markdown:
            lines.append(f"| {case['cube']} | {case['sensor']} | {case['scale']} | " + " | ".join(cells) + " |")
        else:
            lines.append(f"{case['cube'][:22]:22s} {case['sensor'][:40]:40s} {case['scale']:2d}  " + "  ".join(f"{c:>14s}" for c in cells))
    return "\n".join(lines)


def network_gain_lines(result: Dict) -> List[str]:
    """The issue's criteria on :func:`network_gain`'s rows, one line each."""
    rows = result["cases"]
    n = len(rows)
    gain = np.array([r["student"]["psnr"] - r["base"]["psnr"] for r in rows])
    sam = np.array([r["student"]["sam"] - r["base"]["sam"] for r in rows])
    lines = [f"student against its untrained base on {n} cases: mean PSNR {gain.mean():+.2f} dB, better on "
             f"{np.mean(gain > 0):.0%}, worst {gain.min():+.2f} dB; SAM {sam.mean():+.3f}° on average"]
    mean = {role: np.mean([r[role]["psnr"] for r in rows]) for role in rows[0] if role in ("base", "student", "teacher", "control")}
    lines.append("mean PSNR: " + ", ".join(f"{role} {value:.2f} dB" for role, value in mean.items())
                 + (f"; teacher ahead of the student on {sum(r['teacher']['psnr'] > r['student']['psnr'] for r in rows)}/{n}" if "teacher" in mean else "")
                 + (f"; distilled student ahead of the one trained without the teacher on "
                    f"{sum(r['student']['psnr'] > r['control']['psnr'] for r in rows)}/{n}" if "control" in mean else ""))
    if "scene" in rows[0]:
        scene = np.array([r["scene"]["psnr"] - r["student"]["psnr"] for r in rows])
        scene_sam = np.array([r["scene"]["sam"] - r["student"]["sam"] for r in rows])
        applied = np.array([bool(r["scene"].get("applied")) for r in rows])
        lines.append(f"scene correction (the student with it against without) on {n} cases: mean PSNR {scene.mean():+.2f} dB, "
                     f"better on {np.mean(scene > 0):.0%}, worst {scene.min():+.2f} dB; SAM {scene_sam.mean():+.3f}° on average; "
                     f"applied on {int(applied.sum())}" + (f" (there {scene[applied].mean():+.2f} dB, worst {scene[applied].min():+.2f})"
                                                            if applied.any() else ""))
    oracle = [r for r in rows if "cnmf" in r]
    if oracle:
        best = np.array([max(r["cnmf"]["psnr"], r["hysure"]["psnr"]) for r in oracle])
        student = np.array([r["student"]["psnr"] for r in oracle])
        lines.append(f"×{ORACLE_SCALE} ({len(oracle)} cases): student {student.mean():.2f} dB against the better of CNMF and "
                     f"HySure (told the truth) {best.mean():.2f} dB, lead {np.mean(student - best):+.2f} dB; behind by more "
                     f"than 0.5 dB on {int(np.sum(student < best - 0.5))}")
    return lines


def _run_measured(command: List[str]) -> Dict:
    """Wall time and peak resident memory of a command in its own process."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *command], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    peak_kb = int(done.stdout.rsplit("PEAK_KB", 1)[1].split()[0])
    return {"seconds": seconds, "peak_mb": peak_kb / 1024.0, "stdout": done.stdout}


def make_scene(folder: Path, size: int, scale: int = 3, data_dir=None):
    """A 224-band LR-HSI mirrored from the real EnMAP Potsdam block A, and a 4-band HR-MSI
    simulated from it, so that the output is size×size pixels."""
    import rasterio
    from rasterio.transform import from_origin

    from .baselines import bicubic_upsample
    from .datasets import default_data_dir

    root = Path(data_dir or default_data_dir()) / "enmap_potsdam"
    source = sorted(root.glob("enmap_potsdam_blockA_*.tif"))[0]
    with rasterio.open(source) as src:
        block = src.read()
        profile = src.profile
        tags = [src.tags(i + 1) for i in range(src.count)]
    lr_size = size // scale
    reps = (1, -(-lr_size // block.shape[1]), -(-lr_size // block.shape[2]))
    mirrored = np.concatenate([block, block[:, ::-1]], axis=1)
    mirrored = np.concatenate([mirrored, mirrored[:, :, ::-1]], axis=2)
    lr = np.tile(mirrored, (1, -(-reps[1] // 2), -(-reps[2] // 2)))[:, :lr_size, :lr_size]
    valid = lr[0] != profile["nodata"]
    bands = [int(np.argmin([abs(float(t["wavelength"]) - w) for t in tags])) for w in (490, 560, 665, 842)]
    msi = bicubic_upsample(np.where(valid, lr[bands], 0).astype(np.float32), scale).astype(np.float32)
    msi += np.random.default_rng(0).normal(0, 20, msi.shape).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    lr_path, hr_path = folder / f"scene{size}_lr_hsi.tif", folder / f"scene{size}_hr_msi.tif"
    common = {"driver": "GTiff", "dtype": "float32", "tiled": True, "compress": "deflate", "crs": profile["crs"]}
    with rasterio.open(lr_path, "w", width=lr_size, height=lr_size, count=lr.shape[0], nodata=profile["nodata"],
                       transform=from_origin(364095.0, 5809965.0, 30.0, 30.0), **common) as dst:
        dst.write(lr)
        for i, t in enumerate(tags, start=1):
            dst.update_tags(i, **t)
    with rasterio.open(hr_path, "w", width=size, height=size, count=4,
                       transform=from_origin(364095.0, 5809965.0, 30.0 / scale, 30.0 / scale), **common) as dst:
        dst.write(msi)
    return lr_path, hr_path


@contextmanager
def competing_load(processes: int):
    """``processes`` busy-looping processes for the duration: a desktop that is doing something else."""
    spinners = [subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


# The fusion as the plugin runs it: OpenMP told to wait passively before torch loads, then the
# thread count taken from the free cores (csakd_qgis.threads); the chosen count is logged.
_FUSION = (
    "import sys; sys.path.insert(0, %r)\n"
    "from csakd_qgis.threads import configure_torch_threads, prefer_passive_waiting\n"
    "prefer_passive_waiting()\n"
    "configure_torch_threads(print)\n"
    "from csakd_qgis.api import fuse_files\n"
    "fuse_files(%r, %r, %r, log=print)\n"
)


# Alternating runs of fusion and gdalwarp per small scene, medians reported: one 512² run of
# either varied by up to 15 % from one call to the next (6.6 s, then 5.75 s for the same fusion).
# A large scene's run is long enough to be steady, and long enough to be run once.
REPEATS_UP_TO_1024 = 3


def end_to_end(sizes=(512, 2048), data_dir=None, load_processes=None) -> List[Dict]:
    """Fusion against gdalwarp per size, on an idle machine and beside ``load_processes`` busy
    processes (default: half the cores, at least one), in one run so the rows compare; scenes
    up to 1024² are run REPEATS_UP_TO_1024 times each, alternately, and the medians kept."""
    from .threads import usable_cores

    load_processes = max(1, usable_cores() // 2) if load_processes is None else load_processes
    rows = []
    with tempfile.TemporaryDirectory(prefix="csakd-bench-") as folder:
        folder = Path(folder)
        for size in sizes:
            lr_path, hr_path = make_scene(folder / "inputs", size, data_dir=data_dir)
            for condition, processes in (("idle", 0), (f"{load_processes} busy process(es)", load_processes)):
                with competing_load(processes):
                    repeats = REPEATS_UP_TO_1024 if size <= 1024 else 1
                    row = _fusion_against_gdalwarp(folder, size, lr_path, hr_path, repeats)
                row["load"] = condition
                rows.append(row)
    return rows


def throughput(workers=(1, 2), scenes: int = 4, size: int = 512, data_dir=None) -> List[Dict]:
    """Scenes per hour of `batch` (batch.run_batch) for ``scenes`` equal size×size-pixel
    224-band scenes on LocalClusters of each number of single-threaded ``workers``.

    Timed from the first task submitted to the last result, model loading on each worker
    included, the cluster's start not (a cluster serves many scenes). The CPU time the workers
    got (``cpu_share`` of their cores over the run) tells a machine busy with other work, where
    two workers cannot be twice as fast, from overhead of the batch itself.
    """
    import csv

    from distributed import Client, LocalCluster

    from .batch import run_batch

    rows = []
    with tempfile.TemporaryDirectory(prefix="csakd-bench-") as folder:
        folder = Path(folder)
        lr_path, hr_path = make_scene(folder / "inputs", size, data_dir=data_dir)
        pairs = folder / "pairs.csv"
        with open(pairs, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["lrhsi", "hrmsi", "output"])
            writer.writerows((lr_path, hr_path, f"scene{i}.tif") for i in range(scenes))
        for count in workers:
            out_dir = folder / f"out{count}"
            with LocalCluster(n_workers=count, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                    Client(cluster) as client:
                cpu_before = client.run(_cpu_seconds)
                started = time.perf_counter()
                results = run_batch(pairs, out_dir, client=client, progress_bar=False)
                seconds = time.perf_counter() - started
                cpu = sum(client.run(_cpu_seconds).values()) - sum(cpu_before.values())
            failed = [r["message"] for r in results if r["status"] != "done"]
            if failed:
                raise RuntimeError(f"batch throughput: scenes not done: {failed}")
            rows.append({"workers": count, "scenes": scenes, "output": f"{size}×{size}×224", "seconds": seconds,
                         "scenes_per_hour": scenes * 3600.0 / seconds, "cpu_seconds": cpu,
                         "cpu_share": cpu / (seconds * count)})
            for output in out_dir.glob("*.tif"):
                output.unlink()
    return rows


def _cpu_seconds() -> float:
    """User + system CPU seconds of the calling process, all its threads (run on each worker)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _throughput_lines(rows: List[Dict]) -> List[str]:
    one = rows[0]["scenes_per_hour"]
    return [f"{r['scenes']} scenes of {r['output']} on {r['workers']} single-threaded worker(s): {r['seconds']:.1f} s, "
            f"{r['scenes_per_hour']:.0f} scenes per hour ({r['scenes_per_hour'] / one:.2f}× one worker); "
            f"{r['cpu_seconds'] / r['scenes']:.1f} CPU s per scene, the workers had {r['cpu_share']:.2f} of a core each"
            for r in rows]


def _fusion_against_gdalwarp(folder: Path, size: int, lr_path: Path, hr_path: Path, repeats: int = 1) -> Dict:
    """One row: fusion and gdalwarp run alternately ``repeats`` times, medians of time and peak memory."""
    import rasterio

    fused = folder / f"fused{size}.tif"
    warped = folder / f"gdalwarp{size}.tif"
    options = ["-co", "TILED=YES", "-co", "BLOCKXSIZE=256", "-co", "BLOCKYSIZE=256", "-co", "COMPRESS=DEFLATE",
               "-co", "PREDICTOR=3", "-co", "NUM_THREADS=ALL_CPUS", "-co", "BIGTIFF=IF_SAFER", "-co", "INTERLEAVE=BAND"]
    fusions, warps = [], []
    for _ in range(repeats):
        fused.unlink(missing_ok=True)
        warped.unlink(missing_ok=True)
        fusions.append(_run_measured([sys.executable, "-c", _FUSION % (str(ROOT), str(lr_path), str(hr_path), str(fused))]))
        with rasterio.open(fused) as out:
            bounds, res, count = out.bounds, out.res, out.count
        warps.append(_run_measured(
            ["gdalwarp", "-q", "-r", "cubic", "-multi", "-wo", "NUM_THREADS=ALL_CPUS", "-ot", "Float32",
             "-te", *map(str, (bounds.left, bounds.bottom, bounds.right, bounds.top)), "-tr", str(res[0]), str(res[1]),
             "-dstnodata", "-9999", *options, str(lr_path), str(warped)]
        ))

    def median(runs, key):
        return float(np.median([run[key] for run in runs]))

    row = {"output": f"{size}×{size}×{count}", "runs": repeats,
           "fusion_seconds": median(fusions, "seconds"), "fusion_peak_mb": median(fusions, "peak_mb"),
           "gdalwarp_seconds": median(warps, "seconds"), "gdalwarp_peak_mb": median(warps, "peak_mb"),
           "fused_mb": fused.stat().st_size / 1e6, "gdalwarp_mb": warped.stat().st_size / 1e6,
           "threads": next((line for line in fusions[-1]["stdout"].splitlines() if "thread(s)" in line), "")}
    row["ratio"] = row["fusion_seconds"] / row["gdalwarp_seconds"]
    fused.unlink()
    warped.unlink()
    return row


def criteria(results: Dict) -> List[str]:
    """The bundled student against the better of GSA and bicubic, case by case, and the other
    sections' criteria, for the sections ``results`` holds."""
    lines = []
    if results.get("quality"):
        lines += _quality_criteria(results["quality"])
    return lines + _other_criteria(results)


def _quality_criteria(quality_: Dict) -> List[str]:
    table = quality_["cases"]
    n = len(table["student"])
    lines = []
    for role in ("student", "teacher"):
        ahead = [r for i, r in enumerate(table[role])
                 if r["psnr"] < max(table["gsa"][i]["psnr"], table["bicubic"][i]["psnr"]) + 1.0]
        sam_ok = sum(r["sam"] <= min(table["gsa"][i]["sam"], table["bicubic"][i]["sam"]) for i, r in enumerate(table[role]))
        short = "; ".join(f"{r['cube']} {r['sensor']} ×{r['scale']}" for r in ahead)
        lines.append(f"{role}: PSNR ≥ 1 dB above the better of GSA and bicubic on {n - len(ahead)}/{n} cases"
                     + (f" (not on: {short})" if short else "") + f"; SAM no higher than the better of the two on {sam_ok}/{n}")
    teacher_ahead = sum(t["psnr"] > s["psnr"] for t, s in zip(table["teacher"], table["student"]))
    summary = quality_["summary"]
    lines.append(f"teacher against student: mean PSNR {summary['teacher']['psnr']:.2f} vs {summary['student']['psnr']:.2f} dB, "
                 f"SAM {summary['teacher']['sam']:.2f} vs {summary['student']['sam']:.2f}°; higher PSNR on {teacher_ahead}/{n} cases")
    return lines


def _other_criteria(results: Dict) -> List[str]:
    lines = []
    if results.get("psf_variants"):
        rows = results["psf_variants"]["cases"]
        n = len(rows)
        ahead = [r for r in rows if r["blind"]["psnr"] >= max(r["gsa"]["psnr"], r["bicubic"]["psnr"]) + 1.0
                 and r["blind"]["sam"] <= min(r["gsa"]["sam"], r["bicubic"]["sam"])]
        close = [r for r in rows if r["blind"]["psnr"] >= r["told"]["psnr"] - 1.0]
        lines.append(f"PSF variants: blind student ≥ 1 dB above the better of GSA and bicubic with SAM no higher on "
                     f"{len(ahead)}/{n}; within 1 dB of the student told the true PSF on {len(close)}/{n} "
                     f"(mean blind {np.mean([r['blind']['psnr'] for r in rows]):.2f} dB, told "
                     f"{np.mean([r['told']['psnr'] for r in rows]):.2f} dB)")
        oracle = [r for r in rows if "cnmf" in r or "hysure" in r]
        if oracle:
            best = [max(r.get("cnmf", {"psnr": -1e9})["psnr"], r.get("hysure", {"psnr": -1e9})["psnr"]) for r in oracle]
            lines.append(f"PSF variants ×{ORACLE_SCALE}: blind student {np.mean([r['blind']['psnr'] for r in oracle]):.2f} dB "
                         f"against the better oracle of CNMF and HySure {np.mean(best):.2f} dB on average; ahead on "
                         f"{sum(r['blind']['psnr'] > b for r, b in zip(oracle, best))}/{len(oracle)}")
    if results.get("robustness"):
        rows = results["robustness"]["cases"]
        ahead = sum(r["student"]["psnr"] > r["gsa"]["psnr"] and r["student"]["sam"] < r["gsa"]["sam"] for r in rows)
        lines.append(f"robustness: student ahead of GSA in PSNR and SAM on {ahead}/{len(rows)} noisy or misregistered cases")
    if results.get("end_to_end"):
        rows = results["end_to_end"]
        within = [r for r in rows if r["ratio"] <= 1.0]
        lines.append(f"end to end: fusion within 1.0× gdalwarp's time on {len(within)}/{len(rows)} runs (idle and under load)")
    return lines


def print_report(results: Dict) -> None:
    print(f"\nmachine: {results['machine']}\n")
    if results.get("costs"):
        _print_costs(results["costs"])
    if results.get("quality"):
        _print_quality(results["quality"])
    for line in _other_criteria(results):
        print(line)
    _print_sections(results)


def _print_costs(costs_: List[Dict]) -> None:
    print("1. Network size and cost (per 256×256 output tile, 172 bands, 4-band MSI, ×4)")
    print(f"{'model':23s} {'params':>10s} {'GMAC':>8s} {'s/tile':>8s}   paper: params / GMAC / s on this CPU")
    for row in costs_:
        paper = PAPER.get(row["model"])
        ref = f"{paper['params_m']} M / {paper['gmacs']} G / {paper['seconds']} s" if paper else ""
        print(f"{row['model']:23s} {row['params'] / 1e6:9.2f}M {row['macs'] / 1e9:8.1f} {row['seconds']:8.3f}   {ref}")
    costs = {r["model"]: r for r in costs_}
    if "paper student" in costs and "bundled student" in costs:
        print(f"bundled student is {costs['paper student']['seconds'] / costs['bundled student']['seconds']:.1f}× faster "
              "than the paper's student configuration on the same tile")
    if "paper student" in costs and FULL_RESOLUTION_STUDENT in costs:
        print(f"{FULL_RESOLUTION_STUDENT} (aligned frame, unshuffle 1, 16 features, the layout that carries) is "
              f"{costs['paper student']['seconds'] / costs[FULL_RESOLUTION_STUDENT]['seconds']:.1f}× faster "
              "than the paper's student configuration")


def _print_quality(quality_: Dict) -> None:
    print("\n2. Quality, Wald protocol on validation cubes never trained on (PSNR dB / SAM ° / ERGAS)")
    table = quality_["cases"]
    methods = ["bicubic", "gsa", "teacher", "student"]
    print(f"{'cube':24s} {'sensor':16s} {'s':>2s}  " + "  ".join(f"{m:>20s}" for m in methods))
    for i, case in enumerate(table["bicubic"]):
        cells = "  ".join(f"{table[m][i]['psnr']:6.2f}/{table[m][i]['sam']:5.2f}/{table[m][i]['ergas']:5.2f}" for m in methods)
        print(f"{case['cube'][:24]:24s} {case['sensor'][:16]:16s} {case['scale']:2d}  {cells}")
    summary = quality_["summary"]
    cells = "  ".join(f"{summary[m]['psnr']:6.2f}/{summary[m]['sam']:5.2f}/{summary[m]['ergas']:5.2f}" for m in methods)
    print(f"{'mean':24s} {'':16s} {'':2s}  {cells}")
    for line in _quality_criteria(quality_):
        print(line)


def _print_sections(results: Dict) -> None:
    if results.get("robustness"):
        print("\n2b. Robustness, scale 4, Sentinel-2 10 m (PSNR dB / SAM °)")
        print(f"{'cube':24s} {'variant':18s} " + "  ".join(f"{m:>14s}" for m in ("bicubic", "gsa", "student")))
        for row in results["robustness"]["cases"]:
            cells = "  ".join(f"{row[m]['psnr']:6.2f}/{row[m]['sam']:6.2f}" for m in ("bicubic", "gsa", "student"))
            print(f"{row['bicubic']['cube'][:24]:24s} {row['bicubic']['sensor']:18s} {cells}")
    if results.get("psf_variants"):
        print("\n2d. Realistic PSFs, Sentinel-2 10 m (PSNR dB / SAM °); blind = PSF estimated from the pair, "
              "told = the true PSF given; CNMF and HySure told the true PSF and SRF")
        methods = ("bicubic", "gsa", "cnmf", "hysure", "told", "blind")
        print(f"{'cube':22s} {'s':>2s} {'PSF':34s} " + "  ".join(f"{m:>13s}" for m in methods))
        for row in results["psf_variants"]["cases"]:
            cells = "  ".join(f"{row[m]['psnr']:6.2f}/{row[m]['sam']:6.2f}" if m in row else f"{'–':>13s}" for m in methods)
            print(f"{row['bicubic']['cube'][:22]:22s} {row['bicubic']['scale']:2d} {row['bicubic']['sensor'][:34]:34s} {cells}")
    if results.get("network_gain"):
        print("\n2e. What the networks add: untrained base, distilled student, student without the teacher, teacher "
              "(PSNR dB / SAM °; Wald cases, then realistic PSFs; CNMF and HySure told the truth at ×4)")
        print(_gain_table(results["network_gain"], markdown=False))
        for line in network_gain_lines(results["network_gain"]):
            print(line)
    if results.get("scene_correction"):
        print("\n2f. Scene correction (SCENE_CORRECTION) on Wald cases, full resolution against the truth (PSNR dB / SAM °)")
        for row in results["scene_correction"]["cases"]:
            print(f"{row.get('set', ''):10s} {row['cube'][:24]:24s} {row['sensor'][:16]:16s} ×{row['scale']} "
                  f"{row.get('psf', '')[:34]:34s} off {row['off']['psnr']:6.2f}/"
                  f"{row['off']['sam']:5.2f}  on {row['on']['psnr']:6.2f}/{row['on']['sam']:5.2f}")
        for line in scene_correction_lines(results["scene_correction"]):
            print(line)
    if results.get("adaptation"):
        a = results["adaptation"]
        print("\n2g. Scene adaptation (ADAPT_MINUTES) on Wald cases, full resolution against the truth (PSNR dB / SAM °)")
        for row in a["cases"]:
            print(f"{row['cube'][:24]:24s} ×{row['scale']}  " + "  ".join(
                f"{b}: {row[b]['psnr']:6.2f}/{row[b]['sam']:5.2f}" for b in a["budgets"]))
        for line in _adaptation_lines(a):
            print(line)
    if results.get("distillation"):
        print("\n2h. Distillation within one scene: gain on the bottom quarter over the untrained student (dB; "
              "the distilled student's transfer set is that quarter's inputs)")
        for line in distillation_lines(results["distillation"]):
            print(line)
    if results.get("end_to_end"):
        print("\n3. End-to-end: 224-band scene → GeoTIFF on the MSI grid (same creation options)")
        print(f"{'output':18s} {'load':22s} {'runs':>4s} {'fusion s':>9s} {'gdalwarp s':>11s} {'ratio':>6s} {'fusion peak MB':>15s} {'gdalwarp peak MB':>17s}")
        for row in results["end_to_end"]:
            print(f"{row['output']:18s} {row.get('load', 'idle'):22s} {row.get('runs', 1):4d} {row['fusion_seconds']:9.1f} {row['gdalwarp_seconds']:11.1f} "
                  f"{row['ratio']:6.2f} {row['fusion_peak_mb']:15.0f} {row['gdalwarp_peak_mb']:17.0f}   {row.get('threads', '')}")
    if results.get("throughput"):
        print("\n4. Batch throughput (python -m csakd_qgis batch, Dask LocalCluster)")
        for line in _throughput_lines(results["throughput"]):
            print(line)


def markdown(results: Dict) -> str:
    """The same tables in Markdown, for the README."""
    command = "make bench" if not results.get("sections") else f"python -m csakd_qgis.bench --only {' '.join(results['sections'])}"
    out = [f"Measured {results['date']} on {results['machine']} (`{command}`).", ""]
    if results.get("costs"):
        out += ["| model | parameters | GMAC per 256² tile | seconds per 256² tile (172 bands) | paper |", "|---|---|---|---|---|"]
        for row in results["costs"]:
            paper = PAPER.get(row["model"])
            ref = f"{paper['params_m']} M, {paper['gmacs']} G, {paper['seconds']} s" if paper else ""
            out.append(f"| {row['model']} | {row['params'] / 1e6:.2f} M | {row['macs'] / 1e9:.1f} | {row['seconds']:.3f} | {ref} |")
    if results.get("quality"):
        table = results["quality"]["cases"]
        methods = ["bicubic", "gsa", "teacher", "student"]
        out += ["", "Wald protocol on validation cubes never trained on — PSNR dB / SAM ° / ERGAS:", "",
                "| cube | MSI | scale | bicubic | GSA | teacher | student |", "|---|---|---|---|---|---|---|"]
        for i, case in enumerate(table["bicubic"]):
            cells = " | ".join(f"{table[m][i]['psnr']:.2f} / {table[m][i]['sam']:.2f} / {table[m][i]['ergas']:.2f}" for m in methods)
            out.append(f"| {case['cube']} | {case['sensor']} | {case['scale']} | {cells} |")
        summary = results["quality"]["summary"]
        out.append("| **mean** | | | " + " | ".join(f"**{summary[m]['psnr']:.2f} / {summary[m]['sam']:.2f} / {summary[m]['ergas']:.2f}**" for m in methods) + " |")
    if results.get("robustness"):
        out += ["", "Robustness (scale 4, Sentinel-2 10 m) — PSNR dB / SAM °:", "", "| cube | variant | bicubic | GSA | student |", "|---|---|---|---|---|"]
        for row in results["robustness"]["cases"]:
            cells = " | ".join(f"{row[m]['psnr']:.2f} / {row[m]['sam']:.2f}" for m in ("bicubic", "gsa", "student"))
            out.append(f"| {row['bicubic']['cube']} | {row['bicubic']['sensor']} | {cells} |")
    if results.get("psf_variants"):
        methods = ("bicubic", "gsa", "cnmf", "hysure", "told", "blind")
        out += ["", "Realistic PSFs (Sentinel-2 10 m MSI) — PSNR dB / SAM °; *blind*: the PSF estimated from the pair, "
                "*told*: the same student given the true PSF; CNMF and HySure are given the true PSF and SRF (oracles, scale 4 only):", "",
                "| cube | scale | PSF | bicubic | GSA | CNMF | HySure | told | blind |", "|---|---|---|---|---|---|---|---|---|"]
        for row in results["psf_variants"]["cases"]:
            cells = " | ".join(f"{row[m]['psnr']:.2f} / {row[m]['sam']:.2f}" if m in row else "–" for m in methods)
            out.append(f"| {row['bicubic']['cube']} | {row['bicubic']['scale']} | {row['bicubic']['sensor']} | {cells} |")
    out += [""] + [f"- {line}" for line in criteria(results)]
    if results.get("network_gain"):
        out += ["", "What the networks add — PSNR dB / SAM °, as users run it (PSF estimated from the pair); *base*: the "
                "student before any training step (exactly the classical base); *control*: the student trained without "
                "the teacher on the same batches; CNMF and HySure told the true PSF and SRF (×4 only):", ""]
        out.append(_gain_table(results["network_gain"], markdown=True))
        out += [""] + [f"- {line}" for line in network_gain_lines(results["network_gain"])]
    if results.get("scene_correction"):
        out += ["", "Scene correction (`SCENE_CORRECTION`) on Wald cases large enough to check it, full resolution "
                "against the truth — PSNR dB / SAM ° (the validation cubes under Wald's PSF; every case in "
                f"`build/bench/{results_path(results.get('sections')).name}`):", "", "| cube | MSI | scale | off | on |", "|---|---|---|---|---|"]
        for row in results["scene_correction"]["cases"]:
            if row.get("set", "validation") != "validation" or row.get("psf", WALD_PSF) != WALD_PSF:
                continue
            out.append(f"| {row['cube']} | {row['sensor']} | {row['scale']} | {row['off']['psnr']:.2f} / "
                       f"{row['off']['sam']:.2f} | {row['on']['psnr']:.2f} / {row['on']['sam']:.2f} |")
        out += [""] + [f"  - {line.strip()}" if line.startswith("  ") else f"- {line}"
                       for line in scene_correction_lines(results["scene_correction"])]
    if results.get("adaptation"):
        a = results["adaptation"]
        out += ["", "Scene adaptation (`ADAPT_MINUTES`) on Wald cases, full resolution against the truth — PSNR dB / SAM °:", "",
                "| cube | scale | " + " | ".join(a["budgets"]) + " |", "|---|---|" + "---|" * len(a["budgets"])]
        for row in a["cases"]:
            out.append(f"| {row['cube']} | {row['scale']} | " + " | ".join(
                f"{row[b]['psnr']:.2f} / {row[b]['sam']:.2f}" for b in a["budgets"]) + " |")
        out += [""] + [f"- {line}" for line in _adaptation_lines(a)]
    if results.get("distillation"):
        out += ["", "Distillation within one scene (the learnability probe's within-scene setting; the distilled "
                "student's transfer set is the bottom quarter's inputs, not its reference, so its figure there is "
                "transductive) — gain in dB on the bottom quarter over the untrained student, which is the "
                "classical base:", ""]
        out += [f"- {line}" for line in distillation_lines(results["distillation"])]
    if results.get("end_to_end"):
        out += ["", "End to end, 224-band scene → GeoTIFF on the MSI grid, against `gdalwarp -r cubic` writing the same grid "
                "with the same creation options (medians of alternating runs where runs > 1):", "",
                "| output | load | runs | fusion s | gdalwarp s | ratio | fusion peak MB | gdalwarp peak MB |",
                "|---|---|---|---|---|---|---|---|"]
        for row in results["end_to_end"]:
            out.append(f"| {row['output']} | {row.get('load', 'idle')} | {row.get('runs', 1)} | {row['fusion_seconds']:.1f} | "
                       f"{row['gdalwarp_seconds']:.1f} | {row['ratio']:.2f} | {row['fusion_peak_mb']:.0f} | {row['gdalwarp_peak_mb']:.0f} |")
    if results.get("throughput"):
        out += ["", "Batch throughput (`python -m csakd_qgis batch`, Dask LocalCluster):", ""]
        out += [f"- {line}" for line in _throughput_lines(results["throughput"])]
    return "\n".join(out) + "\n"


# The sections of one run, in the order they run: everything timed first, while the machine is
# at its quietest. name → (what is printed while it runs, the results' key, how it runs given
# main's parsed arguments).
SECTIONS = {
    "costs": ("measuring network costs…", "costs", lambda args: network_costs(args.repeats)),
    "end-to-end": ("measuring end-to-end fusion against gdalwarp…", "end_to_end",
                   lambda args: end_to_end(args.sizes, args.data)),
    "throughput": ("measuring batch throughput on 1 and 2 workers…", "throughput",
                   lambda args: throughput(data_dir=args.data)),
    "quality": ("measuring quality on the validation cubes…", "quality", lambda args: quality(args.data)),
    "robustness": ("measuring noisy and misregistered inputs…", "robustness", lambda args: robustness(args.data)),
    "psf-variants": ("measuring realistic PSF variants…", "psf_variants",
                     lambda args: psf_variants(args.data, oracle_baselines=not args.no_oracles)),
    "network-gain": ("measuring what the trained networks add…", "network_gain",
                     lambda args: network_gain(args.data, oracle_baselines=not args.no_oracles)),
    "scene-correction": ("measuring the scene correction…", "scene_correction",
                         lambda args: scene_correction_gain(args.data)),
    "adaptation": ("measuring scene adaptation…", "adaptation", lambda args: adaptation(args.adapt_minutes, args.data)),
    "distillation": ("measuring distillation within one scene…", "distillation",
                     lambda args: distillation(args.data, args.distillation_steps)),
}


def results_path(sections=None) -> Path:
    """Where a run's results go: build/bench/results.json for a full run, results-<sections>.json
    for sections run alone (``--only``), which a full run's results are never replaced by."""
    return RESULTS if not sections else RESULTS.with_name(f"results-{'-'.join(sections)}.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="*", default=[512, 2048], help="end-to-end output sizes (none = skip)")
    parser.add_argument("--adapt-minutes", type=float, nargs="*", default=list(ADAPTATION_BUDGETS),
                        help="scene adaptation budgets to compare (none = skip)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--distillation-steps", type=int, default=DISTILLATION_STEPS,
                        help="co-training steps of the distillation section (0: skip it)")
    parser.add_argument("--no-oracles", action="store_true", help="skip the slow CNMF and HySure oracles")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), metavar="SECTION",
                        help=f"run these sections alone ({', '.join(SECTIONS)}); saved beside the full run's results as "
                             "results-<sections>.json, which a full run's results are never replaced by")
    parser.add_argument("--throughput-only", action="store_true",
                        help="measure and print only the batch throughput on 1 and 2 workers (nothing saved)")
    args = parser.parse_args(argv)
    if args.throughput_only:
        for line in _throughput_lines(throughput(data_dir=args.data)):
            print(line)
        return 0
    import torch

    chosen = [name for name in SECTIONS if name in (args.only or SECTIONS)]
    if not args.sizes and "end-to-end" in chosen:
        chosen.remove("end-to-end")
    if not args.adapt_minutes and "adaptation" in chosen:
        chosen.remove("adaptation")
    if not args.distillation_steps and "distillation" in chosen:
        chosen.remove("distillation")
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads), {platform.python_version()}",
    }
    if args.only:
        results["sections"] = chosen
    if not chosen:
        parser.error("no section left to run: --only names sections that --sizes, --adapt-minutes or --distillation-steps turned off")
    path = results_path(chosen if args.only else None)
    # A full run takes about two hours: what each section measured is saved as it ends, in a
    # file of its own (``.partial``) that replaces the results only once every section is done.
    partial = path.with_name(path.stem + ".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        message, key, measure = SECTIONS[name]
        print(message, flush=True)
        results[key] = measure(args)
        partial.write_text(json.dumps(results, indent=2) + "\n")
    partial.replace(path)
    path.with_suffix(".md").write_text(markdown(results))
    print_report(results)
    print(f"\nsaved {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
