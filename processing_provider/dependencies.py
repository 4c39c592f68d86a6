"""torch inside QGIS's Python: detection, and instructions when it is missing.

The plugin must load without torch (so the toolbox can tell users what to do); only running
an algorithm needs it. ``make install`` may record extra library folders in
``python_path.txt`` in the plugin folder (one per line); they are appended to sys.path —
after QGIS's own folders, so QGIS's numpy and GDAL always win.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path

EXTRA_PATHS_FILE = Path(__file__).resolve().parent.parent / "python_path.txt"


def add_recorded_library_paths() -> None:
    if not EXTRA_PATHS_FILE.exists():
        return
    for line in EXTRA_PATHS_FILE.read_text().splitlines():
        folder = line.strip()
        if folder and Path(folder).is_dir() and folder not in sys.path:
            sys.path.append(folder)


def torch_available() -> bool:
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
