"""The fused image's file: where it goes, what it may not overwrite, how much room it
needs, how its values are encoded, and turning every failure to create, write or rename it
(or the scratch file beside it) into a clear FusionInputError that names the path, with
nothing left behind. No QGIS needed."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def output_folder(output_path: Path):
    """Creates the output's folder (and any missing parents) for the run; turns any failure to
    create, write or rename the output or its scratch file (files.OutputError) into a
    FusionInputError naming the path; on any failure removes the folders it created, so
    nothing is left behind."""
    from .files import OutputError
    from .georaster import FusionInputError

    if output_path.is_dir():
        raise FusionInputError(f"the output {output_path} is a folder; give a file name ending in .tif")
    folder = output_path.parent if str(output_path.parent) else Path(".")
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # A real write, not os.access: as root, or on a read-only or special file system
            # (/proc), access() says yes where creating a file fails.
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            raise OutputError(
                f"cannot write the output {output_path}: the folder {folder} cannot be created or written to "
                f"({error.strerror or error}); choose a folder you can write to"
            ) from error
        yield
    except OutputError as error:
        for created in missing:
            _remove_empty_folder(created)
        raise FusionInputError(str(error)) from error
    except BaseException:
        for created in missing:
            _remove_empty_folder(created)
        raise


def _remove_empty_folder(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (someone else wrote there) or already gone: keep it


def check_not_an_input(output_path: Path, *datasets) -> None:
    """Refuses an output that would overwrite one of the inputs' files (GDAL's file list of
    each: an ENVI header and data file, side-cars): the same file after resolving links (also
    a hard link), or a GeoTIFF side-car of the output (``.aux.xml``, ``.ovr``, ``.msk``)."""
    from .georaster import FusionInputError

    outputs = [output_path] + [Path(str(output_path) + ext) for ext in (".aux.xml", ".ovr", ".msk")]
    for dataset in datasets:
        for name in dataset.files:
            for output in outputs:
                if _same_file(Path(name), output):
                    raise FusionInputError(
                        f"the output {output_path} would overwrite the input {dataset.name} (its file {name}); "
                        "choose another output file name"
                    )


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False  # one of them does not exist


def check_room(output_path: Path, grid, bands: int, output_dtype: str, log) -> None:
    """Logs the output's and the scratch file's sizes and refuses a run whose folder has not
    room for both (the output counted uncompressed: an upper bound)."""
    from .georaster import FusionInputError

    output_bytes = grid.width * grid.height * bands * np.dtype(output_dtype).itemsize
    scratch_bytes = grid.lr_width * grid.lr_height * bands * 4
    folder = output_path.parent if str(output_path.parent) else Path(".")
    free = shutil.disk_usage(folder).free
    log(
        f"output size up to {_size(output_bytes)} (uncompressed), scratch file {_size(scratch_bytes)}; "
        f"{_size(free)} free in {folder}"
    )
    if output_bytes + scratch_bytes > free:
        raise FusionInputError(
            f"not enough disk space for the output {output_path}: it needs up to {_size(output_bytes + scratch_bytes)} "
            f"(output {_size(output_bytes)} + scratch file {_size(scratch_bytes)}) and {folder} has {_size(free)} free; "
            "free some space, choose another folder, or fuse fewer bands or a smaller area"
        )


def _size(count: int) -> str:
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= factor:
            return f"{count / factor:.1f} {unit}"
    return f"{count} bytes"


class _GdalErrors(logging.Handler):
    """Collects the errors GDAL signals through rasterio's log without raising them: a block
    written back from GDAL's cache to a full disk (or past a file size limit) fails only
    there, and the file would otherwise be renamed into place truncated."""

    LOGGER = "rasterio._env"

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("GDAL signalled an error"):
            self.messages.append(message.split("msg=", 1)[-1])

    def __enter__(self):
        logger = logging.getLogger(self.LOGGER)
        self._saved = logger.level, logger.propagate
        logger.setLevel(logging.INFO)
        logger.propagate = False  # only here: the records are not the user's business twice
        logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger(self.LOGGER)
        logger.removeHandler(self)
        logger.level, logger.propagate = self._saved


@contextmanager
def output_dataset(temporary: Path, output_path: Path, profile: dict):
    """The output GeoTIFF open for writing at ``temporary``; a failure to create, write or
    finish (flush, close) it, raised or only signalled by GDAL, is an OutputError naming
    ``output_path``."""
    import rasterio
    from rasterio.errors import RasterioError

    from .files import OutputError

    with _GdalErrors() as errors:
        try:
            dst = rasterio.open(temporary, "w", **profile)
        except (RasterioError, OSError) as error:
            raise OutputError(f"cannot create the output {output_path}: {error}") from error
        try:
            yield dst
        except BaseException:
            dst.close()
            raise
        try:
            dst.close()
        except (RasterioError, OSError) as error:
            raise OutputError(f"cannot finish writing the output {output_path}: {error}") from error
    if errors.messages:
        raise OutputError(f"cannot write the output {output_path}: {'; '.join(errors.messages[:3])}")


def write_block(dst, data: np.ndarray, window, output_path: Path) -> None:
    """``dst.write`` of one block; a failure is an OutputError naming ``output_path``."""
    from rasterio.errors import RasterioError

    from .files import OutputError

    try:
        dst.write(data, window=window)
    except (RasterioError, OSError) as error:
        raise OutputError(f"cannot write the output {output_path}: {error}") from error


def output_encoding(output_dtype, lr_ds, lr_encoding, indexes, lr_fit, log):
    """The output's encoding (georaster.OutputEncoding), logged."""
    from .georaster import OutputEncoding

    scales, offsets = lr_encoding if lr_encoding is not None else (lr_ds.scales, lr_ds.offsets)
    pick = np.array(indexes) - 1
    finite = lr_fit[np.isfinite(lr_fit)]
    encoding = OutputEncoding.for_input(
        output_dtype, lr_ds.dtypes[0], np.asarray(scales, dtype=np.float64)[pick], np.asarray(offsets, dtype=np.float64)[pick],
        float(np.abs(finite).max()) if finite.size else 1.0,
    )
    log(encoding.describe())
    return encoding


def log_clipped(encoding, log) -> None:
    """A warning with the number of values an integer output could not hold, if any."""
    if encoding.clipped:
        log(
            f"warning: {encoding.clipped} fused value(s) lay outside what {encoding.dtype} holds and were clipped "
            f"(e.g. negative values in uint16); choose int16 or float32 to keep them"
        )
