"""Plugin object handed to QGIS by ``classFactory``."""

from qgis.core import QgsApplication

from .processing_provider.provider import CsakdProvider


class CsakdPlugin:
    def __init__(self, iface):
        # iface is None inside qgis_process, so nothing here may depend on a GUI.
        self.iface = iface
        self.provider = None

    def initProcessing(self):  # noqa: N802 (name fixed by QGIS)
        # qgis_process and the graphical modeler call only this, never initGui, so
        # the provider must be registered here for headless use to work.
        if self.provider is not None:
            return
        provider = CsakdProvider()
        if QgsApplication.processingRegistry().addProvider(provider):
            self.provider = provider

    def initGui(self):  # noqa: N802 (name fixed by QGIS)
        self.initProcessing()

    def unload(self):
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
