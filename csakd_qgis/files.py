"""Writing files so that nothing half-written is ever left under the final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_output(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renamed onto ``path`` only if the block
    succeeds, deleted (with any GDAL side-car) if it fails or is cancelled."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        # mkstemp makes the file private (0600); a result is shared as the umask allows.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        Path(str(temporary) + ".aux.xml").unlink(missing_ok=True)
