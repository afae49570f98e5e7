"""The package's shape, read with ``ast``: private names stay home, imports form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest

import omnifix

SOURCE = Path(omnifix.__file__).parent


class Import(NamedTuple):
    importer: str  # dotted module name
    source: str  # the module imported from
    name: str | None  # the name imported from it (None for ``import x``)
    line: int
    in_function: bool
    typing_only: bool  # inside ``if TYPE_CHECKING:``
    commented: bool  # a comment on the line or the one above


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    path = SOURCE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _visit(
    node: ast.AST, importer: str, lines: list[str], *, in_function: bool, typing_only: bool
) -> list[Import]:
    found: list[Import] = []
    for child in ast.iter_child_nodes(node):
        function = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
        typing = typing_only or (
            isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
        )
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            line = child.lineno
            commented = "#" in lines[line - 1] or lines[line - 2].strip().startswith("#")
            if isinstance(child, ast.Import):
                pairs = [(alias.name, None) for alias in child.names]
            else:
                pairs = [(child.module or "", alias.name) for alias in child.names]
            found += [
                Import(importer, source, name, line, in_function, typing_only, commented)
                for source, name in pairs
                if source == "omnifix" or source.startswith("omnifix.")
            ]
        found += _visit(child, importer, lines, in_function=function, typing_only=typing)
    return found


def _imports() -> list[Import]:
    found: list[Import] = []
    for path in sorted(SOURCE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        found += _visit(
            tree, _module_name(path), text.splitlines(), in_function=False, typing_only=False
        )
    return found


IMPORTS = _imports()


def test_the_reader_sees_the_package() -> None:
    importers = {entry.importer for entry in IMPORTS}
    assert {"omnifix", "omnifix._load", "omnifix._devices"} <= importers
    assert any(entry.name and entry.name.startswith("_") for entry in IMPORTS)  # e.g. _version


def test_no_module_imports_another_modules_private_name() -> None:
    offenders = []
    for entry in IMPORTS:
        name = entry.name
        if name is None or not name.startswith("_") or name.startswith("__"):
            continue
        target = f"{entry.source}.{name}"
        own_package = entry.importer == entry.source or entry.importer.startswith(
            entry.source + "."
        )
        if _is_module(target) and (own_package or entry.source == "omnifix"):
            continue  # a private module of its own package (``from omnifix import _version``)
        offenders.append(f"{entry.importer}:{entry.line} imports {name} from {entry.source}")
    assert offenders == []


def test_internal_imports_are_at_module_top_unless_a_comment_says_why() -> None:
    hidden = [
        f"{entry.importer}:{entry.line} ({entry.source})"
        for entry in IMPORTS
        if entry.in_function and not entry.commented
    ]
    assert hidden == []


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for entry in IMPORTS:
        if entry.typing_only:
            continue
        target = entry.source
        if entry.name is not None and _is_module(f"{entry.source}.{entry.name}"):
            target = f"{entry.source}.{entry.name}"
        if target != entry.importer:
            graph.setdefault(entry.importer, set()).add(target)
    return graph


def test_imports_form_no_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target == "omnifix" or target.startswith(f"{module}."):
                continue  # the package root, and a package importing its own modules
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert cycles == []


@pytest.mark.parametrize("bottom", ["omnifix._compat", "omnifix._units", "omnifix._device_map"])
def test_the_bottom_layer_imports_no_feature_module(bottom: str) -> None:
    allowed = {"omnifix.errors", "omnifix._compat", "omnifix._units"}
    assert _graph().get(bottom, set()) <= allowed
