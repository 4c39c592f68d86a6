"""The plugin frame: loading in QGIS, import hygiene, metadata, packaging, install."""

import ast
import configparser
import importlib.util
import json
import os
import re
import shutil
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from qgis.core import QgsApplication

from tests.helpers import clean_env, run_command

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PLUGIN_NAME = "csakd_fusion"
PROVIDER_ID = "csakd"
PROVIDER_NAME = "Hyperspectral Fusion (CSAKD)"
# Debian's /usr/bin/qgis_process wrapper passes an option QGIS 3.22 rejects.
QGIS_PROCESS = "/usr/bin/qgis_process.bin"
# Nested make runs use the environment these tests run in (`make test VENV=…` may name another
# than .venv, e.g. one per distribution in `make test-qgis`).
MAKE = ["make", "--no-print-directory", f"VENV={sys.prefix}"]


def _load_packager():
    # The packager's file list is the definition of "the plugin", so tests reuse it.
    spec = importlib.util.spec_from_file_location(
        "package_plugin", PROJECT_ROOT / "scripts" / "package_plugin.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


package_plugin = _load_packager()


# --- loading inside a running QGIS -------------------------------------------------


def test_class_factory_init_processing_registers_and_unload_removes(
    csakd_plugin_package, qgis_processing, qgis_iface
):
    registry = QgsApplication.processingRegistry()
    assert registry.providerById(PROVIDER_ID) is None

    plugin = csakd_plugin_package.classFactory(qgis_iface)
    plugin.initProcessing()
    provider = registry.providerById(PROVIDER_ID)
    assert provider is not None
    assert provider.name() == PROVIDER_NAME
    assert provider.longName()
    assert not provider.icon().isNull()
    assert Path(provider.svgIconPath()).is_file()

    # QGIS desktop calls initGui after initProcessing: must not register twice.
    plugin.initGui()
    assert [p.id() for p in registry.providers()].count(PROVIDER_ID) == 1

    plugin.unload()
    assert registry.providerById(PROVIDER_ID) is None


def test_init_gui_alone_registers_provider(csakd_plugin_package, qgis_processing, qgis_iface):
    registry = QgsApplication.processingRegistry()
    plugin = csakd_plugin_package.classFactory(qgis_iface)
    plugin.initGui()
    try:
        assert registry.providerById(PROVIDER_ID) is not None
    finally:
        plugin.unload()
    assert registry.providerById(PROVIDER_ID) is None


def test_provider_fixture_loads_every_available_algorithm(csakd_provider, csakd_plugin_package):
    from csakd_fusion.processing_provider.algorithms import available_algorithms

    expected = sorted(alg.name() for alg in available_algorithms())
    loaded = sorted(alg.name() for alg in csakd_provider.algorithms())
    assert loaded == expected
    for alg in csakd_provider.algorithms():
        assert alg.id() == f"{PROVIDER_ID}:{alg.name()}"


# --- import hygiene ----------------------------------------------------------------

_BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "qgis", "PyQt5", "sip"}:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _Blocked())
    """
)


def test_engine_imports_without_torch_and_qgis(tmp_path):
    """Importing the engine must work where neither PyTorch nor QGIS can be loaded."""
    code = _BLOCKER + textwrap.dedent(
        f"""
        sys.path.insert(0, {str(PROJECT_ROOT)!r})
        import csakd_qgis
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "qgis", "PyQt5"}})
        assert not loaded, loaded
        print("ok", csakd_qgis.__name__)
        """
    )
    result = run_command([sys.executable, "-c", code], cwd=tmp_path, env=clean_env())
    assert "ok csakd_qgis" in result.stdout


def test_plugin_package_import_does_not_need_torch_or_qgis(tmp_path):
    """The Plugin Manager may import the package before any dependency check runs."""
    code = _BLOCKER + textwrap.dedent(
        f"""
        import importlib.util
        root = {str(PROJECT_ROOT)!r}
        spec = importlib.util.spec_from_file_location(
            {PLUGIN_NAME!r}, root + "/__init__.py", submodule_search_locations=[root])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        importlib.import_module({PLUGIN_NAME!r} + ".csakd_qgis")
        assert callable(module.classFactory)
        print("ok")
        """
    )
    assert "ok" in run_command([sys.executable, "-c", code], cwd=tmp_path, env=clean_env()).stdout


def test_plugin_imports_under_any_folder_name_without_touching_sys_path(tmp_path):
    """QGIS imports the plugin by its folder name, a checkout may be named anything."""
    folders = []
    for folder_name in ("main", PLUGIN_NAME):
        folder = tmp_path / folder_name
        for rel in package_plugin.plugin_files():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / rel, folder / rel)
        folders.append(folder)
    workdir = tmp_path / "cwd"
    workdir.mkdir()

    code = textwrap.dedent(
        f"""
        import importlib, importlib.util, sys
        folders = {[str(f) for f in folders]!r}
        before = list(sys.path)
        for folder in folders:
            name = folder.rsplit("/", 1)[1]
            spec = importlib.util.spec_from_file_location(
                name, folder + "/__init__.py", submodule_search_locations=[folder])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            plugin = module.classFactory(None)
            provider_module = importlib.import_module(name + ".processing_provider.provider")
            assert provider_module.__file__.startswith(folder), provider_module.__file__
            assert type(plugin).__module__ == name + ".csakd_plugin", type(plugin).__module__
            importlib.import_module(name + ".csakd_qgis")
            importlib.import_module(name + ".processing_provider.algorithms").available_algorithms()
        assert sys.path == before, set(sys.path) ^ set(before)
        generic = sorted(
            m for m in sys.modules
            if m.split(".")[0] in {{"processing_provider", "csakd_plugin", "csakd_qgis", "resources"}}
        )
        assert not generic, generic
        print("ok")
        """
    )
    result = run_command([sys.executable, "-c", code], cwd=workdir, env=clean_env())
    assert "ok" in result.stdout


def _plugin_python_files():
    for rel in package_plugin.plugin_files():
        if rel.suffix == ".py":
            yield rel


def test_plugin_code_uses_only_relative_imports_for_its_own_modules():
    """An absolute import of a sibling works in a checkout but breaks once installed."""
    own_names = {"csakd_qgis", "processing_provider", "csakd_plugin", "resources", "tests"}
    offences = []
    for rel in _plugin_python_files():
        tree = ast.parse((PROJECT_ROOT / rel).read_text(encoding="utf-8"), str(rel))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                names = []
            offences += [f"{rel}:{node.lineno} imports {n}" for n in names
                         if n.split(".")[0] in own_names]
            # sys.path.append/insert/extend in plugin code would leak into all of QGIS. The one
            # exception appends, after QGIS's own folders, only the library folders that
            # `make install` recorded in python_path.txt (where torch lives); never the plugin.
            if rel.as_posix() != "processing_provider/dependencies.py" and (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"append", "insert", "extend"}
                and ast.unparse(node.func.value) == "sys.path"
            ):
                offences.append(f"{rel}:{node.lineno} modifies sys.path")
    assert not offences, "\n".join(offences)


# --- metadata ----------------------------------------------------------------------

REQUIRED_METADATA = [
    "name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
    "repository", "tracker", "homepage", "hasProcessingProvider", "tags", "category",
    "experimental", "icon",
]


def _metadata():
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(PROJECT_ROOT / "metadata.txt", encoding="utf-8")
    return parser["general"]


def test_metadata_has_every_required_key():
    meta = _metadata()
    missing = [key for key in REQUIRED_METADATA if not meta.get(key, "").strip()]
    assert not missing, f"metadata.txt lacks {missing}"
    assert meta["name"] == PROVIDER_NAME
    assert meta["hasProcessingProvider"] == "yes"
    assert meta["qgisMinimumVersion"] == "3.22"
    # The menus the plugin repository and QGIS's Plugin Manager know.
    assert meta["category"] in ("Raster", "Vector", "Database", "Mesh", "Web"), meta["category"]
    # QGIS 4 (Qt6) loads only plugins that declare support for it.
    assert meta["supportsQt6"] == "True"
    assert meta["qgisMaximumVersion"] == "4.99"
    assert meta["changelog"].strip().splitlines()[0].strip() == meta["version"]
    assert meta["tracker"] == meta["repository"].rstrip("/") + "/issues"
    assert (PROJECT_ROOT / meta["icon"]).is_file()
    version_parts = meta["version"].split(".")
    assert len(version_parts) == 3 and all(p.isdigit() for p in version_parts)


def test_every_algorithm_has_a_short_description_and_a_help_url(csakd_provider):
    homepage = _metadata()["homepage"]
    for algorithm in csakd_provider.algorithms():
        assert algorithm.shortDescription().strip(), algorithm.id()
        assert algorithm.helpUrl().startswith(homepage + "#"), algorithm.helpUrl()


# --- packaging and installing ------------------------------------------------------


@pytest.fixture(scope="module")
def built_package(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    run_command([*MAKE, "package", f"DIST_DIR={dist}"],
         cwd=PROJECT_ROOT, env=clean_env())
    version = _metadata()["version"]
    archive = dist / f"{PLUGIN_NAME}-{version}.zip"
    assert archive.is_file(), sorted(p.name for p in dist.iterdir())
    return archive


def test_package_zip_has_one_clean_top_folder(built_package):
    with zipfile.ZipFile(built_package) as archive:
        names = archive.namelist()
        assert archive.testzip() is None
    assert {n.split("/")[0] for n in names} == {PLUGIN_NAME}
    inside = {n.split("/", 1)[1] for n in names}
    for required in ("__init__.py", "metadata.txt", "csakd_plugin.py",
                     "processing_provider/provider.py", "processing_provider/algorithms.py",
                     "resources/icon.svg"):
        assert required in inside, f"{required} missing from the package"
    assert any(n.startswith("csakd_qgis/") for n in inside)
    # The plugin repository refuses uploads without a licence; the teacher and the student
    # trained without it are for `make bench` only.
    assert "LICENSE" in inside
    assert "resources/models/csakd_student.pt" in inside
    assert {n for n in inside if n.startswith("resources/models/")} == {
        "resources/models/csakd_student.json", "resources/models/csakd_student.pt"}
    assert built_package.stat().st_size < 10 * 1024 * 1024, built_package.stat().st_size
    forbidden = [n for n in inside
                 if n.startswith(("tests/", ".venv/", ".git", "scripts/", "dist/",
                                  "demo_output/", ".qgis-settings/"))
                 or "__pycache__" in n or n.endswith(".pyc")
                 or Path(n).name.startswith("test_")]
    assert not forbidden, forbidden


def test_package_installs_the_way_the_plugin_manager_does(built_package, tmp_path):
    # Mirrors "Install from ZIP" in QGIS 3.22: the plugin's folder name is taken from
    # the first *metadata.txt in sorted order, then QGIS's own unzip extracts it.
    with zipfile.ZipFile(built_package) as archive:
        metadata_files = sorted(n for n in archive.namelist() if n.endswith("metadata.txt"))
    assert metadata_files[0] == f"{PLUGIN_NAME}/metadata.txt", metadata_files
    plugin_name = os.path.split(metadata_files[0])[0]

    unzip_path = Path(QgsApplication.pkgDataPath()) / "python" / "pyplugin_installer" / "unzip.py"
    spec = importlib.util.spec_from_file_location("_qgis_plugin_unzip", unzip_path)
    qgis_unzip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qgis_unzip)
    plugins_dir = tmp_path / "plugins"
    qgis_unzip.unzip(str(built_package), str(plugins_dir))

    installed = plugins_dir / plugin_name
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(installed / "metadata.txt", encoding="utf-8")
    assert parser["general"]["name"] == PROVIDER_NAME
    assert (installed / parser["general"]["icon"]).is_file()


def _qgis_process(args, profile, plugin_path=None):
    env = clean_env(QGIS_CUSTOM_CONFIG_PATH=profile)
    if plugin_path is not None:
        env["QGIS_PLUGINPATH"] = str(plugin_path)
    return run_command([QGIS_PROCESS, *args], env=env, cwd=profile)


def _assert_provider_listed(profile, plugin_path=None):
    listing = _qgis_process(["list"], profile, plugin_path).stdout
    assert PROVIDER_NAME in listing.splitlines(), listing
    providers = json.loads(_qgis_process(["--json", "list"], profile, plugin_path).stdout)
    provider = providers["providers"].get(PROVIDER_ID)
    assert provider is not None, sorted(providers["providers"])
    # Once processing_provider.algorithms returns the fusion algorithm, this also
    # proves that qgis_process can load it from the installed copy.
    from csakd_fusion.processing_provider.algorithms import available_algorithms

    expected = {f"{PROVIDER_ID}:{alg.name()}" for alg in available_algorithms()}
    assert expected <= set(provider["algorithms"]), sorted(provider["algorithms"])
    return listing


def test_make_install_into_throwaway_profile_is_seen_by_qgis_process(
    tmp_path, built_package, csakd_plugin_package
):
    profile = tmp_path / "qgis-config"
    plugins_dir = profile / "profiles" / "default" / "python" / "plugins"
    dist = built_package.parent
    make = [*MAKE, "install", f"DIST_DIR={dist}"]
    env = clean_env(QGIS_CUSTOM_CONFIG_PATH=profile)
    run_command(make, cwd=PROJECT_ROOT, env=env)
    installed = plugins_dir / PLUGIN_NAME
    assert (installed / "metadata.txt").is_file()
    assert not (installed / "tests").exists()

    enabled = _qgis_process(["plugins"], profile).stdout
    assert f"* {PLUGIN_NAME}" in enabled.splitlines(), enabled
    _assert_provider_listed(profile)

    # A reinstall replaces the old copy wholesale instead of merging into it.
    (installed / "left_over_from_old_version.py").write_text("raise ImportError\n")
    run_command(make, cwd=PROJECT_ROOT, env=env)
    assert not (installed / "left_over_from_old_version.py").exists()
    _assert_provider_listed(profile)


def test_make_install_fills_the_default_profiles_of_qgis3_and_qgis4(tmp_path, built_package, csakd_plugin_package):
    home = tmp_path / "home"
    run_command([*MAKE, "install", f"DIST_DIR={built_package.parent}"],
                cwd=PROJECT_ROOT, env=clean_env(HOME=home))
    for qgis in ("QGIS3", "QGIS4"):
        installed = home / ".local" / "share" / "QGIS" / qgis / "profiles" / "default" / "python" / "plugins" / PLUGIN_NAME
        assert (installed / "metadata.txt").is_file(), qgis
        assert Path((installed / "python_path.txt").read_text().strip()).is_dir()
    listing = run_command([QGIS_PROCESS, "plugins"], env=clean_env(HOME=home), cwd=tmp_path).stdout
    assert f"* {PLUGIN_NAME}" in listing.splitlines(), listing


def test_make_install_into_custom_plugins_dir(tmp_path, built_package, csakd_plugin_package):
    profile = tmp_path / "qgis-config"
    plugins_dir = tmp_path / "plugins"
    run_command([*MAKE, "install", f"DIST_DIR={built_package.parent}",
          f"QGIS_PLUGINS_DIR={plugins_dir}"],
         cwd=PROJECT_ROOT, env=clean_env(QGIS_CUSTOM_CONFIG_PATH=profile))
    assert (plugins_dir / PLUGIN_NAME / "__init__.py").is_file()
    assert not (profile / "profiles" / "default" / "python" / "plugins" / PLUGIN_NAME).exists()
    _assert_provider_listed(profile, plugin_path=plugins_dir)


def test_training_and_scene_adaptation_run_through_qgis_process_after_make_install(
    tmp_path, built_package, shared_data_dir, potsdam_wald_pair
):
    """What a user runs: both algorithms that build a torch optimizer, in QGIS's own Python.

    Inside QGIS the system's packages (Debian 12: sympy 1.11) would shadow the ones torch needs
    (sympy >= 1.13 once an optimizer is built) unless the plugin puts its environment first;
    tests run inside that environment and would not notice.
    """
    profile = tmp_path / "qgis-config"
    run_command([*MAKE, "install", f"DIST_DIR={built_package.parent}"],
                cwd=PROJECT_ROOT, env=clean_env(QGIS_CUSTOM_CONFIG_PATH=profile))

    model = tmp_path / "trained.json"
    # Half a minute: on a busy 2-core machine the first training step alone took 6 s.
    training = _qgis_process([
        "run", "csakd:trainfusionmodel", "--",
        f"CUBES={shared_data_dir / 'enmap_potsdam' / 'enmap_potsdam_blockA_96x64.tif'}",
        f"SRF={shared_data_dir / 'srf' / 'sentinel2a_msi_srf.csv'}", "SRF_BANDS=B2,B3,B4,B8", "SCALE=3",
        "MINUTES=0.5", f"OUTPUT_MODEL={model}", f"REPORT={tmp_path / 'report.html'}",
    ], profile).stdout
    assert "best student: epoch" in training, training
    assert model.is_file() and model.with_suffix(".pt").is_file()
    assert re.search(r"torch \S+: \d+ thread\(s\) \(.*\); OpenMP wait policy PASSIVE", training), training

    output = tmp_path / "adapted.tif"
    fusion = _qgis_process([
        "run", "csakd:hyperspectralfusion", "--", f"LRHSI={potsdam_wald_pair.lr_path}",
        f"HRMSI={potsdam_wald_pair.hr_path}", "ADAPT_MINUTES=0.2", f"OUTPUT={output}",
    ], profile).stdout
    assert "scene adaptation:" in fusion and "held-out PSNR" in fusion, fusion
    # The scene correction is on by default; this 32×21-pixel ×3 scene is too small to check it.
    assert "scene correction: not applied, 32×21 hyperspectral pixels (on the working grid) are too few" in fusion, fusion
    import rasterio

    with rasterio.open(output) as fused:
        assert fused.count == 224
        assert (fused.width, fused.height) == (potsdam_wald_pair.reference.shape[2], potsdam_wald_pair.reference.shape[1])
        assert np.isfinite(fused.read(50, masked=True).filled(np.nan)).mean() > 0.9


def test_the_missing_torch_message_gives_commands_this_system_accepts(csakd_plugin_package):
    from csakd_fusion.processing_provider import dependencies

    # Debian 12 and newer mark their Python as externally managed (PEP 668); Ubuntu 22.04's pip
    # does not know the flag that then becomes necessary.
    here = dependencies.linux_instructions("/usr/bin/python3.11", dependencies.externally_managed(), True)
    assert ("--break-system-packages" in here) == Path(f"/usr/lib/python3.{sys.version_info.minor}/EXTERNALLY-MANAGED").exists()
    jammy = dependencies.linux_instructions("/usr/bin/python3.10", False, False)
    assert "--break-system-packages" not in jammy
    assert "sudo apt install python3-pip" in jammy
    assert "/usr/bin/python3.10 -m pip install --user torch --index-url https://download.pytorch.org/whl/cpu" in jammy
    assert "python3-torch" in dependencies.missing_torch_message()
