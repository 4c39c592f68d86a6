"""Build the Plugin Manager zip and install its content into a QGIS plugin folder.

The file list is explicit (plus a suffix whitelist inside the shipped folders) rather
than "everything in the tree", because the tree also holds a virtual environment,
training outputs, caches and tests that must never reach a user's QGIS profile.
Only the standard library is used so that this runs before any environment exists.
"""

import argparse
import configparser
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_NAME = "csakd_fusion"

REQUIRED_FILES = ["__init__.py", "csakd_plugin.py", "metadata.txt"]
OPTIONAL_FILES = ["LICENSE", "README.md", "CHANGELOG.md"]
PACKAGE_DIRS = ["csakd_qgis", "processing_provider", "resources"]
SHIPPED_SUFFIXES = {
    ".py", ".txt", ".json", ".csv", ".svg", ".png", ".qml", ".ui", ".md",
    ".pt", ".pth", ".npz", ".npy",
}
# Kept in the repository for `make bench` only: the plugin never loads the teacher (it
# would be 20 of the zip's megabytes; the plugin repository takes at most 25) nor the student
# trained without it (the benchmark's distillation control).
NOT_SHIPPED = {
    f"resources/models/{stem}{suffix}"
    for stem in ("csakd_teacher", "csakd_student_without_distillation")
    for suffix in (".json", ".pt")
}
# A fixed timestamp keeps the zip byte-identical across rebuilds of the same tree.
ZIP_DATE = (2020, 1, 1, 0, 0, 0)


def plugin_version():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "metadata.txt", encoding="utf-8")
    return parser["general"]["version"].strip()


def _git_ignored(candidates):
    """The candidates git ignores, so gitignored artefacts (e.g. checkpoints) never ship."""
    if not candidates:
        return set()
    try:
        result = subprocess.run(
            ["git", "-C", str(ROOT), "check-ignore", "--no-index", "--stdin", "-z"],
            input="\0".join(candidates).encode("utf-8"), capture_output=True,
        )
    except OSError:
        return set()
    # Exit status 1 means "nothing ignored"; 128 means not a git work tree.
    if result.returncode not in (0, 1):
        return set()
    return {p for p in result.stdout.decode("utf-8", "replace").split("\0") if p}


def _is_test_path(rel):
    return any(
        part in ("tests", "test", "__pycache__") or part.startswith(".")
        or (part.startswith("test_") and part.endswith(".py"))
        for part in rel.parts
    )


def plugin_files():
    """Paths relative to the project root that make up the installed plugin."""
    missing = [name for name in REQUIRED_FILES if not (ROOT / name).is_file()]
    if missing:
        sys.exit(f"missing plugin files: {', '.join(missing)}")
    files = [Path(name) for name in REQUIRED_FILES]
    files += [Path(name) for name in OPTIONAL_FILES if (ROOT / name).is_file()]
    candidates = []
    for directory in PACKAGE_DIRS:
        for path in sorted((ROOT / directory).rglob("*")):
            rel = path.relative_to(ROOT)
            if (path.is_file() and path.suffix in SHIPPED_SUFFIXES and not _is_test_path(rel)
                    and rel.as_posix() not in NOT_SHIPPED):
                candidates.append(rel)
    ignored = _git_ignored([rel.as_posix() for rel in candidates])
    return files + [rel for rel in candidates if rel.as_posix() not in ignored]


def build_zip(out):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for rel in plugin_files():
            info = zipfile.ZipInfo(f"{PLUGIN_NAME}/{rel.as_posix()}", ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, (ROOT / rel).read_bytes())
    os.replace(tmp, out)
    print(f"built {out}")


def install(archive_path, plugins_dir):
    """Replace any earlier install wholesale, so files removed upstream disappear too."""
    plugins_dir = Path(plugins_dir)
    plugins_dir.mkdir(parents=True, exist_ok=True)
    target = plugins_dir / PLUGIN_NAME
    with tempfile.TemporaryDirectory(dir=plugins_dir, prefix=".install-") as staging:
        with zipfile.ZipFile(archive_path) as archive:
            archive.extractall(staging)
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        os.replace(Path(staging) / PLUGIN_NAME, target)
    print(f"installed {target}")


def enable(qgis_process, plugins_dir):
    """Enable the plugin in the active profile and check that QGIS now reports it so."""
    env = dict(os.environ)
    env.setdefault("QT_QPA_PLATFORM", "offscreen")
    # Lets QGIS find the plugin when plugins_dir is not the profile's own folder.
    env["QGIS_PLUGINPATH"] = os.pathsep.join(
        p for p in (str(plugins_dir), env.get("QGIS_PLUGINPATH", "")) if p
    )
    result = subprocess.run(
        [qgis_process, "plugins", "enable", PLUGIN_NAME],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
    )
    output = result.stdout + result.stderr
    # A reinstall finds the plugin enabled already, which qgis_process reports
    # with exit status 1.
    if result.returncode != 0 and "already enabled" not in output:
        sys.exit(f"{qgis_process} plugins enable {PLUGIN_NAME} failed:\n{output}")
    listing = subprocess.run(
        [qgis_process, "plugins"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
    ).stdout
    if f"* {PLUGIN_NAME}" not in listing.splitlines():
        sys.exit(f"{PLUGIN_NAME} is not enabled after install:\n{listing}")
    print(f"enabled {PLUGIN_NAME}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version")
    sub.add_parser("files")
    zip_cmd = sub.add_parser("zip")
    zip_cmd.add_argument("out")
    install_cmd = sub.add_parser("install")
    install_cmd.add_argument("archive")
    install_cmd.add_argument("plugins_dir")
    enable_cmd = sub.add_parser("enable")
    enable_cmd.add_argument("qgis_process")
    enable_cmd.add_argument("plugins_dir")
    args = parser.parse_args(argv)
    if args.command == "version":
        print(plugin_version())
    elif args.command == "files":
        print("\n".join(p.as_posix() for p in plugin_files()))
    elif args.command == "zip":
        build_zip(args.out)
    elif args.command == "install":
        install(args.archive, args.plugins_dir)
    else:
        enable(args.qgis_process, args.plugins_dir)


if __name__ == "__main__":
    main()
