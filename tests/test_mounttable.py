"""The mount table read in one place (mounttable.py), on a table written here."""

from __future__ import annotations

from pathlib import Path

import pytest

from buffyfs import mounttable

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
