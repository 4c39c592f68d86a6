"""Give a Python environment a CPU build of PyTorch, without ever pulling in a CUDA build.

Where torch comes from, in this order:

1. torch that the environment can already import at version >= MINIMUM_TORCH, e.g. the
   distribution's own ``python3-torch`` (Debian 13 has 2.6, sid 2.14) seen through the virtual
   environment's system site packages: kept, nothing is installed.
2. ``torch==<TORCH_VERSION>+cpu`` through pip as configured (a wheel folder on local disk, a mirror).
3. The same pin from PyTorch's CPU wheel index (``TORCH_INDEX_URL``, default
   https://download.pytorch.org/whl/cpu) as an extra index beside pip's own.

The ``+cpu`` local version is what keeps CUDA out: the public Python package index has no ``+cpu``
builds, and its plain ``torch`` on Linux is the CUDA build (several GB of nvidia-* wheels). Step 3
runs only when step 2 found no matching distribution, so a configured wheel on disk always wins.

Only the standard library is used: this runs before any environment has packages.

    python scripts/install_torch.py .venv/bin/python            # install (what `make setup` runs)
    python scripts/install_torch.py .venv/bin/python --dry-run  # only say where torch would come from
    python scripts/install_torch.py apt-package                 # "python3-torch" if the distribution's is recent enough
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

TORCH_VERSION = "2.13.0"
# The oldest torch the engine has been run with (Debian 13's python3-torch).
MINIMUM_TORCH = (2, 6)
DEFAULT_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
NOT_FOUND = "No matching distribution found"


def cpu_index_url() -> str:
    return os.environ.get("TORCH_INDEX_URL") or DEFAULT_CPU_INDEX


def version_tuple(text: str):
    """(major, minor) of a version string such as '2.6.0+debian' or '2.13.0+cpu'; None if unparsable."""
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def importable_torch(python: str):
    """(version, folder) of the torch that ``python`` imports, or None."""
    code = "import os, torch; print(torch.__version__); print(os.path.dirname(torch.__file__))"
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        return None
    version, folder = result.stdout.strip().splitlines()[-2:]
    return version, folder


def recent_enough(version: str) -> bool:
    parsed = version_tuple(version)
    return parsed is not None and parsed >= MINIMUM_TORCH


def pip_install(python: str, extra_args, dry_run: bool):
    """Run pip install of the pinned CPU build; returns (returncode, output, report or None)."""
    command = [python, "-m", "pip", "install", "--no-input", f"torch=={TORCH_VERSION}+cpu", *extra_args]
    if dry_run:
        command += ["--dry-run", "--quiet", "--report", "-"]
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    report = None
    if dry_run and result.returncode == 0:
        report = json.loads(result.stdout)
    elif not dry_run:
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
    return result.returncode, output, report


def describe(report) -> str:
    """'torch <version> from <url>' for the torch entry of a pip report."""
    for item in report.get("install", []):
        if item["metadata"]["name"].lower() == "torch":
            return f"torch {item['metadata']['version']} from {item['download_info']['url']}"
    return "torch already installed"


def install(python: str, dry_run: bool = False) -> str:
    """Make torch importable by ``python``; returns a one-line account of where it came from."""
    found = importable_torch(python)
    if found and recent_enough(found[0]):
        return f"kept torch {found[0]} from {found[1]}"
    if found:
        print(f"torch {found[0]} in {found[1]} is older than {'.'.join(map(str, MINIMUM_TORCH))}: installing "
              f"{TORCH_VERSION}+cpu into the environment")
    rc, output, report = pip_install(python, [], dry_run)
    source = "pip's configuration"
    if rc != 0 and NOT_FOUND in output:
        index = cpu_index_url()
        print(f"torch=={TORCH_VERSION}+cpu is not on pip's configured indexes; using PyTorch's CPU wheel index {index}")
        rc, output, report = pip_install(python, ["--extra-index-url", index], dry_run)
        source = index
    if rc != 0:
        if dry_run:
            sys.stderr.write(output)
        raise SystemExit(
            f"could not install torch=={TORCH_VERSION}+cpu (tried pip's configuration, then {cpu_index_url()}). "
            "Set TORCH_INDEX_URL to a mirror of PyTorch's CPU wheel index, or install your distribution's "
            "python3-torch (2.6 or newer) and run this again."
        )
    if dry_run:
        return f"would install {describe(report)} (via {source})"
    return f"installed torch {TORCH_VERSION}+cpu via {source}"


def apt_package() -> str:
    """'python3-torch' when apt offers it at MINIMUM_TORCH or newer, else ''."""
    try:
        result = subprocess.run(
            ["apt-cache", "policy", "python3-torch"], capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
    except OSError:
        return ""
    match = re.search(r"Candidate:\s*(?:\d+:)?(\S+)", result.stdout)
    return "python3-torch" if match and recent_enough(match.group(1)) else ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("python", help="the environment's interpreter, or 'apt-package'")
    parser.add_argument("--dry-run", action="store_true", help="resolve only; print where torch would come from")
    args = parser.parse_args(argv)
    if args.python == "apt-package":
        print(apt_package())
        return
    print(install(args.python, args.dry_run))


if __name__ == "__main__":
    main()
