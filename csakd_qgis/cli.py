"""The command line: ``python -m csakd_qgis fuse …`` and ``python -m csakd_qgis batch …``.

``fuse`` runs the engine's ``fuse_files`` on one pair, with a progress bar and the log lines the
QGIS algorithm shows; ``batch`` spreads the pairs of a CSV file over a Dask cluster (batch.py).
Neither needs QGIS. Exit status: 0 done, 1 the fusion failed (the message says why; in a batch:
at least one scene failed, see results.csv), 2 wrong arguments or pairs file, 130 interrupted.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def parse_bands(text: str) -> List[int]:
    """'1-50,60 70-72' → [1, …, 50, 60, 70, 71, 72] (1-based band numbers; commas, semicolons
    or spaces between items)."""
    bands = []
    for item in re.split(r"[,;\s]+", text.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise ValueError(f"'{item}' is not a band number or range (e.g. 1-50,60)")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ValueError(f"the band range '{item}' runs backwards")
        bands.extend(range(first, last + 1))
    return bands


def parse_creation_options(text: str) -> Dict[str, str]:
    """'COMPRESS=ZSTD ZSTD_LEVEL=9' (spaces, commas or semicolons between) → GDAL creation options."""
    options = {}
    for item in re.split(r"[,;\s]+", text.strip()):
        if item:
            key, equals, value = item.partition("=")
            if not equals or not key:
                raise ValueError(f"creation option '{item}' is not of the form KEY=VALUE (e.g. COMPRESS=ZSTD)")
            options[key.upper()] = value
    return options


def parse_switch(text: str) -> bool:
    """'on', 'yes', 'true', '1' → True; 'off', 'no', 'false', '0' → False (any case); else ValueError."""
    value = str(text).strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise ValueError(f"'{text}' is not on or off")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed and not (text.startswith("cuda:") and "cuda" in allowed):
            raise ValueError(f"'{text}' is not one of {', '.join(allowed)}")
        return text

    return parse


@dataclass(frozen=True)
class Option:
    """A fuse_files keyword as a command-line flag and as a column of a batch's pairs file."""

    keyword: str
    flag: str
    parse: Callable[[str], Any]
    help: str


OPTIONS = (
    Option("model", "--model", str, "model bundle: its .json card or .pt weights (default: the bundled student)"),
    Option("psf", "--psf", str, "the LR-HSI's point spread function, passed to the engine's psf option "
           "(an error where this version of the engine has none)"),
    Option("tile_size", "--tile-size", int, "output pixels per tile side (default 256)"),
    Option("overlap", "--overlap", int, "output pixels tiles overlap by (default 32)"),
    Option("device", "--device", _choice("auto", "cpu", "cuda"), "auto, cpu, cuda or cuda:N (default auto)"),
    Option("bands", "--bands", parse_bands, "LR-HSI bands to fuse, 1-based, e.g. 1-50,60 (default all)"),
    Option("output_dtype", "--output-type", _choice("float32", "int16", "uint16"), "float32 (default), int16 or uint16"),
    Option("creation_options", "--creation-options", parse_creation_options,
           "GDAL GeoTIFF creation options, e.g. 'COMPRESS=ZSTD ZSTD_LEVEL=9'"),
    Option("adapt_minutes", "--adapt-minutes", float, "scene adaptation before fusing, minutes (default 0 = off)"),
    Option("scene_correction", "--scene-correction", parse_switch,
           "fit the scene's own pixel-wise correction on its reduced pairs and apply it where its check passes: "
           "on (default) or off"),
)
OPTION_BY_KEYWORD = {option.keyword: option for option in OPTIONS}


def engine_options(given: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    """The options of ``given`` (keyword → text or value; None or '' = not given) parsed and
    checked against what this version of the engine accepts. Raises ValueError naming
    ``where`` the option came from."""
    from .provenance import engine_keywords

    accepted = engine_keywords()
    options = {}
    for keyword, value in given.items():
        if value is None or value == "":
            continue
        option = OPTION_BY_KEYWORD.get(keyword)
        if option is None:
            raise ValueError(f"{where}unknown option '{keyword}'; options are {', '.join(OPTION_BY_KEYWORD)}")
        if keyword not in accepted:
            raise ValueError(f"{where}{option.flag}: this version of the engine has no '{keyword}' option")
        try:
            options[keyword] = option.parse(value) if isinstance(value, str) else value
        except ValueError as error:
            raise ValueError(f"{where}{option.flag}: {error}") from None
    return options


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fusion options (as in the QGIS algorithm)")
    for option in OPTIONS:
        metavar = "{on,off}" if option.parse is parse_switch else option.flag[2:].upper().replace("-", "_")
        group.add_argument(option.flag, dest=option.keyword, default=None, metavar=metavar, help=option.help)


def _given(args: argparse.Namespace) -> Dict[str, Any]:
    return {option.keyword: getattr(args, option.keyword) for option in OPTIONS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m csakd_qgis",
        description="CSAKD hyperspectral + multispectral fusion without QGIS.",
        epilog="Exit status: 0 done, 1 fusion failed, 2 wrong arguments or pairs file, 130 interrupted.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{fuse,batch}")
    fuse = commands.add_parser("fuse", help="fuse one pair into a GeoTIFF",
                               description="Fuse a low-resolution hyperspectral image with a high-resolution "
                                           "multispectral one into a GeoTIFF on the multispectral grid.")
    fuse.add_argument("lrhsi", help="low-resolution hyperspectral image (any raster GDAL reads)")
    fuse.add_argument("hrmsi", help="high-resolution multispectral image")
    fuse.add_argument("output", help="the fused GeoTIFF (.tif) to write")
    fuse.add_argument("--quiet", action="store_true", help="no progress bar and no log lines")
    _add_engine_options(fuse)

    batch = commands.add_parser(
        "batch", help="fuse the pairs of a CSV file on a Dask cluster",
        description="Fuse every pair of PAIRS.csv (header lrhsi,hrmsi[,output][,option columns]), one scene per "
                    "Dask task, on a local cluster of single-threaded worker processes or on a running scheduler. "
                    "Outputs already made from the same inputs, model and options are skipped; DIR/results.csv "
                    "lists every scene.")
    batch.add_argument("pairs", help="CSV file: lrhsi,hrmsi[,output] and optional per-scene option columns")
    batch.add_argument("--out-dir", required=True, help="folder for outputs without a path of their own and results.csv")
    where = batch.add_mutually_exclusive_group()
    where.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://head-node:8786")
    where.add_argument("--workers", type=int, help="local worker processes of one thread each (default: one per CPU)")
    _add_engine_options(batch)
    return parser


def _fuse(args: argparse.Namespace) -> int:
    from .georaster import FusionInputError
    from .provenance import fuse_recorded

    try:
        options = engine_options(_given(args))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    bar = None if args.quiet else _progress_bar(total=100, desc="fusing",
                                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
    log = (lambda message: None) if args.quiet else say

    def progress(fraction: float) -> None:
        bar.update(round(100 * fraction, 1) - bar.n)

    try:
        report = fuse_recorded(args.lrhsi, args.hrmsi, args.output, options, log=log,
                               progress=progress if bar is not None else None)
    except (FusionInputError, ValueError) as error:  # BundleError is a ValueError
        say(f"error: {error}")
        return EXIT_FAILED
    finally:
        if bar is not None:
            bar.close()
    log(f"done in {report.seconds:.1f} s on {report.device}")
    return 0


def _batch(args: argparse.Namespace) -> int:
    from .batch import BatchError, run_batch

    try:
        defaults = engine_options(_given(args))
        results = run_batch(args.pairs, args.out_dir, defaults, scheduler=args.scheduler, workers=args.workers,
                            echo=say)
    except (BatchError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_FAILED if any(r["status"] == "failed" for r in results) else 0


def _progress_bar(**options):
    """A tqdm bar on stderr, or None where tqdm is not installed (the run works without)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(file=sys.stderr, dynamic_ncols=True, **options)


def say(message: str) -> None:
    """Prints a line on stderr, above any progress bar of tqdm's."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(message, file=sys.stderr, flush=True)
    else:
        tqdm.write(message, file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _fuse(args) if args.command == "fuse" else _batch(args)
    except KeyboardInterrupt:
        print("interrupted; no partial output is left at any output path", file=sys.stderr)
        return EXIT_INTERRUPTED
