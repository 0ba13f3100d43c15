"""Operations: the config file (sync, errors, --prune, SIGHUP), fstab mounts, other
users' permissions, @metrics, completion."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import is_mounted, run_cli, stop_process, unmount, wait_for
from tests.test_mount import read, status, write_control


def write_config(path: Path, origin, sources: dict[str, str], extra: str = "") -> Path:
    text = f'[daemon]\nlog_level = "debug"\n{extra}\n[defaults]\nrefresh = "6h"\n'
    for name, route in sources.items():
        text += f'\n[sources.{name}]\nurl = "{origin.url(route)}"\n'
    path.write_text(text)
    return path


def test_config_sources_are_synced_at_start(origin, tmp_path, cli, mount_factory):
    origin.set("/a", b"from config a")
    origin.set("/b", b"from config b")
    config = write_config(tmp_path / "c.toml", origin, {"a": "/a", "b": "/b"})
    cli("add", "manual", origin.url("/a"), check=True)
    mnt = mount_factory("--config", str(config))
    assert read(mnt / "a/latest") == b"from config a"
    assert status(mnt / "b/@status")["refresh"] == "6h"  # [defaults] applied
    assert "manual" in os.listdir(mnt.path)  # sources only in the index stay
    listed = cli("list", check=True).stdout  # the command line sees them too
    assert "a\t" in listed and "b\t" in listed


def test_config_prune_and_comeback(origin, tmp_path, cli, mount_factory):
    origin.set("/a", b"a")
    config = write_config(tmp_path / "c.toml", origin, {"a": "/a"})
    cli("add", "manual", origin.url("/a"), check=True)
    mnt = mount_factory("--config", str(config), "--prune")
    assert sorted(os.listdir(mnt.path)) == ["@control", "@metrics", "@status", "a"]
    write_control(mnt / "@control", "remove a")  # removed in the mount only...
    mnt.close()
    mnt = mount_factory("--config", str(config))
    assert "a" in os.listdir(mnt.path)  # ...comes back while the file declares it


@pytest.mark.parametrize("text,needle", [
    ("[daemon]\nmax_download = 3\n", "[daemon] unknown key 'max_download'"),
    ("[sources.x]\nurl = \"ftp://h/x\"\n", "[sources.x] url"),
    ("[sources.x]\nurl = \"http://h/\"\nrefresh = \"often\"\n", "[sources.x] refresh"),
    ("[sources.x\n", "not valid TOML"),
    ("[deamon]\n", "unknown table [deamon]"),
])
def test_bad_config_stops_the_mount_with_one_line(tmp_path, cache_dir, text, needle):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    mnt = tmp_path / "m"
    mnt.mkdir()
    done = run_cli("mount", str(mnt), "--foreground", "--config", str(config),
                   cache=cache_dir, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0] and needle in lines[0], done.stderr
    assert not is_mounted(mnt)


def test_sighup_reloads_and_a_bad_reload_keeps_running(origin, tmp_path, mount_factory):
    origin.set("/a", b"a")
    origin.set("/n", b"new one")
    config = write_config(tmp_path / "c.toml", origin, {"a": "/a"})
    mnt = mount_factory("--config", str(config))
    assert read(mnt / "a/latest") == b"a"
    write_config(config, origin, {"a": "/a", "n": "/n"})
    mnt.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "n" in os.listdir(mnt.path), 5, what="the reloaded source")
    assert read(mnt / "n/latest") == b"new one"
    config.write_text("[sources.broken\n")
    mnt.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config not reloaded" in mnt.log_text(), 5, what="the refusal")
    assert sorted(os.listdir(mnt.path)) == ["@control", "@metrics", "@status", "a", "n"]
    assert read(mnt / "a/latest") == b"a" and mnt.proc.poll() is None


def test_fstab_line_mounts_with_mount(origin, tmp_path, cache_dir):
    origin.set("/f", b"via fstab")
    config = write_config(tmp_path / "c.toml", origin, {"f": "/f"},
                          extra=f'cache = "{cache_dir}"')
    mnt = tmp_path / "fstab-mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    # PROGRAM#SOURCE: mount.fuse3 runs PROGRAM SOURCE MOUNTPOINT -o OPTIONS. (mount(8)
    # resets PATH, so the test names the program by path; installed in /usr/local/bin,
    # `buffyfs#...` or the type fuse.buffyfs work as well.)
    program = Path(sys.executable).parent / "buffyfs"
    fstab.write_text(f"{program}#{config} {mnt} fuse allow_other,_netdev,noauto 0 0\n")
    try:
        done = subprocess.run(["mount", "-T", str(fstab), str(mnt)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert is_mounted(mnt)
        assert read(mnt / "f/latest") == b"via fstab"
        assert "allow_other" in Path("/proc/self/mountinfo").read_text()
    finally:
        unmount(mnt)
        pid = _mount_pid(cache_dir)
        if pid:
            wait_for(lambda: not _alive(pid), 10, what="the daemon to exit")


def test_other_users(origin, cli, cache_dir):
    """A second, unprivileged user (nobody): reads only with --allow-other, never writes."""
    origin.set("/p", b"for everyone")
    cli("add", "p", origin.url("/p"), check=True)
    base = Path(tempfile.mkdtemp(prefix="buffyfs-perm-"))
    os.chmod(base, 0o755)
    procs = []

    def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534",
                               "--clear-groups", *cmd], capture_output=True, text=True,
                              timeout=30)
    try:
        for name, extra in (("private", []), ("shared", ["--allow-other"])):
            mnt = base / name
            mnt.mkdir()
            proc = subprocess.Popen(
                [sys.executable, "-m", "buffyfs", "mount", str(mnt), "--foreground",
                 "--cache", str(cache_dir if name == "shared" else cache_dir / "p2"), *extra],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append((mnt, proc))
            wait_for(lambda m=mnt: is_mounted(m), 15, what="the mount")
            if name == "private":
                assert as_nobody("ls", str(mnt)).returncode != 0  # not even a listing
                unmount(mnt)
                stop_process(proc)
        shared = base / "shared"
        assert read(shared / "p/latest") == b"for everyone"  # root fetched it
        assert as_nobody("cat", str(shared / "p/latest")).stdout == "for everyone"
        assert '"name": "p"' in as_nobody("cat", str(shared / "p/@status")).stdout
        for target in ("@control", "p/@control"):
            done = as_nobody("sh", "-c", f"echo refresh > {shared / target}")
            assert done.returncode != 0 and "Permission denied" in done.stderr
        done = as_nobody("sh", "-c", f"echo x > {shared / 'p/latest'}")
        assert done.returncode != 0
        st = os.stat(shared / "p/latest")
        assert st.st_mode & 0o777 == 0o444
        assert os.stat(shared / "@control").st_mode & 0o777 == 0o644  # reads: a help text
        write_control(shared / "p/@control", "refresh")  # the mounting user may
    finally:
        for mnt, proc in procs:
            unmount(mnt)
            stop_process(proc)
        shutil.rmtree(base, ignore_errors=True)


def test_metrics(origin, mnt):
    origin.set("/m", b"metric bytes")
    origin.fail("/m", 500)
    write_control(mnt / "@control", f"add m {origin.url('/m')}")
    assert read(mnt / "m/latest") == b"metric bytes"
    with open(mnt / "m/latest", "rb") as f:
        f.read()
    text = (mnt / "@metrics").read_text()
    samples = {s.name + str(sorted(s.labels.items())): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples["buffyfs_downloads_total[('result', 'new_version')]"] == 1
    assert samples["buffyfs_retries_total[]"] == 1
    assert samples["buffyfs_bytes_downloaded_total[]"] == len(b"metric bytes")
    assert samples["buffyfs_opens_total[]"] >= 1
    assert samples["buffyfs_sources[]"] == 1 and samples["buffyfs_versions[]"] == 1
    assert samples["buffyfs_cache_size_bytes[]"] == len(b"metric bytes")
    assert samples["buffyfs_stale_sources[]"] == 0
    with pytest.raises(OSError) as e:
        open(mnt / "@metrics", "w")
    assert e.value.errno in (errno.EROFS, errno.EACCES)


def test_completion_and_version():
    done = run_cli("completion", "bash")
    assert done.returncode == 0 and "buffyfs" in done.stdout and "umount" in done.stdout
    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("buffyfs ")


def _mount_pid(cache: Path) -> int | None:
    import json

    try:
        return json.loads((cache / "mount.json").read_text())["pid"]
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
