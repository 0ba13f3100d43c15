"""The mount table read in one place (mounttable.py), on a table written here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from buffyfs import mounttable
from buffyfs.mount import READAHEAD_KB
from tests.conftest import Mount, run_cli, wait_for

TABLE = """\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
98 22 0:51 / /mnt/with\\040space rw,nosuid,nodev shared:50 - fuse.buffyfs buffyfs:/c\\040d rw
99 98 0:52 / /mnt/with\\040space rw shared:51 - tmpfs none rw
100 22 0:53 / /mnt/opt rw master:3 shared:9 - fuse.buffyfs buffyfs:/cache rw,user_id=0
not a line of the table
"""


@pytest.fixture
def table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text(TABLE)
    monkeypatch.setattr(mounttable, "MOUNTINFO", path)
    return path


def test_stacked_mounts_unescaped_topmost_last(table: Path) -> None:
    stacked = mounttable.mounts_on("/mnt/with space")
    assert [m.fstype for m in stacked] == ["fuse.buffyfs", "tmpfs"]
    assert stacked[0] == mounttable.MountEntry("0:51", "/mnt/with space", "fuse.buffyfs",
                                               "buffyfs:/c d")
    assert mounttable.topmost("/mnt/with space").fstype == "tmpfs"


def test_optional_fields_and_unnormalized_paths(table: Path) -> None:
    assert mounttable.topmost("/mnt/opt").source == "buffyfs:/cache"  # two optional fields
    assert mounttable.is_mounted("/mnt/./opt")
    assert not mounttable.is_mounted("/mnt/none")
    assert mounttable.topmost("/mnt/none") is None


def test_the_real_table_has_the_root() -> None:
    assert mounttable.is_mounted("/")


def test_a_mount_point_with_a_space_is_found_in_the_table(tmp_path: Path, cache_dir: Path
                                                          ) -> None:
    # the table writes the space as \040: the daemon's read-ahead (it finds its device
    # there) and the CLI's umount both read it through mounttable
    mountpoint = tmp_path / "mnt with space"
    m = Mount(mountpoint, cache_dir, tmp_path / "mount.log", [])
    try:
        dev = os.stat(mountpoint).st_dev
        setting = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        if os.geteuid() != 0 or not os.access(setting, os.W_OK):
            pytest.skip("read-ahead is raised only by root, on a writable /sys")
        wait_for(lambda: setting.read_text().strip() == str(READAHEAD_KB), 10,
                 what="the daemon to raise the read-ahead of its mount")
        run_cli("umount", str(mountpoint), check=True)
        assert not mounttable.is_mounted(str(mountpoint))
    finally:
        m.close()
