"""Copies of the mount with the usual tools: ``tar``, ``rsync -a -H`` and ``du`` see
real sizes for the generated files, can read ``@control``, and count a version
reachable by several names once (issue 19, item 4)."""

from __future__ import annotations

import json
import os
import subprocess

from hypothesis import given
from hypothesis import strategies as st

from buffyfs.fs import links
from buffyfs.store.index import newest_of, resolve_latest
from buffyfs.store.records import Source, Version
from tests.conftest import run_cli, wait_for
from tests.test_mount import read, status, write_control

TOOL_TIMEOUT = 60


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def four_names(origin, mnt) -> tuple[str, str]:
    """Source t with two versions; the newer is reachable as latest, @versions/ID,
    @keep/ID and @keep/latest. Returns (older id, newer id)."""
    origin.set("/t", b"old bytes")
    write_control(mnt / "@control", f"add t {origin.url('/t')}")
    assert read(mnt / "t/latest") == b"old bytes"
    origin.set("/t", b"the newer bytes")
    write_control(mnt / "t/@control", "refresh")
    wait_for(lambda: len(status(mnt / "t/@status")["versions"]) == 2, 10,
             what="the second version")
    newer, older = (v["id"] for v in status(mnt / "t/@status")["versions"])
    write_control(mnt / "t/@control", "tag latest keep")
    return older, newer


def test_link_counts_and_inodes(origin, mnt):
    older, newer = four_names(origin, mnt)
    names = ["t/latest", f"t/@versions/{newer}", f"t/@keep/{newer}", "t/@keep/latest",
             "t/newest"]
    stats = [os.stat(mnt / n) for n in names]
    assert {st.st_ino for st in stats} == {stats[0].st_ino}
    assert [st.st_nlink for st in stats] == [5] * 5
    assert os.stat(mnt / f"t/@versions/{older}").st_nlink == 1
    # latest moves to the older version: both link counts follow at once
    write_control(mnt / "t/@control", "tag latest failed")
    # @versions/ID, @keep/ID, @keep/latest, @failed/ID, @failed/latest, newest
    assert os.stat(mnt / f"t/@versions/{newer}").st_nlink == 6
    assert os.stat(mnt / f"t/@versions/{older}").st_nlink == 2  # and latest
    assert os.stat(mnt / "t/latest").st_ino == os.stat(mnt / f"t/@versions/{older}").st_ino
    # a change made by another process (the command line) reaches it too, within seconds
    run_cli("untag", "t", newer, "keep", cache=mnt.cache, check=True)
    wait_for(lambda: os.stat(mnt / f"t/@versions/{newer}").st_nlink == 4, 5,
             what="the link count after untag")  # @versions/ID, @failed/ID, @failed/latest,
    # newest


def test_generated_files_report_their_real_size(origin, mnt):
    origin.set("/s", b"s")
    write_control(mnt / "@control", f"add s {origin.url('/s')}")
    read(mnt / "s/latest")
    # A change in the index between a stat and the open builds a new snapshot (so a
    # command-line tag shows at once): let the refresh's trailing state writes (its
    # planned next check) land first, as nothing else writes after them.
    wait_for(lambda: (st := status(mnt / "s/@status")).get("next_check") and st["state"] == "idle",
             10, what="the refresh's last state write")
    for name in ("@status", "@metrics", "s/@status", "@control", "s/@control"):
        size = os.stat(mnt / name).st_size
        data = read(mnt / name)
        assert size > 0 and size == len(data), name
    assert json.loads(read(mnt / "s/@status"))["name"] == "s"
    assert b"add NAME URL" in read(mnt / "@control")  # a short help text
    assert b"tag VERSION TAG" in read(mnt / "s/@control")
    write_control(mnt / "s/@control", "tag latest keep")  # still a command file
    assert status(mnt / "s/@status")["versions"][0]["tags"] == ["keep"]


def test_tar_rsync_and_du_over_the_mount(origin, mnt, tmp_path):
    older, newer = four_names(origin, mnt)

    done = run("tar", "-cf", str(tmp_path / "m.tar"), "-C", str(mnt.path), ".")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    out = tmp_path / "untar"
    out.mkdir()
    assert run("tar", "-xf", str(tmp_path / "m.tar"), "-C", str(out)).returncode == 0
    assert json.loads((out / "@status").read_text())["sources"][0]["name"] == "t"
    assert json.loads((out / "t/@status").read_text())["latest"] == newer
    assert b"buffyfs_versions" in (out / "@metrics").read_bytes()
    assert (out / "t/latest").read_bytes() == b"the newer bytes"
    assert (out / "t/latest").stat().st_ino == (out / f"t/@keep/{newer}").stat().st_ino

    dest = tmp_path / "copy"
    done = run("rsync", "-a", "-H", f"{mnt.path}/", f"{dest}/")
    assert done.returncode == 0, done.stderr
    assert json.loads((dest / "t/@status").read_text())["name"] == "t"
    copies = [dest / n for n in ("t/latest", f"t/@versions/{newer}", f"t/@keep/{newer}",
                                 "t/@keep/latest")]
    assert len({p.stat().st_ino for p in copies}) == 1  # rsync -H stored one copy
    assert copies[0].stat().st_nlink == 5  # and newest
    assert (dest / f"t/@versions/{older}").read_bytes() == b"old bytes"

    # du counts the four names of the newer version once
    done = run("du", "-b", "-s", str(mnt / "t/latest"), str(mnt / "t/@versions"),
               str(mnt / "t/@keep"))
    assert done.returncode == 0, done.stderr
    total = sum(int(line.split()[0]) for line in done.stdout.splitlines())
    assert total == len(b"old bytes") + len(b"the newer bytes")


# --- links.py against the definitions it mirrors (no mount) -------------------------------

_version = st.fixed_dictionaries({
    "tags": st.lists(st.sampled_from(["valid", "failed", "keep", "x"]), unique=True),
    "damaged": st.booleans(),
})


@given(st.lists(_version, max_size=8), st.integers(-1, 8),
       st.sampled_from(["1d", "on-open"]), st.booleans())
def test_link_counts_match_the_layout(specs, pin_at, refresh, pinned_option):
    """Every version's link count is the number of names fs.py's layout gives it; the
    one-version scan agrees with the all-versions pass."""
    versions = [Version(id=f"2026010{i}T000000Z-0000000{i}", sha256="0" * 64, size=0,
                        fetched_at="", ino=100 + i, tags=s["tags"],
                        damaged={"at": "", "reason": ""} if s["damaged"] else None)
                for i, s in enumerate(specs)][::-1]  # newest first
    pin = f"2026010{pin_at}T000000Z-0000000{pin_at}" if pin_at >= 0 else None
    source = Source(url="http://h/s", ino=16, pin=pin,
                    options={"refresh": refresh, "pinned": pinned_option})
    latest = resolve_latest(source, versions)
    names: dict[str, int] = {v.id: 1 for v in versions}  # @versions/ID
    if newest_of(versions):
        names[newest_of(versions).id] += 1  # SOURCE/newest
    if latest and not (refresh == "on-open" and not pinned_option):
        names[latest.id] += 1  # SOURCE/latest
    for tag in {t for v in versions for t in v.tags}:
        tagged = [v for v in versions if tag in v.tags]
        for v in tagged:
            names[v.id] += 1  # @TAG/ID
        newest = next((v for v in tagged if not v.damaged), None)
        if newest:
            names[newest.id] += 1  # @TAG/latest
    assert links.link_counts(source, versions) == names
    pin_present = any(v.id == pin for v in versions)
    for i, v in enumerate(versions):
        newer = versions[:i][::-1]  # oldest first
        assert links.link_count(source, v, pin_present, iter(newer)) == names[v.id]
