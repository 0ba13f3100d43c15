"""The ``buffyfs`` command line, with and without a running mount."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import is_mounted, run_cli, stop_process, unmount, wait_for


def one_error_line(done) -> str:
    """The error output: exactly one line (after an optional usage line), no traceback."""
    lines = [line for line in done.stderr.splitlines() if not line.startswith("usage:")
             and not line.startswith("  ")]
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("name", ["../x", "a/b", "@x", ".x", "n" * 200, "", "a b"])
def test_bad_names_exit_2(cli, name):
    done = cli("add", name, "http://127.0.0.1/")
    assert done.returncode == 2
    assert "invalid source name" in one_error_line(done)


# URLs no request can be made to: each is bad input wherever a URL is given.
IMPOSSIBLE_URLS = {
    "http://127.0.0.1:99999/x": "port 99999 is outside 1-65535",
    "http://127.0.0.1:0/x": "port 0 is outside 1-65535",
    "http://[::1]:65536/x": "outside 1-65535",
    "http://127.0.0.1:8o/x": "invalid port '8o'",
    "http://127.0.0.1:+80/x": "invalid port '+80'",
    "http://127.0.0.1:-1/x": "invalid port '-1'",
    "http://:8080/x": "no host",
    "http://user:pw@/x": "no host",
    "http://exa<mple.org/": "invalid host name",
    "http://a..b/": "invalid host name",
    "http://exa%20mple.org/": "invalid host name",
    "http://[::1/": "unclosed '['",
    "http://exa mple.org/": "space or a control character",
}


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/x", "http://",
                                 "not a url", "127.0.0.1/x", *IMPOSSIBLE_URLS])
def test_bad_urls_exit_2(cli, url):
    done = cli("add", "ok", url)
    assert done.returncode == 2
    line = one_error_line(done)
    assert "URL" in line and IMPOSSIBLE_URLS.get(url, "") in line
    assert "pw" not in line  # credentials stay hidden in the error too
    assert cli("list", check=True).stdout == ""  # nothing was registered


@pytest.mark.parametrize("url", ["http://127.0.0.1:65535/x", "http://127.0.0.1:1/x",
                                 "http://[::1]:8080/x", "http://127.0.0.1:/x",
                                 "https://u:p@example.org:443/x?a=b", "http://xn--bcher-kva.example/",
                                 "http://b\u00fccher.example/", "http://my_host.local./x"])
def test_unusual_but_possible_urls_are_accepted(cli, url):
    assert cli("add", "ok", url).returncode == 0, url


def test_impossible_urls_refused_by_the_control_file_and_the_config(cli, mnt, tmp_path):
    import errno

    for url, reason in IMPOSSIBLE_URLS.items():
        with pytest.raises(OSError) as e:
            fd = os.open(mnt / "@control", os.O_WRONLY)
            try:
                os.write(fd, f"add bad '{url}'\n".encode())
            finally:
                os.close(fd)
        assert e.value.errno == errno.EINVAL, url
        status = json.loads((mnt / "@status").read_text())
        assert reason in status["last_control_error"], status["last_control_error"]
    assert "bad" not in os.listdir(mnt.path)
    assert cli("list", check=True).stdout == ""
    config = tmp_path / "bad-url.toml"
    config.write_text('[sources.bad]\nurl = "http://127.0.0.1:99999/x"\n')
    done = cli("mount", str(tmp_path), "--config", str(config))
    assert done.returncode == 2
    line = one_error_line(done)
    assert str(config) in line and "port 99999 is outside 1-65535" in line


def test_bad_options_exit_2(cli):
    done = cli("add", "ok", "http://127.0.0.1/", "--refresh", "often")
    assert done.returncode == 2 and "refresh" in one_error_line(done)
    done = cli("add", "ok", "http://127.0.0.1/", "--max-attempts", "0")
    assert done.returncode == 2 and "max_attempts" in one_error_line(done)
    done = cli("add", "ok", "http://127.0.0.1/", "--header", "NoColonHere")
    assert done.returncode == 2
    done = cli("add", "ok", "http://127.0.0.1/", "--no-such-option", "1")
    assert done.returncode == 2
    assert cli("list", check=True).stdout == ""


@pytest.mark.parametrize("args", [("remove", "ghost"), ("versions", "ghost"),
                                  ("status", "ghost"), ("fetch", "ghost"),
                                  ("refresh", "ghost")])
def test_unknown_source_exits_1(cli, args):
    done = cli(*args)
    assert done.returncode == 1
    assert "no source named 'ghost'" in one_error_line(done)


def test_duplicate_add_exits_2(cli):
    cli("add", "dup", "http://127.0.0.1:9/", check=True)
    done = cli("add", "dup", "http://127.0.0.1:9/")
    assert done.returncode == 2 and "exists already" in one_error_line(done)


def test_unusable_cache_dir_exits_1(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = run_cli("list", cache=blocker / "cache")
    assert done.returncode == 1
    assert "cache" in one_error_line(done)


def test_add_list_fetch_status_versions_without_mount(origin, cli):
    origin.set("/d", b"0123456789" * 1000, etag=True)
    cli("add", "d", origin.url("/d"), "--refresh", "6h", "--max-attempts", "2",
        "--header", "Authorization: Bearer topsecret-value", check=True)
    assert cli("list", check=True).stdout.split() == ["d", origin.url("/d")]
    fetched = cli("fetch", "d", check=True)
    assert "new version" in fetched.stdout
    assert origin.seen("/d")[0].headers["Authorization"] == "Bearer topsecret-value"
    st = json.loads(cli("status", "d", "--json", check=True).stdout)
    assert st["refresh"] == "6h" and st["latest"] and st["versions"][0]["size"] == 10000
    root = json.loads(cli("status", "--json", check=True).stdout)
    assert root["sources"][0]["latest"] == st["latest"]
    assert root["cache_size"] == 10000
    table = cli("versions", "d", check=True).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["version", "size", "fetched", "tags", "note"]
    assert row.split()[0] == st["latest"] and row.split()[-1] == "latest"
    human = cli("status", check=True).stdout
    assert "d" in human and "not mounted" in human
    one = cli("status", "d", check=True).stdout
    assert "pinned: -" in one and "stale: no" in one
    cli("pin", "d", check=True)
    assert f"pinned: {st['latest']}" in cli("status", "d", check=True).stdout
    cli("unpin", "d", check=True)
    malformed = cli("pin", "d", "2026")
    assert malformed.returncode == 2 and "invalid version" in one_error_line(malformed)
    unknown = cli("pin", "d", "20260101T000000Z-00000000")
    assert unknown.returncode == 1 and "has no version" in one_error_line(unknown)
    again = cli("fetch", "d", check=True)  # 304 now
    assert "up to date" in again.stdout
    for out in (json.dumps(st), json.dumps(root), table, human, fetched.stdout):
        assert "topsecret" not in out


def test_fetch_failure_exits_1_with_reason(origin, cli):
    origin.set("/e", b"e")
    origin.fail("/e", 503, 503)
    cli("add", "e", origin.url("/e"), "--max-attempts", "2", check=True)
    done = cli("fetch", "e")
    assert done.returncode == 1
    assert "HTTP 503" in one_error_line(done)
    st = json.loads(cli("status", "e", "--json", check=True).stdout)
    assert st["consecutive_failures"] == 1 and "503" in st["last_error"]["message"]


def test_cache_dir_from_environment(origin, tmp_path, monkeypatch):
    env_cache = tmp_path / "envcache"
    monkeypatch.setenv("BUFFYFS_CACHE", str(env_cache))
    assert run_cli("add", "envsrc", "http://127.0.0.1:9/").returncode == 0
    assert (env_cache / "index").is_dir()
    assert "envsrc" in run_cli("list").stdout


def test_detached_mount_and_umount(origin, cli, tmp_path, cache_dir):
    origin.set("/det", b"detached")
    cli("add", "det", origin.url("/det"), check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pid = None
    try:
        done = cli("mount", str(mnt), timeout=60)
        assert done.returncode == 0, done.stderr
        assert os.path.ismount(mnt)  # live when the command returns
        pid = json.loads((cache_dir / "mount.json").read_text())["pid"]
        with open(mnt / "det/latest", "rb") as f:
            assert f.read() == b"detached"
        assert "mounted on" in cli("status", check=True).stdout
        assert run_cli("umount", str(mnt)).returncode == 0
        assert not os.path.ismount(mnt)
        wait_for(lambda: not _alive(pid), 10, what="the daemon to exit")
        assert "mounted on" in (cache_dir / "buffyfs.log").read_text()
    finally:
        unmount(mnt)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_mount_errors(cli, tmp_path):
    done = cli("mount", str(tmp_path / "missing"))
    assert done.returncode == 2 and "does not exist" in one_error_line(done)
    done = run_cli("umount", str(tmp_path))
    assert done.returncode == 1 and "not mounted" in one_error_line(done)  # a failed operation


def test_sigterm_unmounts(mount_factory):
    m = mount_factory()
    m.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: m.proc.poll() is not None, 10, what="the daemon to exit")
    assert m.proc.returncode == 0
    assert not os.path.ismount(m.path)
    stop_process(m.proc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# --- a mount point whose daemon died or hangs ---------------------------------------------

# `buffyfs mount` with its modules already imported, started on a line on stdin: the race
# with the kernel's attribute cache (1 s) must not depend on how fast Python starts.
WARM_CLI = """\
import sys
import buffyfs.store.cache, buffyfs.config, buffyfs.log, buffyfs.options
from buffyfs.cli import main
print("ready", flush=True)
sys.stdin.readline()
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("reaped", [True, False], ids=["dead", "dying"])
def test_mount_right_after_kill_9_clears_the_dead_mount(mount_factory, cache_dir, reaped):
    m = mount_factory()
    warm = subprocess.Popen([sys.executable, "-c", WARM_CLI, "mount", str(m.path),
                             "--cache", str(cache_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = None
    try:
        assert warm.stdout.readline() == "ready\n"
        os.stat(m.path)  # the kernel now answers stat of the root from its cache for 1 s
        m.proc.kill()
        if reaped:  # else: the mount is probed while the kernel still tears the daemon down
            m.proc.wait(timeout=10)
        out, err = warm.communicate("go\n", timeout=60)
        assert warm.returncode == 0, err
        assert err.strip() == f"buffyfs: cleared the dead mount on {m.path} (its daemon is gone)"
        assert "mounted on" in out
        pid = json.loads((cache_dir / "mount.json").read_text())["pid"]
        assert json.loads((m.path / "@status").read_text())["sources"] == []
        assert run_cli("umount", str(m.path)).returncode == 0
        assert not is_mounted(m.path)
    finally:
        if warm.poll() is None:
            warm.kill()
            warm.wait()
        unmount(m.path)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_mount_on_a_stopped_daemon_fails_in_bounded_time(mount_factory, cli):
    m = mount_factory()
    m.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.2)  # past the root's attribute cache: a stat would now wait forever
        started = time.monotonic()
        done = cli("mount", str(m.path), timeout=30)  # the probe gives up after 5 s
        assert time.monotonic() - started < 20
        assert done.returncode == 2
        assert "does not answer" in one_error_line(done)
        assert is_mounted(m.path)  # a live daemon's mount is not touched
    finally:
        m.proc.send_signal(signal.SIGCONT)
    assert json.loads((m.path / "@status").read_text())["sources"] == []  # alive again


def test_umount_of_a_dead_mount_in_use(mount_factory, cli):
    m = mount_factory()
    holder = subprocess.Popen(["sleep", "60"], cwd=m.path)  # keeps the mount busy
    try:
        m.proc.kill()
        m.proc.wait(timeout=10)
        done = run_cli("umount", str(m.path))
        assert done.returncode == 0, done.stderr
        assert "cleared the dead mount" in done.stderr
        assert not is_mounted(m.path)
    finally:
        holder.kill()
        holder.wait()
