"""QGIS plugin entry point.

Only relative imports live below this package: QGIS imports it under the name of
the folder it was installed into (``csakd_fusion``), while a development checkout
may sit in a folder of any name, and putting this folder itself on ``sys.path``
would expose generic names such as ``processing_provider`` to every other plugin.
"""


def classFactory(iface):  # noqa: N802 (name fixed by QGIS)
    # Deferred so that importing the package (e.g. by the Plugin Manager while it
    # reads metadata) costs nothing and cannot fail on a missing optional dependency.
    from .csakd_plugin import CsakdPlugin

    return CsakdPlugin(iface)
