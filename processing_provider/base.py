"""What every algorithm of the provider shares."""

from pathlib import Path

from qgis.core import QgsProcessingAlgorithm, QgsProcessingParameterDefinition
from qgis.PyQt.QtGui import QIcon

ICON = Path(__file__).resolve().parent.parent / "resources" / "icon.svg"
# The project's homepage (metadata.txt); algorithms link to sections of its README.
HOMEPAGE = "https://github.com/csakd-qgis/csakd-qgis"


def advanced(parameter):
    """Flag a rarely changed parameter, so dialogs fold it away."""
    parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.Flag.FlagAdvanced)
    return parameter


class CsakdAlgorithm(QgsProcessingAlgorithm):
    """The provider's algorithms sit at its top level, with its icon."""

    def group(self):
        return ""

    def groupId(self):  # noqa: N802
        return ""

    def icon(self):
        return QIcon(str(ICON))
