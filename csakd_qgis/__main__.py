"""``python -m csakd_qgis fuse …`` / ``python -m csakd_qgis batch …`` (see cli.py)."""

import sys

from .cli import main

# The guard keeps worker processes started by spawning (Dask's local cluster) from running
# the command again should they import this module.
if __name__ == "__main__":
    sys.exit(main())
