"""What made an output: its inputs, model and options, recorded in the output's own metadata.

A run that finds an output whose recorded recipe equals the one it would use now can skip
it: the output is complete (outputs only ever appear whole, by renaming) and up to date. This
is what lets an interrupted batch resume. The recipe is compared, never trusted for more:
an input is identified by the size and modification time of every file GDAL reads for it (an
ENVI header changes the wavelengths, not the image file), the model by the SHA-256 of its card
(which holds the SHA-256 of its weights), the options by their values, including the engine's
defaults for options not given, so that a changed default redoes the outputs it affects.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional, Union

RECIPE_TAG = "CSAKD_RECIPE"
# fuse_files keywords that do not change the pixels written: not part of the recipe. The
# device is among them: a scene fused on a GPU is not redone on a CPU worker.
NOT_RECORDED = {"lr_hsi_path", "hr_msi_path", "output_path", "progress", "cancelled", "log", "device"}


def engine_keywords() -> Dict[str, object]:
    """The keyword options of ``api.fuse_files`` with their defaults (whatever this version of
    the engine offers: an option the engine gains is recorded without a change here)."""
    import inspect

    from .api import fuse_files

    return {
        name: parameter.default
        for name, parameter in inspect.signature(fuse_files).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def _file_identity(path: str) -> Dict:
    from osgeo import gdal  # VSIStatL also stats /vsicurl/, /vsis3/ and other GDAL virtual paths

    stat = gdal.VSIStatL(path)
    if stat is None:
        return {"path": path, "missing": True}
    return {"path": path, "bytes": int(stat.size), "modified": int(stat.mtime)}


def input_identity(path: Union[str, Path]) -> Dict:
    """{"files": [{path, bytes, modified}, …]} for every file GDAL reads for the raster at
    ``path`` (data file, header, side-cars); a raster GDAL cannot open is identified by its path
    alone (the fusion then fails on it with its own message)."""
    import rasterio
    from rasterio.errors import RasterioIOError

    path = str(path)
    try:
        with rasterio.open(path) as dataset:
            files = list(dataset.files) or [path]
    except RasterioIOError:
        files = [path]
    return {"files": [_file_identity(name) for name in files]}


def model_identity(model: Union[str, Path, None]) -> Dict:
    """The model bundle's card (the bundled student when ``model`` is None) and its SHA-256."""
    import hashlib

    from .bundle import card_path_for, default_model_path

    card = card_path_for(model or default_model_path()).resolve()
    if not card.is_file():
        return {"card": str(card), "missing": True}
    return {"card": str(card), "sha256": hashlib.sha256(card.read_bytes()).hexdigest()}


def recipe(lr_hsi_path, hr_msi_path, options: Dict) -> Dict:
    """What an output made now from these inputs with ``options`` (fuse_files keywords) would be
    made of; JSON-compatible, so that it compares equal to the one read back from a file."""
    from . import __version__

    settings = {k: v for k, v in engine_keywords().items() if k not in NOT_RECORDED}
    unknown = set(options) - set(settings) - NOT_RECORDED
    if unknown:
        raise ValueError(f"option(s) {sorted(unknown)} are not options of this version of the engine")
    settings.update({k: v for k, v in options.items() if k in settings})
    model = settings.pop("model", None)
    made_of = {
        "engine": __version__,
        "lrhsi": input_identity(lr_hsi_path),
        "hrmsi": input_identity(hr_msi_path),
        "model": model_identity(model),
        "options": settings,
    }
    return json.loads(json.dumps(made_of, sort_keys=True, default=str))


def record_recipe(output_path: Union[str, Path], made_of: Dict) -> None:
    """Writes the recipe ``made_of`` (:func:`recipe`) into the raster's dataset metadata under
    :data:`RECIPE_TAG`, as JSON, where :func:`recorded_recipe` reads it back. Raises what
    rasterio raises when the file cannot be opened for update."""
    import rasterio

    with rasterio.open(output_path, "r+") as dataset:
        dataset.update_tags(**{RECIPE_TAG: json.dumps(made_of, sort_keys=True)})


def recorded_recipe(output_path: Union[str, Path]) -> Optional[Dict]:
    """The recipe recorded in an output, or None (no file, not a raster, no recipe)."""
    import rasterio
    from rasterio.errors import RasterioIOError

    if not Path(output_path).is_file():
        return None
    try:
        with rasterio.open(output_path) as dataset:
            text = dataset.tags().get(RECIPE_TAG)
    except RasterioIOError:
        return None
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def up_to_date(output_path: Union[str, Path], wanted: Dict) -> bool:
    """True when ``output_path`` exists and was made by the recipe ``wanted``."""
    return recorded_recipe(output_path) == wanted


def partial_folder(output_path: Union[str, Path]) -> Path:
    """The hidden folder beside an output where it is made: everything a run writes on the
    way (the engine's temporary output and scratch files) is inside, so a run killed outright
    leaves one folder that the next run of the same output removes."""
    output_path = Path(output_path)
    return output_path.parent / f".{output_path.name}.partial"


def fuse_recorded(
    lr_hsi_path,
    hr_msi_path,
    output_path,
    options: Optional[Dict] = None,
    log: Callable[[str], None] = lambda message: None,
    progress: Optional[Callable[[float], None]] = None,
    made_of: Optional[Dict] = None,
):
    """``api.fuse_files`` with ``options`` (its keywords), the recipe (``made_of``, computed
    here when not given) recorded in the output's dataset metadata under ``CSAKD_RECIPE``.

    The output is made in :func:`partial_folder`, tagged there and only then renamed onto
    ``output_path``: an output with a recipe is always complete. Returns fuse_files' report.
    Raises FusionInputError on bad input (as fuse_files), also when the output would replace
    one of the inputs.
    """
    from .api import fuse_files
    from .georaster import FusionInputError

    options = dict(options or {})
    output_path = Path(output_path)
    if made_of is None:
        made_of = recipe(lr_hsi_path, hr_msi_path, options)
    for source in (lr_hsi_path, hr_msi_path):
        if output_path.exists() and os.path.exists(source) and os.path.samefile(source, output_path):
            raise FusionInputError(f"the output {output_path} is one of the inputs; give another output path")
    partial = partial_folder(output_path)
    try:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run that was killed
        partial.mkdir(parents=True)
    except OSError as error:
        raise FusionInputError(f"cannot write the output {output_path}: {error.strerror} ({partial})") from error
    staged = partial / output_path.name
    try:
        report = fuse_files(
            lr_hsi_path,
            hr_msi_path,
            staged,
            # The engine's messages name the file it writes; the user knows the output's name.
            log=lambda message: log(message.replace(str(staged), str(output_path))),
            progress=progress,
            **options,
        )
        record_recipe(staged, made_of)
        os.replace(staged, output_path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return report
