"""Screenshot of the fused layer in the QGIS desktop, for the README.

Run inside QGIS:  xvfb-run -a -s "-screen 0 1500x950x24" qgis --nologo --code scripts/screenshot.py
It opens demo_output/fused.tif (run `make demo` first) with the plugin's true-colour rendering,
shows the Processing toolbox with the algorithm, saves docs/qgis_fused_layer.png and quits.
"""

import os
import sys
from pathlib import Path

from qgis.core import QgsApplication, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QTimer
from qgis.utils import iface

# QGIS runs this file with exec(), without __file__: it is started from the project root.
ROOT = Path(os.environ.get("CSAKD_PROJECT_ROOT", os.getcwd())).resolve()
sys.path.insert(0, str(ROOT / "scripts"))
from qgis_session import import_plugin  # noqa: E402

plugin = import_plugin().classFactory(iface)
plugin.initGui()
from csakd_fusion.processing_provider.styling import apply_true_colour  # noqa: E402

layer = QgsRasterLayer(str(ROOT / "demo_output" / "fused.tif"), "Fused hyperspectral image (177 bands)")
apply_true_colour(layer)
QgsProject.instance().addMapLayer(layer)
iface.mapCanvas().setExtent(layer.extent())
iface.mainWindow().showMaximized()
toolbox = iface.mainWindow().findChild(object, "ProcessingToolbox")
if toolbox is not None:
    toolbox.show()
    search = getattr(toolbox, "searchBox", None)
    if search is not None:
        search.setText("Hyperspectral Fusion")


def shoot():
    iface.mapCanvas().refreshAllLayers()
    QTimer.singleShot(4000, save)


def save():
    target = ROOT / "docs" / "qgis_fused_layer.png"
    target.parent.mkdir(exist_ok=True)
    iface.mainWindow().grab().save(str(target))
    print(f"saved {target}", flush=True)
    QgsApplication.instance().exit(0)


QTimer.singleShot(6000, shoot)
