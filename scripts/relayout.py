#!/usr/bin/env python3
"""Group buffyfs's flat modules into subpackages that show the layers (issue 12, item 4).

    python3 scripts/relayout.py [--dry-run]

Moves each module of ``buffyfs/`` to its room (``git mv``; ``PLACES`` below) and rewrites
every reference to it in buffyfs/, tests/, bench/, scripts/, docs/, contrib/, .ci/ and
pyproject.toml:

    from buffyfs import a, b          split per room: from buffyfs.fetch import a ...
    from buffyfs.X import ...         import buffyfs.X      buffyfs.X.attr   "buffyfs.X:f"
    python -m buffyfs.X               buffyfs/X.py          from .X import / from . import X
                                                            (made absolute)

It is idempotent (a second run changes nothing) and meant to be run again after other
branches are merged: references written against the flat layout are rewritten wherever
they appear. It fails, changing nothing, on anything it cannot place: a module of
``buffyfs/`` missing from ``PLACES``, an unknown subpackage, or a move whose target
exists already. README.md is not touched (its mentions are listed for a hand edit).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "buffyfs"

# Every module of buffyfs/ -> its place under buffyfs ("" : stays at the top).
# The top holds the faces (command line, daemon lifecycle, the daemon's assembly) and the
# leaves everything may import. Imports flow one way: top faces -> fs/, http/ -> fetch/
# -> store/ -> leaves.
PLACES = {
    # faces
    "__init__": "", "__main__": "", "cli": "", "daemon": "", "mount": "", "mountctl": "",
    "mounttable": "", "watchdog": "", "busy": "",
    # leaves (log.py opens its file with safeio, so safeio is a leaf too)
    "errors": "", "options": "", "config": "", "control": "", "log": "", "crash": "",
    "safeio": "", "priority": "",
    # fs/: the FUSE view
    "fs": "fs.handlers", "fstree": "fs.tree", "unpackfs": "fs.unpackfs", "links": "fs.links",
    "snapshots": "fs.snapshots",
    # fetch/: getting bytes from origins and hubs, and when
    "downloader": "fetch.downloader", "httplog": "fetch.httplog",
    "parallel": "fetch.parallel", "ranges": "fetch.ranges", "segments": "fetch.segments",
    "streaming": "fetch.streaming", "refresh": "fetch.refresh",
    "scheduler": "fetch.scheduler", "policy": "fetch.policy", "upstream": "fetch.upstream",
    "replica": "fetch.replica",
    # store/: what is kept, its records, and the rules that change it
    "index": "store.index", "blobs": "store.blobs", "cache": "store.cache",
    "commands": "store.commands", "gc": "store.gc", "check": "store.check",
    "scrub": "store.scrub", "status": "store.status", "metrics": "store.metrics",
    "unpack": "store.unpack", "unpacker": "store.unpacker", "validate": "store.validate",
    "revalidate": "store.revalidate",
    "writes": "store.writes",  # branch stall12: the downloads' queued index writes
}
FACES = {"cli", "daemon", "mount", "mountctl", "mounttable", "watchdog", "busy"}
SUBPACKAGES = {  # new rooms: the docstring of their __init__.py
    "fs": "The FUSE view of the cache: the tree (inodes and names, no pyfuse3), the\n"
          "thin handlers over it, the @unpacked tree, link counts and snapshots of the\n"
          "generated files. Imports fetch/ and store/, never http/.",
    "fetch": "Getting bytes: one HTTP attempt, segmented and parallel downloads, reads of\n"
             "a file still arriving, one refresh, when each source is checked, and the\n"
             "replica's hub client and follower. Imports store/, never fs/ or http/.",
    "store": "What is kept: the LMDB index and its records, the blob store, the cache\n"
             "as a whole, the rules of control commands, collection, checks, scrub,\n"
             "validation, @status and @metrics, unpacked (derived) data. Imports only\n"
             "the leaves at the top (errors, options, control, safeio, priority, crash).",
}
KEPT_SUBPACKAGES = {"http"}  # rooms that exist already and keep their modules
WHERE = ["buffyfs", "tests", "bench", "scripts", "docs", "contrib", ".ci", "pyproject.toml"]
NOT_REWRITTEN = {"scripts/relayout.py", "tests/test_relayout.py",  # they quote old names
                 "tests/test_layers.py"}
SUFFIXES = {".py", ".md", ".toml", ".sh", ".service", ".conf", ".cfg", ".txt", ""}
LINE = 100


class Unplaced(Exception):
    pass


def plan() -> dict[str, str]:
    """old module -> new dotted place, for the modules still flat; Unplaced if any
    module or subpackage of buffyfs/ is unknown."""
    unknown = [p.name for p in sorted(PKG.glob("*.py")) if p.stem not in PLACES]
    for d in sorted(p for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"):
        if d.name not in KEPT_SUBPACKAGES | set(SUBPACKAGES) and (d / "__init__.py").exists():
            unknown.append(d.name + "/")
    if unknown:
        raise Unplaced("no place for " + ", ".join(unknown) + ": add them to PLACES (or "
                       "KEPT_SUBPACKAGES) at the top of scripts/relayout.py")
    moves = {}
    for old, new in PLACES.items():
        if not new:
            continue
        src, dst = PKG / f"{old}.py", PKG / (new.replace(".", "/") + ".py")
        if src.exists() and dst.exists():
            raise Unplaced(f"both {src.relative_to(ROOT)} and {dst.relative_to(ROOT)} exist")
        if src.exists():
            moves[old] = new
    return moves


def submodules(package: str) -> set[str]:
    """The modules a subpackage holds once moved (by the table, and on disk)."""
    out = {new.split(".", 1)[1] for new in PLACES.values() if new.startswith(package + ".")}
    return out | {p.stem for p in (PKG / package).glob("*.py")}


# --- rewriting --------------------------------------------------------------------------

FROM_ROOT = re.compile(r"^(?P<indent>[ \t]*)from buffyfs import (?P<body>\([^)]*\)|[^\n]*)",
                       re.M)
RELATIVE = re.compile(
    r"^(?P<indent>[ \t]*)from (?P<dots>\.+)(?P<mod>[\w.]*) import (?P<body>\([^)]*\)|[^\n]*)",
    re.M)
MOVED_NAMES = "|".join(sorted((re.escape(m) for m, p in PLACES.items() if p), key=len,
                              reverse=True))
DOTTED = re.compile(rf"(?<![\w.])buffyfs\.(?P<mod>{MOVED_NAMES})(?![\w])"
                    r"(?P<after>\.\w+| import (?:\([^)]*\)|[^\n]*))?")
PATH = re.compile(rf"(?<![\w/])buffyfs/(?P<mod>{MOVED_NAMES})\.py\b")


def parse_names(body: str) -> tuple[list[tuple[str, str | None]], str]:
    """(name, alias) of an import list, and its trailing comment."""
    comment = ""
    if not body.startswith("("):
        body, sep, comment = body.partition("#")
        comment = sep + comment
    lines = [line.split("#")[0] for line in body.strip("()").splitlines()] or [""]
    names = []
    for word in " ".join(lines).split(","):
        if word.strip():
            name, _, alias = word.strip().partition(" as ")
            names.append((name.strip(), alias.strip() or None))
    return names, comment.strip()


def import_line(indent: str, module: str, names: list[tuple[str, str | None]],
                comment: str = "") -> str:
    words = [n if a is None else f"{n} as {a}" for n, a in names]
    line = f"{indent}from {module} import {', '.join(words)}"
    if comment:
        line += "  " + comment
    if len(line) <= LINE or len(words) == 1:
        return line
    inner = "".join(f"{indent}    {w},\n" for w in words)
    return f"{indent}from {module} import ({'  ' + comment if comment else ''}\n{inner}{indent})"


def rewrite_from_root(indent: str, names: list[tuple[str, str | None]], comment: str
                      ) -> str | None:
    """``from buffyfs import ...`` split per room; None when nothing in it moved."""
    stay = [(n, a) for n, a in names if not PLACES.get(n)]
    rooms: dict[str, list[tuple[str, str | None]]] = {}
    for name, alias in names:
        place = PLACES.get(name)
        if place:
            package, module = place.rsplit(".", 1)
            rooms.setdefault(package, []).append(
                (module, alias if alias or module == name else name))
    if not rooms:
        return None
    lines = [import_line(indent, "buffyfs", stay, comment)] if stay else []
    for i, (package, members) in enumerate(sorted(rooms.items())):
        lines.append(import_line(indent, f"buffyfs.{package}", members,
                                 comment if not stay and i == 0 else ""))
    return "\n".join(lines)


def module_of(path: Path) -> str | None:
    """The dotted name of a module under buffyfs/ (None elsewhere)."""
    try:
        rel = path.relative_to(ROOT).with_suffix("")
    except ValueError:
        return None
    if rel.parts[0] != "buffyfs":
        return None
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rewrite(text: str, path: Path, moves: dict[str, str]) -> str:
    here = module_of(path)
    package = (here if path.name == "__init__.py" else here.rsplit(".", 1)[0]) \
        if here else None

    def relative(m: re.Match[str]) -> str:
        if package is None:
            return m.group(0)
        up = len(m.group("dots")) - 1
        base = package.split(".")
        if up >= len(base):
            raise Unplaced(f"{path}: relative import above the package: {m.group(0)!r}")
        absolute = ".".join(base[:len(base) - up] + ([m.group("mod")] if m.group("mod") else []))
        # made absolute (the project's style), then placed as any absolute import
        return m.group("indent") + f"from {absolute} import {m.group('body')}"

    def from_root(m: re.Match[str]) -> str:
        names, comment = parse_names(m.group("body"))
        new = rewrite_from_root(m.group("indent"), names, comment)
        return m.group(0) if new is None else new

    def dotted(m: re.Match[str]) -> str:
        mod, after = m.group("mod"), m.group("after") or ""
        if mod in SUBPACKAGES:  # also the name of the room it moves into (fs)
            inside = submodules(mod)
            if after.startswith("."):
                if after[1:] in inside:
                    return m.group(0)  # buffyfs.fs.tree: the new layout already
            elif after.startswith(" import "):
                names, _ = parse_names(after[len(" import "):])
                if names and all(n in inside for n, _ in names):
                    return m.group(0)  # from buffyfs.fs import tree
            elif mod not in moves:
                return m.group(0)  # a bare buffyfs.fs once moved: the package
        return f"buffyfs.{PLACES[mod]}{after}"

    def file_path(m: re.Match[str]) -> str:
        return "buffyfs/" + PLACES[m.group("mod")].replace(".", "/") + ".py"

    if path.suffix == ".py":
        text = RELATIVE.sub(relative, text)
    text = FROM_ROOT.sub(from_root, text)
    text = DOTTED.sub(dotted, text)
    if path.suffix == ".py":
        text = LONG_IMPORT.sub(wrapped, text)
    return PATH.sub(file_path, text)


LONG_IMPORT = re.compile(rf"^(?P<indent>[ \t]*)from (?P<module>buffyfs[\w.]*) import "
                         rf"(?P<body>[^(#\n]*)$(?<=.{{{LINE + 1}}})", re.M)


def wrapped(m: re.Match[str]) -> str:
    """A one-line import the new module path made too long, in parentheses."""
    names, _ = parse_names(m.group("body"))
    return import_line(m.group("indent"), m.group("module"), names)


def packages_line(text: str) -> str:
    """pyproject's ``packages = [...]`` with the new rooms."""
    def add(m: re.Match[str]) -> str:
        listed = re.findall(r'"([^"]+)"', m.group(1))
        wanted = listed + [f"buffyfs.{p}" for p in SUBPACKAGES if f"buffyfs.{p}" not in listed]
        return "packages = [" + ", ".join(f'"{p}"' for p in wanted) + "]"
    return re.sub(r"^packages = \[([^\]]*)\]", add, text, flags=re.M)


LAYOUT_START = "Layout (scripts/relayout.py writes this part"
LAYOUT = (LAYOUT_START + " from its table). Imports flow one way: the faces ({faces}) "
          "import the rooms; fs/ and http/ (the two views of the cache, FUSE and HTTP) "
          "import fetch/ and store/; fetch/ imports store/; every room may import the "
          "leaves at the top ({leaves}), which import only each other.")


def layout_doc() -> str:
    rooms: dict[str, list[str]] = {}
    for old, new in PLACES.items():
        room, _, module = new.rpartition(".")
        there = (PKG / f"{old}.py").exists() or (PKG / (new.replace(".", "/") + ".py")).exists()
        if new and there:
            rooms.setdefault(room + "/", []).append(module)
    faces = [m for m in PLACES if not PLACES[m] and m in FACES]
    lines = [f"    {'top':9s}{', '.join(faces)}", f"    {'http/':9s}the server (its own modules)"]
    lines += [f"    {room:9s}{', '.join(mods)}" for room, mods in rooms.items()]
    leaves = [m for m in PLACES if not PLACES[m] and m not in FACES and not m.startswith("_")]
    text = textwrap.fill(LAYOUT.format(faces=", ".join(faces), leaves=", ".join(leaves)),
                         LINE - 12)
    return text + "\n\n" + "\n".join(
        textwrap.fill(line, LINE - 12, subsequent_indent=" " * 13) for line in lines) + "\n"


def with_layout(text: str) -> str:
    """buffyfs/__init__.py with the layout in its docstring (replaced if there)."""
    first, sep, rest = text.partition('"""\n')
    if not first.startswith('"""') or not sep:
        raise Unplaced("buffyfs/__init__.py does not start with a docstring")
    head = first.split("\n\n" + LAYOUT_START)[0].rstrip("\n")
    return f"{head}\n\n{layout_doc()}{sep}{rest}"


def files() -> list[Path]:
    out = []
    for where in WHERE:
        p = ROOT / where
        candidates = [p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else []
        out += [f for f in candidates if f.is_file() and f.suffix in SUFFIXES
                and "__pycache__" not in f.parts
                and str(f.relative_to(ROOT)) not in NOT_REWRITTEN]
    return out


def sort_imports(paths: list[Path], dry_run: bool) -> None:
    """Sort the rewritten imports (ruff's isort rule), when ruff is at hand."""
    if not paths or dry_run:
        return
    ruff = shutil.which("ruff") or next(
        (str(p) for p in (ROOT / ".venv/bin/ruff",) if p.exists()), None)
    if ruff is None:
        print("relayout: ruff not found: imports are placed but not sorted")
        return
    subprocess.run([ruff, "check", "--quiet", "--select", "I", "--fix", "--exit-zero",
                    *map(str, paths)], cwd=ROOT, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="say what would change")
    args = parser.parse_args()
    try:
        moves = plan()
        changed: dict[Path, tuple[str, str]] = {}
        for f in files():
            try:
                text = f.read_text()
            except UnicodeDecodeError:
                continue
            new = rewrite(text, f, moves)
            if f.name == "pyproject.toml":
                new = packages_line(new)
            if f == PKG / "__init__.py":
                new = with_layout(new)
            if new != text:
                changed[f] = (text, new)
    except Unplaced as e:
        print(f"relayout: {e}; nothing changed", file=sys.stderr)
        return 1
    for f, (text, new) in changed.items():
        print(f"rewrite {f.relative_to(ROOT)}")
        if not args.dry_run:
            f.write_text(new)
        before = set(text.splitlines())
        for n, line in enumerate(new.splitlines(), 1):
            if len(line) > LINE and f.suffix == ".py" and line not in before:
                print(f"relayout: {f.relative_to(ROOT)}:{n} is over {LINE} characters now "
                      "(before the move)")
    for package, doc in SUBPACKAGES.items():
        init = PKG / package / "__init__.py"
        if any(p.startswith(package + ".") for p in moves.values()) and not init.exists():
            print(f"create {init.relative_to(ROOT)}")
            if not args.dry_run:
                init.parent.mkdir(exist_ok=True)
                init.write_text(f'"""{doc}"""\n')
                subprocess.run(["git", "add", str(init)], cwd=ROOT, check=True)
    for old, new in moves.items():
        src, dst = PKG / f"{old}.py", PKG / (new.replace(".", "/") + ".py")
        print(f"move {src.relative_to(ROOT)} -> {dst.relative_to(ROOT)}")
        if not args.dry_run:
            subprocess.run(["git", "mv", str(src), str(dst)], cwd=ROOT, check=True)
    moved = {PKG / f"{old}.py": PKG / (new.replace(".", "/") + ".py") for old, new in moves.items()}
    # after the moves: ruff tells first-party modules by the files it finds
    sort_imports([moved.get(f, f) for f in changed if f.suffix == ".py"], args.dry_run)
    readme = ROOT / "README.md"
    if readme.exists():
        mentions = sorted({m.group(0) for m in DOTTED.finditer(readme.read_text())}
                          | {m.group(0) for m in PATH.finditer(readme.read_text())})
        if mentions:
            print("README.md (not touched) mentions: " + ", ".join(mentions))
    if not changed and not moves:
        print("relayout: nothing to do (the layout is in place)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
