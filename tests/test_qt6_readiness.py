"""QGIS 4 (Qt6) readiness: every QGIS/Qt enum value in the provider is used fully scoped.

Qt6's PyQt drops the unscoped aliases (``QgsProcessingParameterNumber.Integer``); the scoped form
(``QgsProcessingParameterNumber.Type.Integer``) works from QGIS 3.22 on. Names are resolved against
the running QGIS, so the check knows which attributes really are enum values.
"""

import ast
import importlib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHECKED = sorted((PROJECT_ROOT / "processing_provider").glob("*.py")) + [PROJECT_ROOT / "csakd_plugin.py"]


def _is_enum_value(value) -> bool:
    # sip enums (PyQt5) are int subclasses; Qt6 and QGIS's Qgis enums are enum.Enum members.
    import enum

    return isinstance(value, enum.Enum) or (isinstance(value, int) and type(value) not in (int, bool))


def _imported_qt_names(tree):
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qgis":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name):
                    names[alias.asname or alias.name] = getattr(module, alias.name)
    return names


def unscoped_enum_uses(source: str, filename: str = "<source>"):
    """'file:line Owner.Value' for each enum value reached through its owning class instead of its enum type."""
    tree = ast.parse(source, filename)
    names = _imported_qt_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, inner = [node.attr], node.value
        while isinstance(inner, ast.Attribute):
            chain.append(inner.attr)
            inner = inner.value
        if not isinstance(inner, ast.Name) or inner.id not in names:
            continue
        owner = names[inner.id]
        path = list(reversed(chain))
        for attribute in path[:-1]:
            owner = getattr(owner, attribute, None)
        value = getattr(owner, path[-1], None)
        # Scoped: the value is reached through its own enum type (Owner.Type.Value).
        if _is_enum_value(value) and owner is not type(value):
            found.append(f"{filename}:{node.lineno} {inner.id}.{'.'.join(path)}")
    return found


def test_the_check_finds_an_unscoped_enum_and_accepts_the_scoped_form():
    unscoped = (
        "from qgis.core import QgsProcessingParameterNumber, QgsProcessing\n"
        "a = QgsProcessingParameterNumber.Integer\n"
        "b = QgsProcessing.TypeRaster\n"
    )
    assert unscoped_enum_uses(unscoped) == [
        "<source>:2 QgsProcessingParameterNumber.Integer", "<source>:3 QgsProcessing.TypeRaster"
    ]
    scoped = (
        "from qgis.core import QgsProcessingParameterNumber, QgsProcessing\n"
        "a = QgsProcessingParameterNumber.Type.Integer\n"
        "b = QgsProcessing.SourceType.TypeRaster\n"
    )
    assert unscoped_enum_uses(scoped) == []


def test_provider_code_uses_only_scoped_enums():
    found = []
    for path in CHECKED:
        found += unscoped_enum_uses(path.read_text(encoding="utf-8"), str(path.relative_to(PROJECT_ROOT)))
    assert not found, "use the scoped form (Class.EnumType.Value) for:\n" + "\n".join(found)
