"""docs/reference.md against the code's own tables, so that the reference cannot drift:
whatever the code has and the page does not (or the reverse) fails, naming it and the
section of the page where it belongs.

The page's shape that this reads: sections are markdown headings; a table's first
column holds the name in backticks (`` | `key` | ... ``); a control file's commands are
list items (`` - `word ARGS` ``); a command's section is headed `` ### `buffyfs WORD ...` ``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from buffyfs import cli, config, control, daemon, errors, options
from buffyfs.store.cache import Cache
from buffyfs.store.index import now_utc, rfc3339
from buffyfs.store.metrics import SOURCE_GAUGES, Metrics
from buffyfs.store.records import Version

DOCS = Path(__file__).resolve().parent.parent / "docs"
REFERENCE = DOCS / "reference.md"


def sections() -> dict[str, str]:
    """Heading text (without #'s) -> the text under it, up to the next heading."""
    out: dict[str, str] = {}
    heading = ""
    fence = False
    for line in REFERENCE.read_text().splitlines():
        fence ^= line.startswith("```")
        m = None if fence else re.match(r"#{1,4} (.+)", line)
        if m:
            heading = m.group(1).strip()
            out[heading] = ""
        else:
            out[heading] = out.get(heading, "") + line + "\n"
    return out


def section(title: str) -> str:
    found = sections()
    assert title in found, f"docs/reference.md has no section {title!r}"
    return found[title]


def table_names(text: str) -> list[str]:
    """The backticked first cells of a table's rows (the first word of each)."""
    return [m.group(1).split()[0] for m in re.finditer(r"^\| *`([^`]+)`", text, re.M)]


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\| *`([^`]+)`", line)
        if m:
            rows[m.group(1).split()[0]] = [c.strip() for c in line.strip("|").split("|")]
    return rows


def compare(where: str, in_code: set[str] | list[str], in_docs: set[str] | list[str],
            what: str) -> list[str]:
    """Messages naming what one side has and the other has not."""
    code, docs = set(in_code), set(in_docs)
    return ([f"{what} {name!r} is in the code but not in docs/reference.md ({where})"
             for name in sorted(code - docs)]
            + [f"{what} {name!r} is in docs/reference.md ({where}) but not in the code"
               for name in sorted(docs - code)])


def test_source_options_and_their_defaults():
    text = section("Source options")
    problems = compare("section 'Source options'", {"url", *options.DEFAULT_OPTIONS},
                       table_names(text), "source option")
    rows = table_rows(text)
    for key, default in options.DEFAULT_OPTIONS.items():
        if key not in rows:
            continue
        shown = "none" if default in (None, {}) else str(default).lower() \
            if isinstance(default, bool) else str(default)
        cell = rows[key][-1]
        if cell.strip("`") != shown:
            problems.append(f"source option {key!r}: docs/reference.md says the default is "
                            f"{cell}, the code's (options.DEFAULT_OPTIONS) is {shown!r}")
    problems += compare("section 'Validation checks'", options.VALIDATE_KEYS,
                        table_names(section("Validation checks")), "validate check")
    assert not problems, "\n".join(problems)


def test_daemon_keys_and_fstab_options():
    problems = compare("section '`[daemon]`'", config.DAEMON_KEYS,
                       table_names(section("`[daemon]`")), "[daemon] key")
    problems += compare("section '`[serve]`'", config.SERVE_KEYS,
                        table_names(section("`[serve]`")), "[serve] key")
    problems += compare("section '`[proxy]`'", config.PROXY_KEYS,
                        table_names(section("`[proxy]`")), "[proxy] key")
    fstab = {*daemon.FSTAB_FLAGS, *(k + "=" for k in daemon.FSTAB_VALUES)}
    documented = [n.split("=")[0] + "=" if "=" in n else n
                  for n in table_names(section("fstab"))]
    problems += compare("section 'fstab'", fstab, documented, "fstab option")
    assert not problems, "\n".join(problems)


def test_control_words():
    problems = []
    for scope, title in (("root", "`MOUNT/@control`"), ("source", "`MOUNT/SOURCE/@control`")):
        words = [m.group(1).split()[0]
                 for m in re.finditer(r"^- `([^`]+)`", section(title), re.M)]
        problems += compare(f"section '{title}'", control.GRAMMAR[scope], words,
                            "control command")
    assert not problems, "\n".join(problems)


def _status_objects(tmp_path: Path) -> tuple[dict, dict]:
    """A source's and the root's @status, with every optional key present."""
    cache = Cache(tmp_path / "cache")
    cache.add_source("s", "http://127.0.0.1:9/s", {})
    sha = "ab" * 32
    with cache.index.write() as w:
        ino = w.alloc_inodes(1)
        w.ref_blob(sha, 3)
        w.put_version("s", Version(id="20260101T000000Z-abababab", sha256=sha, size=3,
                                   fetched_at=rfc3339(now_utc()), url="http://127.0.0.1:9/s",
                                   ino=ino, tags=["failed"], validation="too small",
                                   damaged={"at": rfc3339(now_utc()), "reason": "test"},
                                   remote=True))
        w.put_unpacked(sha, {"kind": "gzip", "state": "error", "error": "truncated"})
    try:
        return cache.source_status("s"), cache.root_status()
    finally:
        cache.close()


def test_status_keys(tmp_path):
    source, root = _status_objects(tmp_path)
    problems = compare("section 'Source `@status` keys'", source,
                       table_names(section("Source `@status` keys")), "@status key")
    problems += compare("section 'Version entries'", source["versions"][0],
                        table_names(section("Version entries")), "version entry key")
    problems += compare("section 'Root `@status` keys'", root,
                        table_names(section("Root `@status` keys")), "root @status key")
    problems += compare("section 'Root source entries'", root["sources"][0],
                        table_names(section("Root source entries")),
                        "root @status source entry key")
    assert not problems, "\n".join(problems)


def test_metrics():
    names = []
    for family in Metrics().registry.collect():
        names.append(family.name + "_total" if family.type == "counter" else family.name)
    names += list(SOURCE_GAUGES)  # written per source, outside the registry
    problems = compare("section '`@metrics`'", names, table_names(section("`@metrics`")),
                       "metric")
    assert not problems, "\n".join(problems)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions if a.help != argparse.SUPPRESS
            for s in a.option_strings}


def test_command_line():
    parser = cli.build_parser()
    commands = parser.commands
    found = sections()
    headed = {}
    for title, text in found.items():
        m = re.fullmatch(r"`buffyfs (\S+)[^`]*`", title)
        if m:
            headed[m.group(1)] = text
    problems = compare("a section headed `buffyfs COMMAND ...` under 'The command line'",
                       commands, headed, "command")
    common = set()
    for name in table_names(section("Flags of every command")):
        common.add(name.rstrip(","))
    common |= {f for row in table_rows(section("Flags of every command")).values()
               for f in re.findall(r"`(-[-a-z]+)", row[0])}
    for word, sub in commands.items():
        if word not in headed:
            continue
        text = headed[word]
        in_docs = {f for row in table_rows(text).values()
                   for f in re.findall(r"`(-[-a-z]+)", row[0])}
        problems += compare(f"section '`buffyfs {word} ...`'", _flags(sub) - common,
                            in_docs, f"flag of buffyfs {word}:")
    assert not problems, "\n".join(problems)


def test_exit_codes():
    codes = {0, 130} | {cls.exit_code for cls in vars(errors).values()
                        if isinstance(cls, type) and issubclass(cls, errors.BuffyError)}
    problems = compare("section 'Exit codes'", {str(c) for c in codes},
                       table_names(section("Exit codes")), "exit code")
    assert not problems, "\n".join(problems)


def test_the_pages_link_each_other_and_readme_points_at_them():
    assert "install.md" in REFERENCE.read_text()
    install = (DOCS / "install.md").read_text()
    assert "reference.md" in install and "/usr/local/bin" in install
    for unit in ("buffyfs.service", "buffyfs-user.service"):
        assert (DOCS.parent / "contrib" / "systemd" / unit).exists()
