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
import sysconfig
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


CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def externally_managed() -> bool:
    """Whether the running Python is marked as managed by the system's package manager (PEP 668),
    as Debian 12+ and Ubuntu 23.04+ do; pip then needs --break-system-packages even with --user."""
    return (Path(sysconfig.get_paths()["stdlib"]) / "EXTERNALLY-MANAGED").exists()


def linux_instructions(python: str, managed: bool, has_pip: bool) -> str:
    """Terminal commands that give ``python`` a CPU torch in the user's own site-packages."""
    steps = []
    if not has_pip:
        steps.append("sudo apt install python3-pip")
    # Older pip (Ubuntu 22.04's) rejects the flag; only PEP 668 systems need it.
    flag = " --break-system-packages" if managed else ""
    steps.append(f"{python} -m pip install --user{flag} torch --index-url {CPU_INDEX}")
    return (
        "on Debian 13 or newer run `sudo apt install python3-torch`; elsewhere run in a terminal:\n"
        + "\n".join(f"    {step}" for step in steps)
        + "\n(the CPU build from PyTorch's own index; keep QGIS's numpy: do not upgrade numpy alongside)"
    )


def missing_torch_message() -> str:
    python = qgis_python()
    system = platform.system()
    if system == "Windows":
        how = (
            "open the OSGeo4W Shell (Start menu ▸ QGIS ▸ OSGeo4W Shell) and run:\n"
            f"    python -m pip install --user torch --index-url {CPU_INDEX}"
        )
    elif system == "Darwin":
        # Into the user's site-packages: writing into the signed QGIS.app bundle breaks its signature.
        how = f"run in a terminal:\n    {python} -m pip install --user torch"
    else:
        how = linux_instructions(python, externally_managed(), importlib.util.find_spec("pip") is not None)
    return (
        "Hyperspectral Fusion needs PyTorch, which QGIS's Python cannot import. To install the CPU build, "
        f"{how}\nthen restart QGIS."
    )
