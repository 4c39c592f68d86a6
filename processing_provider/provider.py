"""Processing provider that groups the plugin's algorithms in the toolbox."""

from pathlib import Path

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .algorithms import available_algorithms

_ICON_PATH = Path(__file__).resolve().parent.parent / "resources" / "icon.svg"


class CsakdProvider(QgsProcessingProvider):
    def id(self):
        # Part of every algorithm id ("csakd:<name>") used by scripts, models and
        # qgis_process: changing it breaks saved models.
        return "csakd"

    def name(self):
        return "Hyperspectral Fusion (CSAKD)"

    def longName(self):  # noqa: N802 (name fixed by QGIS)
        return "Hyperspectral Fusion (CSAKD): hyperspectral/multispectral image fusion"

    def icon(self):
        return QIcon(str(_ICON_PATH))

    def svgIconPath(self):  # noqa: N802 (name fixed by QGIS)
        return str(_ICON_PATH)

    def loadAlgorithms(self):  # noqa: N802 (name fixed by QGIS)
        for algorithm in available_algorithms():
            self.addAlgorithm(algorithm)
