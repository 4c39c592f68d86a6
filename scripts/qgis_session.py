"""A headless QGIS with Processing and this plugin's provider, for scripts (demo, bench)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_NAME = "csakd_fusion"


def import_plugin():
    """The plugin package under its installed name, whatever this folder is called."""
    if PLUGIN_NAME in sys.modules:
        return sys.modules[PLUGIN_NAME]
    spec = importlib.util.spec_from_file_location(PLUGIN_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PLUGIN_NAME] = module
    spec.loader.exec_module(module)
    return module


def start_qgis_with_plugin():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from qgis.core import QgsApplication

    if "/usr/share/qgis/python/plugins" not in sys.path:
        sys.path.append("/usr/share/qgis/python/plugins")
    app = QgsApplication([], False)
    app.initQgis()
    from processing.core.Processing import Processing

    Processing.initialize()
    plugin = import_plugin().classFactory(None)
    plugin.initProcessing()
    app._csakd_plugin = plugin  # keeps the provider alive as long as the application
    return app
