"""Imports flow one way (buffyfs/__init__.py): the faces at the top import the rooms;
fs/ and http/ import fetch/ and store/; fetch/ imports store/; every room imports the
leaves, which import only each other. Read from the code (every import, also those
inside functions), in the flat layout as in the rooms (scripts/relayout.py's table says
where a flat module goes)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANKS = {"leaf": 0, "store": 1, "fetch": 2, "fs": 3, "http": 3, "top": 4}


def _relayout():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("relayout", ROOT / "scripts/relayout.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RELAYOUT = _relayout()


def room(module: str) -> str | None:
    """The room of ``buffyfs.X[.Y...]`` (None: not buffyfs, or the package itself)."""
    parts = module.split(".")
    if parts[0] != "buffyfs" or len(parts) == 1 or parts[1].startswith("__"):
        return None
    if parts[1] in RANKS or (ROOT / "buffyfs" / parts[1]).is_dir():
        return parts[1]
    place = RELAYOUT.PLACES.get(parts[1])
    if place:
        return place.split(".")[0]
    if place is None:  # a module the table does not know: test_relayout says so
        return None
    return "top" if parts[1] in RELAYOUT.FACES else "leaf"


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # from buffyfs import x: the module x; from buffyfs.m import name: m
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names] \
                if node.module == "buffyfs" else [(node.lineno, node.module)]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def test_imports_flow_one_way() -> None:
    wrong = []
    for path in sorted((ROOT / "buffyfs").rglob("*.py")):
        here = room(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if here is None:
            continue
        for line, target in imports(path):
            there = room(target)
            if there is None or there == here:
                continue
            if RANKS[there] >= RANKS[here]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {here} imports {target} "
                             f"({there})")
    assert not wrong, "\n".join(wrong)


def test_the_rule_is_checked() -> None:
    assert room("buffyfs.index") == room("buffyfs.store.index") == "store"
    assert room("buffyfs.fs") == "fs" and room("buffyfs.fs.handlers") == "fs"
    assert room("buffyfs.errors") == "leaf" and room("buffyfs.cli") == "top"
    assert room("buffyfs.http.app") == "http" and room("buffyfs.__version__") is None
