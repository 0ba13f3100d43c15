"""``revalidate VERSION``: run a source's current ``validate`` checks again on a kept
version, and retag it ``valid`` or ``failed``.

The checks may run a command for a while, so they run before the index transaction,
never inside it: ``judge`` gives each ``revalidate`` command its verdict, then the
``revalidate`` rule (commands.py) applies it in the write's transaction, once it has
made sure the version it names is still the one judged.
"""

from __future__ import annotations

from buffyfs.control import Command
from buffyfs.errors import NotFound
from buffyfs.store import commands, validate
from buffyfs.store.blobs import BlobStore
from buffyfs.store.index import Index
from buffyfs.store.records import Source, Version


async def judge(index: Index, blobs: BlobStore, parsed: list[Command],
                source: str | None) -> None:
    """Set ``verdict`` on each ``revalidate`` command of ``parsed`` (addressed to
    ``source``): ``{"id", "failure"}``, failure None when every check passes."""
    for cmd in parsed:
        if cmd.word != "revalidate" or source is None:
            continue  # (a revalidate on the root's control file is refused by the rules)
        with index.read() as r:
            src = r.source(source)
            if src is None:
                raise NotFound(f"no source named {source!r}")
            v = commands.version(r, source, cmd.args[0])
        cmd.verdict = {"id": v.id, "failure": await check(src, v, blobs)}


async def check(source: Source, version: Version,
                blobs: BlobStore) -> str | None:
    """Why ``version`` fails ``source``'s current checks, or None."""
    rules = source.options.get("validate") or {}
    return await validate.failure(rules, blobs.path(version.sha256), version.size,
                                  version.sha256, version.content_type)
