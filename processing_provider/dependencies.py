"""torch inside QGIS's Python: detection, and instructions when it is missing.

The plugin must load without torch (so the toolbox can tell users what to do); only running
an algorithm needs it. ``make install`` may record extra library folders in
``python_path.txt`` in the plugin folder (one per line): the environment the tests run in,
which holds torch and the versions of its dependencies torch needs. They go ahead of the
system's site-packages/dist-packages in sys.path, as they are inside that environment: Debian
12's QGIS pulls in sympy 1.11, and torch 2.13 fails with it (``cannot import name
'equal_valued'``) once an optimizer is built (scene adaptation, training). They stay behind
the standard library and QGIS's own folders, and numpy, GDAL and rasterio are never in that
environment (it uses the system's, see requirements.txt), so QGIS's copies still win.
"""

from __future__ import annotations

import importlib.util
import platform
import re
import sys
from pathlib import Path

EXTRA_PATHS_FILE = Path(__file__).resolve().parent.parent / "python_path.txt"


def _first_site_packages_index() -> int:
    for index, entry in enumerate(sys.path):
        if Path(entry).name in ("site-packages", "dist-packages"):
            return index
    return len(sys.path)


def add_recorded_library_paths() -> None:
    """Put the folders in python_path.txt just ahead of the first site-packages/dist-packages folder."""
    if not EXTRA_PATHS_FILE.exists():
        return
    folders = [line.strip() for line in EXTRA_PATHS_FILE.read_text().splitlines()]
    # A folder of another Python version (QGIS 4 may bring its own Python) holds modules
    # built for that version: skipped, so the missing-torch message explains what to do.
    running = f"python{sys.version_info.major}.{sys.version_info.minor}"
    folders = [
        folder for folder in folders
        if folder and Path(folder).is_dir()
        and all(part == running for part in Path(folder).parts if re.fullmatch(r"python\d+\.\d+", part))
    ]
    for folder in reversed(folders):
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(_first_site_packages_index(), folder)


def torch_available() -> bool:
    """Whether torch can be imported; first makes recorded folders visible and, before torch is
    loaded, asks OpenMP for passive waiting (csakd_qgis.threads)."""
    from ..csakd_qgis.threads import prefer_passive_waiting

    prefer_passive_waiting()
    add_recorded_library_paths()
    return importlib.util.find_spec("torch") is not None


def qgis_python() -> str:
    """The interpreter behind QGIS's Python (sys.executable is the QGIS binary in the desktop)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (Path(sys.exec_prefix) / "bin" / version, Path(sys.exec_prefix) / "bin" / "python3"):
        if candidate.exists():
            return str(candidate)
    return "python3"


def missing_torch_message() -> str:
    python = qgis_python()
    system = platform.system()
    if system == "Windows":
        how = (
            "open the OSGeo4W Shell (Start menu ▸ QGIS ▸ OSGeo4W Shell) and run:\n"
            "    python -m pip install torch --index-url https://download.pytorch.org/whl/cpu"
        )
    elif system == "Darwin":
        how = (
            "run in a terminal:\n"
            "    /Applications/QGIS.app/Contents/MacOS/bin/python3 -m pip install torch"
        )
    else:
        how = (
            "run in a terminal:\n"
            f"    {python} -m pip install --user --break-system-packages 'torch' "
            "--index-url https://download.pytorch.org/whl/cpu\n"
            "(keep QGIS's numpy: do not upgrade numpy alongside)"
        )
    return (
        "Hyperspectral Fusion needs PyTorch, which QGIS's Python cannot import. To install the CPU build, "
        f"{how}\nthen restart QGIS."
    )
