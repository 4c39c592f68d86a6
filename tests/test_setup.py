"""`make setup` as a user runs it: where torch comes from, without this machine's pip configuration.

PyTorch's CPU wheel index is stood in for by a local folder laid out the same way
(``<index>/torch/`` listing the ``+cpu`` wheel); everything else comes from the public index,
as it does for a user.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import clean_env, run_command

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


install_torch = _load_script("install_torch")

WHEEL_PIN = f"torch=={install_torch.TORCH_VERSION}+cpu"


def without_pip_configuration(**overrides):
    """The environment of a user's shell: no pip configuration file, no PIP_* variables."""
    env = clean_env()
    for key in [k for k in env if k.startswith("PIP_")]:
        del env[key]
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@pytest.fixture(scope="module")
def cpu_wheel_index(tmp_path_factory):
    """A local index laid out like https://download.pytorch.org/whl/cpu, holding the pinned wheel.

    The wheel itself comes from pip as configured (a build machine's wheel folder) or from the
    real CPU index; a machine with neither cannot run these tests.
    """
    index = tmp_path_factory.mktemp("cpu-index")
    project = index / "torch"
    project.mkdir()
    # With this machine's configuration the wheel comes from its local wheel folder; elsewhere
    # from PyTorch's CPU index itself.
    run_command([sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", WHEEL_PIN,
                 "--extra-index-url", install_torch.DEFAULT_CPU_INDEX, "-d", str(project)], env=clean_env())
    wheels = sorted(project.glob("torch-*.whl"))
    assert len(wheels) == 1, wheels
    # As on the real index: the '+' of the local version is percent-encoded in the link.
    name = wheels[0].name
    (project / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{name.replace("+", "%2B")}">{name}</a></body></html>\n'
    )
    return index


def test_the_public_index_alone_has_no_cpu_build(tmp_path):
    """Why the CPU wheel index is needed: without configuration the '+cpu' pin is not found."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", WHEEL_PIN, "-d", str(tmp_path)],
        env=without_pip_configuration(), capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert install_torch.NOT_FOUND in result.stderr, result.stderr


def test_make_setup_without_pip_configuration_installs_cpu_torch_from_the_cpu_index(tmp_path, cpu_wheel_index):
    venv = tmp_path / "venv"
    env = without_pip_configuration(TORCH_INDEX_URL=cpu_wheel_index.as_uri())
    result = run_command(["make", "--no-print-directory", "setup", f"VENV={venv}"], cwd=PROJECT_ROOT, env=env)
    assert f"using PyTorch's CPU wheel index {cpu_wheel_index.as_uri()}" in result.stdout, result.stdout

    python = str(venv / "bin" / "python")
    probe = run_command([python, "-c", (
        "import numpy, torch, sympy, pytest_qgis; "
        "print(torch.__version__, torch.version.cuda, sympy.__version__, numpy.__version__, numpy.__file__)"
    )], env=env).stdout.split()
    torch_version, cuda, sympy_version, numpy_version, numpy_file = probe
    assert torch_version == f"{install_torch.TORCH_VERSION}+cpu"
    assert cuda == "None"
    assert tuple(map(int, sympy_version.split(".")[:2])) >= (1, 13)
    # numpy stays the distribution's, whatever its major version.
    system_numpy = run_command(["/usr/bin/python3", "-c", "import numpy; print(numpy.__version__)"], env=env).stdout
    assert numpy_version == system_numpy.strip()
    assert not numpy_file.startswith(str(venv))
    installed = run_command([python, "-m", "pip", "list", "--format=freeze"], env=env).stdout.lower()
    assert "nvidia" not in installed and "triton" not in installed, installed


def test_a_configured_wheel_on_disk_wins_over_the_cpu_index(tmp_path, cpu_wheel_index):
    wheel = next((cpu_wheel_index / "torch").glob("torch-*.whl"))
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nfind-links = {wheel.parent}\n")
    env = without_pip_configuration(PIP_CONFIG_FILE=config, TORCH_INDEX_URL=(tmp_path / "no-index").as_uri())
    venv = tmp_path / "venv"
    run_command(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], env=env)
    result = run_command(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "install_torch.py"), str(venv / "bin" / "python"), "--dry-run"],
        env=env,
    )
    assert f"would install torch {install_torch.TORCH_VERSION}+cpu from {wheel.as_uri()}" in result.stdout, result.stdout
    assert "via pip's configuration" in result.stdout
    assert "CPU wheel index" not in result.stdout


def test_torch_that_the_environment_already_imports_is_kept_when_recent_enough():
    """The distribution's python3-torch (2.6 on Debian 13) is used as it is; Debian 12's 1.13 is not."""
    result = run_command([sys.executable, str(PROJECT_ROOT / "scripts" / "install_torch.py"), sys.executable], env=clean_env())
    import torch

    assert result.stdout.strip().endswith(f"kept torch {torch.__version__} from {Path(torch.__file__).parent}")
    assert install_torch.recent_enough("2.6.0+debian") and install_torch.recent_enough("2.14.0")
    assert not install_torch.recent_enough("1.13.1") and not install_torch.recent_enough("2.5.1")
