"""scripts/relayout.py: the rewriting of references to moved modules, on texts written
here (the real run is one commit; these keep the script right for the runs after
other branches are merged)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "relayout.py"


@pytest.fixture(scope="module")
def relayout() -> ModuleType:
    spec = importlib.util.spec_from_file_location("relayout", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rewrite(relayout: ModuleType, text: str, where: str = "tests/test_x.py",
            flat: bool = True) -> str:
    """``text`` rewritten as the file ``where``; ``flat``: before the move (fs.py is there)."""
    moves = {m: p for m, p in relayout.PLACES.items() if p} if flat else {}
    out = relayout.rewrite(text, ROOT / where, moves)
    again = relayout.rewrite(out, ROOT / where, {})
    assert again == out, "a second run changes nothing"
    return out


def test_imports_from_the_package_are_split_per_room(relayout: ModuleType) -> None:
    text = ("from buffyfs import __version__, downloader, gc, mounttable, watchdog\n"
            "def f():\n"
            "    from buffyfs import commands as c  # noqa: F401 (a reason)\n")
    assert rewrite(relayout, text) == (
        "from buffyfs import __version__, mounttable, watchdog\n"
        "from buffyfs.fetch import downloader\n"
        "from buffyfs.store import gc\n"
        "def f():\n"
        "    from buffyfs.store import commands as c  # noqa: F401 (a reason)\n")
    assert rewrite(relayout, "from buffyfs import (\n    fs,\n    links,\n)\n") == \
        "from buffyfs.fs import handlers as fs, links\n"  # the bound names stay
    assert rewrite(relayout, "from buffyfs import errors, options\n") == \
        "from buffyfs import errors, options\n"


def test_module_paths_in_code_strings_and_commands(relayout: ModuleType) -> None:
    text = ('from buffyfs.index import Index, SourceInode\n'
            'import buffyfs.cache, buffyfs.config\n'
            'monkeypatch.setattr("buffyfs.refresh.Refresher.run", boom)\n'
            'plant("buffyfs.gc:plan_snapshot")\n'
            'cmd = [sys.executable, "-m", "buffyfs.unpack", blob]\n'
            'if b"buffyfs.unpack\\0" in cmdline: ...\n'
            '# see buffyfs/fs.py and buffyfs/http/ranges.py; buffyfs.http.ranges stays\n'
            'x = buffyfs.ranges.plan + buffyfs.fs.BuffyFS.open + mybuffyfs.gc\n'
            'from buffyfs.fs import BuffyFS, ROOT\n'
            'from buffyfs.fstree import (  # noqa: F401\n    Tree,\n)\n')
    assert rewrite(relayout, text) == (
        'from buffyfs.store.index import Index, SourceInode\n'
        'import buffyfs.store.cache, buffyfs.config\n'
        'monkeypatch.setattr("buffyfs.fetch.refresh.Refresher.run", boom)\n'
        'plant("buffyfs.store.gc:plan_snapshot")\n'
        'cmd = [sys.executable, "-m", "buffyfs.store.unpack", blob]\n'
        'if b"buffyfs.store.unpack\\0" in cmdline: ...\n'
        '# see buffyfs/fs/handlers.py and buffyfs/http/ranges.py; buffyfs.http.ranges stays\n'
        'x = buffyfs.fetch.ranges.plan + buffyfs.fs.handlers.BuffyFS.open + mybuffyfs.gc\n'
        'from buffyfs.fs.handlers import BuffyFS, ROOT\n'
        'from buffyfs.fs.tree import (  # noqa: F401\n    Tree,\n)\n')


def test_an_import_made_too_long_is_wrapped(relayout: ModuleType) -> None:
    names = "FIRST_TAGDIR_INO, ROOT, ROOT_CONTROL, ROOT_METRICS, ROOT_STATUS, BuffyFS"
    assert len(f"from buffyfs.fs import {names}") <= 100
    assert rewrite(relayout, f"from buffyfs.fs import {names}\n") == (
        "from buffyfs.fs.handlers import (\n    FIRST_TAGDIR_INO,\n    ROOT,\n"
        "    ROOT_CONTROL,\n    ROOT_METRICS,\n    ROOT_STATUS,\n    BuffyFS,\n)\n")


def test_the_new_layout_is_left_alone(relayout: ModuleType) -> None:
    text = ("from buffyfs.fs import handlers, tree\n"
            "from buffyfs.fs import (\n    links,\n    unpackfs,\n)\n"
            "from buffyfs.fs.handlers import BuffyFS\n"
            "x = buffyfs.fs.tree.Tree\n"
            "log = 'buffyfs.fs'\n"
            "from buffyfs.store.index import Index\n")
    assert rewrite(relayout, text, flat=False) == text
    # written against the flat layout after the move (a branch merged later): placed
    assert rewrite(relayout, "from buffyfs.fs import BuffyFS\n", flat=False) == \
        "from buffyfs.fs.handlers import BuffyFS\n"


def test_relative_imports_are_made_absolute(relayout: ModuleType) -> None:
    text = "from .index import Index\nfrom . import gc, errors\nfrom .errors import BadInput\n"
    assert rewrite(relayout, text, "buffyfs/refresh.py") == (
        "from buffyfs.store.index import Index\n"
        "from buffyfs import errors\nfrom buffyfs.store import gc\n"
        "from buffyfs.errors import BadInput\n")
    assert rewrite(relayout, "from ..index import Index\nfrom . import access\n",
                   "buffyfs/http/app.py") == \
        "from buffyfs.store.index import Index\nfrom buffyfs.http import access\n"


def test_a_module_it_has_no_place_for_stops_it(relayout: ModuleType, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "buffyfs"
    (pkg / "http").mkdir(parents=True)
    (pkg / "http" / "__init__.py").write_text("")
    (pkg / "index.py").write_text("")
    monkeypatch.setattr(relayout, "PKG", pkg)
    monkeypatch.setattr(relayout, "ROOT", tmp_path)
    assert relayout.plan() == {"index": "store.index"}
    (pkg / "novel.py").write_text("")
    (pkg / "room").mkdir()
    (pkg / "room" / "__init__.py").write_text("")
    with pytest.raises(relayout.Unplaced, match="novel.py, room/"):
        relayout.plan()
    (pkg / "novel.py").unlink()
    (pkg / "room" / "__init__.py").unlink()
    (pkg / "store").mkdir()
    (pkg / "store" / "index.py").write_text("")
    with pytest.raises(relayout.Unplaced, match="both"):
        relayout.plan()


def test_every_module_has_a_place_and_a_dry_run_changes_nothing() -> None:
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout == before
