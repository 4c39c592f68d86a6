"""`make bench`: size, speed, memory and quality, side by side, from one run.

1. Network size and cost: the paper's teacher and student (172 bands, 4-band MSI, ×4) beside
   the bundled teacher and student — parameters, MACs per 256×256 output tile, and measured
   forward time per tile on this machine.
2. Quality on the validation cubes (Wald protocol, never trained on): bicubic, GSA, the
   bundled teacher and student, per case and on average.
3. End-to-end fusion of a 224-band scene to 512×512 and 2048×2048 outputs against
   `gdalwarp -r cubic` writing the same grid with the same creation options: time, ratio,
   peak memory (each run in its own process), on the idle machine and again beside busy
   processes (a desktop doing other work), with the torch thread count the fusion chose.

Results are printed and saved to build/bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "build" / "bench" / "results.json"
PAPER = {
    "paper teacher": {"params_m": 26.8, "gmacs": 942, "seconds": 9.8},
    "paper student": {"params_m": 7.44, "gmacs": 145, "seconds": 1.77},
}


def _time_forward(run, repeats: int) -> float:
    run()  # warm-up: the first call builds the convolution kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def network_costs(repeats: int) -> List[Dict]:
    import torch

    from .api import load_model
    from .bundle import default_model_path
    from .model import SceneStatistics
    from .network import CSAKDNet, count_macs, count_parameters, paper_student_config, paper_teacher_config

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
    lr_np = rng.random((172, 64, 64), dtype=np.float32)
    hr_np = rng.random((4, 256, 256), dtype=np.float32)
    for role in ("teacher", "student"):
        path = default_model_path().with_name(f"csakd_{role}.json")
        model, card = load_model(path, "cpu")
        k = model.config.subspace_dim
        stats = SceneStatistics.estimate(lr_np, hr_np[:, ::4, ::4], k).to_tensors()
        lr, hr = torch.from_numpy(lr_np)[None], torch.from_numpy(hr_np)[None]
        with torch.inference_mode():
            seconds = _time_forward(lambda: model(lr, hr, stats), repeats)
        rows.append({"model": f"bundled {role}", "params": count_parameters(model),
                     "macs": count_macs(model.network, (1, k, 64, 64), (1, k, 256, 256)), "seconds": seconds,
                     "note": "same 172-band tile, incl. subspace projection and full-spectrum output"})
    return rows


def quality(data_dir=None) -> Dict:
    from .api import fuse_arrays, load_model
    from .bundle import default_model_path
    from .datasets import validation_cases
    from .train import baseline_metrics, summarise, _metrics

    cases = validation_cases(data_dir)
    table = baseline_metrics(cases)
    for role in ("teacher", "student"):
        model, _ = load_model(default_model_path().with_name(f"csakd_{role}.json"), "cpu")
        table[role] = [_metrics(c, fuse_arrays(c.lr_hsi, c.hr_msi, model=model)) for c in cases]
    return {"cases": table, "summary": {name: summarise(rows) for name, rows in table.items()}}


def adaptation(minutes: float, data_dir=None) -> Dict:
    """The bundled student adapted for ``minutes`` to the real Berlin pair (EnMAP 30 m + HyMap 3.6 m),
    measured on the held-out fifth of the scene's own Wald-degraded pair."""
    from .api import load_model
    from .bundle import default_model_path
    from .datasets import default_data_dir
    from .user_training import adapt_to_scene, scene_from_pair

    berlin = Path(data_dir or default_data_dir()) / "berlin"
    scene = scene_from_pair(berlin / "EnMAP_BerlinUrbanGradient_177b_30m.bsq",
                            berlin / "HighResolution_BerlinUrbanGradient_HyMap4b_3m6.bsq")
    student, _ = load_model(default_model_path(), "cpu")
    _, report = adapt_to_scene(student, scene.reference, scene.msi, scene.scale, minutes, log=print)
    return {"scene": "Berlin EnMAP 30 m + HyMap 3.6 m (working scale %d)" % scene.scale, "minutes": report.minutes,
            "steps": report.steps, "psnr_bundled": report.psnr_before, "psnr_adapted": report.psnr_after}


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
    from .api import fuse_arrays, load_model
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
                "student": _metrics(case, fuse_arrays(case.lr_hsi, case.hr_msi, model=student)),
            })
    return {"cases": rows}


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


def end_to_end(sizes=(512, 2048), data_dir=None, load_processes=None) -> List[Dict]:
    """Fusion against gdalwarp per size, on an idle machine and beside ``load_processes`` busy
    processes (default: half the cores, at least one), in one run so the rows compare."""
    from .threads import usable_cores

    load_processes = max(1, usable_cores() // 2) if load_processes is None else load_processes
    rows = []
    with tempfile.TemporaryDirectory(prefix="csakd-bench-") as folder:
        folder = Path(folder)
        for size in sizes:
            lr_path, hr_path = make_scene(folder / "inputs", size, data_dir=data_dir)
            for condition, processes in (("idle", 0), (f"{load_processes} busy process(es)", load_processes)):
                with competing_load(processes):
                    row = _fusion_against_gdalwarp(folder, size, lr_path, hr_path)
                row["load"] = condition
                rows.append(row)
    return rows


def _fusion_against_gdalwarp(folder: Path, size: int, lr_path: Path, hr_path: Path) -> Dict:
    import rasterio

    fused = folder / f"fused{size}.tif"
    fusion = _run_measured([sys.executable, "-c", _FUSION % (str(ROOT), str(lr_path), str(hr_path), str(fused))])
    with rasterio.open(fused) as out:
        bounds, res, count = out.bounds, out.res, out.count
    options = ["-co", "TILED=YES", "-co", "BLOCKXSIZE=256", "-co", "BLOCKYSIZE=256", "-co", "COMPRESS=DEFLATE",
               "-co", "PREDICTOR=3", "-co", "NUM_THREADS=ALL_CPUS", "-co", "BIGTIFF=IF_SAFER", "-co", "INTERLEAVE=BAND"]
    warped = folder / f"gdalwarp{size}.tif"
    warp = _run_measured(
        ["gdalwarp", "-q", "-r", "cubic", "-multi", "-wo", "NUM_THREADS=ALL_CPUS", "-ot", "Float32",
         "-te", *map(str, (bounds.left, bounds.bottom, bounds.right, bounds.top)), "-tr", str(res[0]), str(res[1]),
         "-dstnodata", "-9999", *options, str(lr_path), str(warped)]
    )
    row = {"output": f"{size}×{size}×{count}", "fusion_seconds": fusion["seconds"],
           "fusion_peak_mb": fusion["peak_mb"], "gdalwarp_seconds": warp["seconds"],
           "gdalwarp_peak_mb": warp["peak_mb"], "ratio": fusion["seconds"] / warp["seconds"],
           "fused_mb": fused.stat().st_size / 1e6, "gdalwarp_mb": warped.stat().st_size / 1e6,
           "threads": next((line for line in fusion["stdout"].splitlines() if "thread(s)" in line), "")}
    fused.unlink()
    warped.unlink()
    return row


def criteria(results: Dict) -> List[str]:
    """The bundled student against the better of GSA and bicubic, case by case."""
    table = results["quality"]["cases"]
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
    summary = results["quality"]["summary"]
    lines.append(f"teacher against student: mean PSNR {summary['teacher']['psnr']:.2f} vs {summary['student']['psnr']:.2f} dB, "
                 f"SAM {summary['teacher']['sam']:.2f} vs {summary['student']['sam']:.2f}°; higher PSNR on {teacher_ahead}/{n} cases")
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
    print("1. Network size and cost (per 256×256 output tile, 172 bands, 4-band MSI, ×4)")
    print(f"{'model':16s} {'params':>10s} {'GMAC':>8s} {'s/tile':>8s}   paper: params / GMAC / s on this CPU")
    for row in results["costs"]:
        paper = PAPER.get(row["model"])
        ref = f"{paper['params_m']} M / {paper['gmacs']} G / {paper['seconds']} s" if paper else ""
        print(f"{row['model']:16s} {row['params'] / 1e6:9.2f}M {row['macs'] / 1e9:8.1f} {row['seconds']:8.3f}   {ref}")
    costs = {r["model"]: r for r in results["costs"]}
    if "paper student" in costs and "bundled student" in costs:
        print(f"bundled student is {costs['paper student']['seconds'] / costs['bundled student']['seconds']:.1f}× faster "
              "than the paper's student configuration on the same tile")
    print("\n2. Quality, Wald protocol on validation cubes never trained on (PSNR dB / SAM ° / ERGAS)")
    table = results["quality"]["cases"]
    methods = ["bicubic", "gsa", "teacher", "student"]
    print(f"{'cube':24s} {'sensor':16s} {'s':>2s}  " + "  ".join(f"{m:>20s}" for m in methods))
    for i, case in enumerate(table["bicubic"]):
        cells = "  ".join(f"{table[m][i]['psnr']:6.2f}/{table[m][i]['sam']:5.2f}/{table[m][i]['ergas']:5.2f}" for m in methods)
        print(f"{case['cube'][:24]:24s} {case['sensor'][:16]:16s} {case['scale']:2d}  {cells}")
    summary = results["quality"]["summary"]
    cells = "  ".join(f"{summary[m]['psnr']:6.2f}/{summary[m]['sam']:5.2f}/{summary[m]['ergas']:5.2f}" for m in methods)
    print(f"{'mean':24s} {'':16s} {'':2s}  {cells}")
    for line in criteria(results):
        print(line)
    if results.get("robustness"):
        print("\n2b. Robustness, scale 4, Sentinel-2 10 m (PSNR dB / SAM °)")
        print(f"{'cube':24s} {'variant':18s} " + "  ".join(f"{m:>14s}" for m in ("bicubic", "gsa", "student")))
        for row in results["robustness"]["cases"]:
            cells = "  ".join(f"{row[m]['psnr']:6.2f}/{row[m]['sam']:6.2f}" for m in ("bicubic", "gsa", "student"))
            print(f"{row['bicubic']['cube'][:24]:24s} {row['bicubic']['sensor']:18s} {cells}")
    if results.get("adaptation"):
        a = results["adaptation"]
        print(f"\n2c. Scene adaptation on {a['scene']}: {a['steps']} steps in {a['minutes']:.1f} min; "
              f"held-out PSNR bundled {a['psnr_bundled']:.2f} dB → adapted {a['psnr_adapted']:.2f} dB")
    if results.get("end_to_end"):
        print("\n3. End-to-end: 224-band scene → GeoTIFF on the MSI grid (same creation options)")
        print(f"{'output':18s} {'load':22s} {'fusion s':>9s} {'gdalwarp s':>11s} {'ratio':>6s} {'fusion peak MB':>15s} {'gdalwarp peak MB':>17s}")
        for row in results["end_to_end"]:
            print(f"{row['output']:18s} {row.get('load', 'idle'):22s} {row['fusion_seconds']:9.1f} {row['gdalwarp_seconds']:11.1f} "
                  f"{row['ratio']:6.2f} {row['fusion_peak_mb']:15.0f} {row['gdalwarp_peak_mb']:17.0f}   {row.get('threads', '')}")


def markdown(results: Dict) -> str:
    """The same tables in Markdown, for the README."""
    out = [f"Measured {results['date']} on {results['machine']} (`make bench`).", ""]
    out += ["| model | parameters | GMAC per 256² tile | seconds per 256² tile (172 bands) | paper |", "|---|---|---|---|---|"]
    for row in results["costs"]:
        paper = PAPER.get(row["model"])
        ref = f"{paper['params_m']} M, {paper['gmacs']} G, {paper['seconds']} s" if paper else ""
        out.append(f"| {row['model']} | {row['params'] / 1e6:.2f} M | {row['macs'] / 1e9:.1f} | {row['seconds']:.3f} | {ref} |")
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
    out += [""] + [f"- {line}" for line in criteria(results)]
    if results.get("adaptation"):
        a = results["adaptation"]
        out += ["", f"Scene adaptation, {a['scene']}: {a['steps']} steps in {a['minutes']:.1f} min; held-out PSNR "
                f"{a['psnr_bundled']:.2f} dB (bundled) → {a['psnr_adapted']:.2f} dB (adapted)."]
    if results.get("end_to_end"):
        out += ["", "End to end, 224-band scene → GeoTIFF on the MSI grid, against `gdalwarp -r cubic` writing the same grid with the same creation options:", "",
                "| output | load | fusion s | gdalwarp s | ratio | fusion peak MB | gdalwarp peak MB |", "|---|---|---|---|---|---|---|"]
        for row in results["end_to_end"]:
            out.append(f"| {row['output']} | {row.get('load', 'idle')} | {row['fusion_seconds']:.1f} | {row['gdalwarp_seconds']:.1f} | "
                       f"{row['ratio']:.2f} | {row['fusion_peak_mb']:.0f} | {row['gdalwarp_peak_mb']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="*", default=[512, 2048], help="end-to-end output sizes")
    parser.add_argument("--adapt-minutes", type=float, default=20.0, help="scene adaptation budget (0 = skip)")
    parser.add_argument("--data", default=None)
    args = parser.parse_args(argv)
    import torch

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads), {platform.python_version()}",
    }
    # Everything timed comes first, while the machine is at its quietest.
    print("measuring network costs…", flush=True)
    results["costs"] = network_costs(args.repeats)
    if args.sizes:
        print("measuring end-to-end fusion against gdalwarp…", flush=True)
        results["end_to_end"] = end_to_end(args.sizes, args.data)
    print("measuring quality on the validation cubes…", flush=True)
    results["quality"] = quality(args.data)
    results["robustness"] = robustness(args.data)
    if args.adapt_minutes > 0:
        print(f"adapting the student to the Berlin scene for {args.adapt_minutes:g} minutes…", flush=True)
        results["adaptation"] = adaptation(args.adapt_minutes, args.data)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text(markdown(results))
    print_report(results)
    print(f"\nsaved {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
