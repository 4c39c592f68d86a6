"""Many scenes: one fusion per Dask task, on the cores of one machine or the machines of a cluster.

Dask's distributed scheduler does the scheduling, the retries of a scene whose worker died
(``distributed.scheduler.allowed-failures`` deaths per task, 3 by default) and the dashboard;
this module reads the pairs file, runs a scene on a worker (``fuse_scene``) and writes the
results file. ``dask.distributed`` is imported here only, when a batch runs: the QGIS plugin
never needs it.

Pairs file (CSV, header line): ``lrhsi,hrmsi`` and optionally ``output`` and any of the
fusion options of the command line by their engine names (``model``, ``psf``, ``tile_size``,
``overlap``, ``device``, ``bands``, ``output_dtype``, ``creation_options``, ``adapt_minutes``,
``scene_correction``)
for options of that scene alone; an empty cell takes the batch's value. Relative input and model
paths are relative to the pairs file's folder, relative outputs to the output folder; GDAL
virtual paths (``/vsis3/…``, ``/vsicurl/…``) are passed on as they are.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

from .cli import OPTION_BY_KEYWORD, engine_options

RESULTS_FILE = "results.csv"
RESULT_COLUMNS = ("lrhsi", "hrmsi", "output", "status", "message", "seconds", "worker", "output_bytes")
PATH_COLUMNS = ("lrhsi", "hrmsi", "output")
PATH_OPTIONS = ("model",)


class BatchError(ValueError):
    """The pairs file or the batch's arguments are wrong; nothing was run."""


@dataclass
class Scene:
    """One pair to fuse: absolute paths (or GDAL virtual paths) and fuse_files keywords."""

    line: int  # in the pairs file
    lrhsi: str
    hrmsi: str
    output: str
    options: Dict = field(default_factory=dict)


def _is_virtual(path: str) -> bool:
    return path.startswith("/vsi") or "://" in path


def _absolute(path: str, base: Path) -> str:
    return path if _is_virtual(path) else str((base / Path(path).expanduser()).resolve())


def read_pairs(pairs_csv: Union[str, Path], out_dir: Union[str, Path], defaults: Optional[Dict] = None) -> List[Scene]:
    """The scenes of a pairs file; ``defaults`` (fuse_files keywords) apply where a row gives
    no option of its own. Raises BatchError naming the file and line of what is wrong."""
    pairs_csv, out_dir = Path(pairs_csv), Path(out_dir).resolve()
    base = pairs_csv.resolve().parent
    try:
        with open(pairs_csv, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except OSError as error:
        raise BatchError(f"cannot read the pairs file {pairs_csv}: {error.strerror}") from None
    header = [name.strip() for name in rows[0]] if rows else []
    if not {"lrhsi", "hrmsi"} <= set(header):
        raise BatchError(f"{pairs_csv}: the first line must be a header naming the columns lrhsi,hrmsi "
                         f"(and optionally output and option columns); it is {','.join(header) or 'empty'}")
    unknown = [name for name in header if name not in PATH_COLUMNS and name not in OPTION_BY_KEYWORD]
    if unknown:
        raise BatchError(f"{pairs_csv}: unknown column(s) {', '.join(unknown)}; columns are "
                         f"{', '.join(PATH_COLUMNS + tuple(OPTION_BY_KEYWORD))}")
    scenes, by_output = [], {}
    for line, values in enumerate(rows[1:], start=2):
        if not any(value.strip() for value in values):
            continue  # blank line
        if len(values) > len(header):
            raise BatchError(f"{pairs_csv} line {line}: {len(values)} cells for {len(header)} columns "
                             "(quote a cell that holds commas)")
        row = {name: value.strip() for name, value in zip(header, values)}
        if not row.get("lrhsi") or not row.get("hrmsi"):
            raise BatchError(f"{pairs_csv} line {line}: both lrhsi and hrmsi are needed")
        given = {name: value for name, value in row.items() if name in OPTION_BY_KEYWORD}
        for name in PATH_OPTIONS:
            if given.get(name):
                given[name] = _absolute(given[name], base)
        try:
            options = {**(defaults or {}), **engine_options(given, where=f"{pairs_csv} line {line}: ")}
        except ValueError as error:
            raise BatchError(str(error)) from None
        lrhsi = _absolute(row["lrhsi"], base)
        output = row.get("output") or f"{Path(row['lrhsi']).stem}_fused.tif"
        output = str((out_dir / Path(output).expanduser()).resolve())
        if output in by_output:
            raise BatchError(f"{pairs_csv} lines {by_output[output]} and {line} write the same output {output}")
        by_output[output] = line
        scenes.append(Scene(line, lrhsi, _absolute(row["hrmsi"], base), output, options))
    if not scenes:
        raise BatchError(f"{pairs_csv} lists no pairs")
    return scenes


# A worker fuses one scene at a time with all its threads: with several threads Dask would
# start several scenes at once, each with as many torch threads as the worker has.
_ONE_SCENE_AT_A_TIME = threading.Lock()


def _this_worker():
    """(name for the results file, threads the worker was given or None outside a worker)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return socket.gethostname(), None
    state = getattr(worker, "state", None)  # Worker.state holds nthreads since distributed 2022.11
    threads = state.nthreads if state is not None else worker.nthreads
    return worker.address, threads


def fuse_scene(scene: Scene) -> Dict:
    """Runs one scene (on a worker): skips it when its output is up to date (provenance.py),
    fuses it otherwise. Returns its row of the results file; a scene that fails is a row with
    status ``failed`` and the error's message, not an exception, so the others go on.

    The model is loaded once per worker process (api.load_model keeps it) and torch uses the
    threads the worker was given.
    """
    from .georaster import FusionInputError
    from .provenance import fuse_recorded, recipe, up_to_date

    worker, threads = _this_worker()
    with _ONE_SCENE_AT_A_TIME:
        started = time.perf_counter()
        result = {"lrhsi": scene.lrhsi, "hrmsi": scene.hrmsi, "output": scene.output, "worker": worker}
        try:
            if threads:
                import torch

                torch.set_num_threads(threads)
            made_of = recipe(scene.lrhsi, scene.hrmsi, scene.options)
            if up_to_date(scene.output, made_of):
                result.update(status="skipped", message="up to date: made from the same inputs, model and options")
            else:
                lines = []
                fuse_recorded(scene.lrhsi, scene.hrmsi, scene.output, scene.options, log=lines.append, made_of=made_of)
                result.update(status="done", message=lines[-1] if lines else "")
        except (FusionInputError, ValueError) as error:  # bad input, damaged model (BundleError)
            result.update(status="failed", message=str(error))
        except Exception as error:  # out of disk, out of memory, …: reported, the batch goes on
            result.update(status="failed", message=f"{type(error).__name__}: {error}")
        result["seconds"] = round(time.perf_counter() - started, 2)
    done = result["status"] != "failed" and os.path.isfile(scene.output)
    result["output_bytes"] = os.path.getsize(scene.output) if done else ""
    return result


def _start_client(stack: ExitStack, scheduler: Optional[str], workers: Optional[int], dashboard_address):
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return stack.enter_context(Client(scheduler, timeout="30s"))
        except OSError as error:
            raise BatchError(f"cannot reach the Dask scheduler at {scheduler}: {error}") from None
    if workers is not None and workers < 1:
        raise BatchError(f"--workers must be at least 1, not {workers}")
    cluster = stack.enter_context(LocalCluster(
        n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
        dashboard_address=dashboard_address,
    ))
    return stack.enter_context(Client(cluster))


def _dashboard(client, local: bool) -> Optional[str]:
    """A line with the dashboard's address, or saying why there is none."""
    import importlib.util

    if "dashboard" not in client.scheduler_info().get("services", {}):
        return None
    if local and importlib.util.find_spec("bokeh") is None:
        # The scheduler still serves the address, with a page asking for bokeh.
        import distributed

        return f"no Dask dashboard: it needs the bokeh package in the version distributed {distributed.__version__} asks for"
    return f"Dask dashboard: {client.dashboard_link}"


def run_batch(
    pairs_csv: Union[str, Path],
    out_dir: Union[str, Path],
    options: Optional[Dict] = None,
    scheduler: Optional[str] = None,
    workers: Optional[int] = None,
    client=None,
    dashboard_address: Optional[str] = ":8787",
    echo: Callable[[str], None] = lambda message: None,
    progress_bar: bool = True,
) -> List[Dict]:
    """Fuse every pair of ``pairs_csv``, one Dask task per scene; returns the rows written to
    ``out_dir``/results.csv (columns RESULT_COLUMNS, in the order scenes finished).

    ``options``: fuse_files keywords for every scene (a row's own option cells win).
    The scenes run on ``client`` when given, else on a scheduler at the address ``scheduler``,
    else on a LocalCluster of ``workers`` single-threaded processes (default: one per CPU).
    ``echo`` receives a line per scene and the summary (with ``progress_bar``, it should
    print through ``tqdm.write``, as cli.say does, to keep the bar whole). Raises BatchError when the pairs file
    is wrong or the scheduler cannot be reached.
    """
    out_dir = Path(out_dir).resolve()
    options = dict(options or {})
    if options.get("model"):
        options["model"] = _absolute(str(options["model"]), Path.cwd())
    scenes = read_pairs(pairs_csv, out_dir, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        local = client is None and not scheduler
        if client is None:
            client = _start_client(stack, scheduler, workers, dashboard_address)
        dashboard = _dashboard(client, local)
        if dashboard:
            echo(dashboard)
        count = len(client.scheduler_info().get("workers", {}))
        echo(f"{len(scenes)} scene(s) on {count} worker(s) of {client.scheduler.address}")
        futures = {client.submit(fuse_scene, scene, key=f"fuse-{Path(scene.output).stem}-{scene.line}"): scene
                   for scene in scenes}
        results = _collect(futures, out_dir / RESULTS_FILE, echo, progress_bar)
    counts = {status: sum(r["status"] == status for r in results) for status in ("done", "skipped", "failed")}
    echo(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed; "
         f"results in {out_dir / RESULTS_FILE}")
    return results


def _collect(futures: Dict, results_csv: Path, echo, progress_bar: bool) -> List[Dict]:
    """Waits for the scenes as they finish, writing each one's row at once (an interrupted
    batch leaves the rows of what finished)."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    bar = None
    if progress_bar:
        from .cli import _progress_bar

        bar = _progress_bar(total=len(futures), unit="scene", desc="scenes")
    results = []
    with open(results_csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, RESULT_COLUMNS)
        writer.writeheader()
        for future in as_completed(futures):
            scene = futures[future]
            try:
                result = future.result()
            except KilledWorker as error:
                result = _failed(scene, f"every worker that fused this scene died while on it ({error}); "
                                        "it may need more memory than a worker has")
            except Exception as error:  # e.g. a worker without the engine cannot unpickle the task
                result = _failed(scene, f"{type(error).__name__}: {error}")
            results.append(result)
            writer.writerow(result)
            handle.flush()
            echo(_describe(result))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return results


def _failed(scene: Scene, message: str) -> Dict:
    from .provenance import partial_folder

    # A worker killed outright leaves its partial folder behind; its retry would have removed it.
    shutil.rmtree(partial_folder(scene.output), ignore_errors=True)
    return {"lrhsi": scene.lrhsi, "hrmsi": scene.hrmsi, "output": scene.output, "status": "failed",
            "message": message, "seconds": "", "worker": "", "output_bytes": ""}


def _describe(result: Dict) -> str:
    if result["status"] == "failed":
        return f"failed  {result['lrhsi']}: {result['message']}"
    return f"{result['status']:7s} {result['output']} ({result['seconds']} s on {result['worker']})"
