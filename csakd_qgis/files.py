"""Writing files so that nothing half-written is ever left under the final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


class OutputError(OSError):
    """The output (or a scratch file beside it) could not be created, written or renamed;
    the message names the path and the system's reason."""


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error)


@contextlib.contextmanager
def atomic_output(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renamed onto ``path`` only if the block
    succeeds, deleted (with any GDAL side-car) if it fails or is cancelled. Raises
    OutputError when the file cannot be created or renamed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
        os.close(handle)
    except OSError as error:
        raise OutputError(f"cannot create a file in {path.parent} for {path}: {_reason(error)}") from error
    temporary = Path(temporary)
    try:
        yield temporary
        # mkstemp makes the file private (0600); a result is shared as the umask allows.
        umask = os.umask(0)
        os.umask(umask)
        try:
            os.chmod(temporary, 0o666 & ~umask)
            os.replace(temporary, path)
        except OSError as error:
            raise OutputError(f"cannot rename the finished output onto {path}: {_reason(error)}") from error
    finally:
        temporary.unlink(missing_ok=True)
        Path(str(temporary) + ".aux.xml").unlink(missing_ok=True)
