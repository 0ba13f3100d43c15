"""Daemon lifecycle seen from outside: start a detached mount daemon and wait until it
is live, check a mount point (clearing a dead mount a crashed daemon left), unmount, and
turn a mount(8)/fstab line into ``buffyfs mount``. The daemon itself is built in
mount.py; the command line (cli.py) calls these."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

from buffyfs.errors import BadInput, CacheError
from buffyfs.mounttable import is_mounted, topmost

__all__ = ["is_mounted"]  # re-exported: the CLI and the tests ask it here

MOUNT_READY_TIMEOUT = 30.0
UMOUNT_TIMEOUT = 10.0


# mount -o options that map to ours; the generic ones (rw, dev, suid, _netdev, ...) are
# for mount(8) and fusermount3, not for us.
FSTAB_FLAGS = {"allow_other": "--allow-other", "prune": "--prune", "foreground": "--foreground",
               "nonempty": "--allow-non-empty"}
FSTAB_VALUES = {"cache": "--cache", "max_cache_size": "--max-cache-size",
                "log_level": "--log-level", "scrub_interval": "--scrub-interval",
                "scrub_rate": "--scrub-rate"}
MOUNT_GENERIC = {"rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto",
                 "user", "users", "nouser", "_netdev", "nofail", "defaults", "async",
                 "atime", "noatime", "relatime", "comment"}


def fstab_args(argv: list[str]) -> list[str]:
    """``buffyfs SOURCE MOUNTPOINT -o OPTS``, as mount.fuse3 runs it for an fstab line
    (``/etc/buffyfs/config.toml /mnt/buffy fuse.buffyfs allow_other,_netdev 0 0``),
    turned into ``buffyfs mount``. SOURCE is a config file, or ``none``."""
    source, mountpoint, rest = argv[0], argv[1], argv[2:]
    out = ["mount", mountpoint]
    if source not in ("none", "buffyfs"):
        out += ["--config", source]
    opts: list[str] = []
    while rest:
        word = rest.pop(0)
        if word == "-o" and rest:
            opts += rest.pop(0).split(",")
        elif word.startswith("-o"):
            opts += word[2:].split(",")
    for opt in opts:
        key, sep, value = opt.partition("=")
        if key in FSTAB_FLAGS and not sep:
            out.append(FSTAB_FLAGS[key])
        elif key in FSTAB_VALUES and sep:
            out += [FSTAB_VALUES[key], value]
        elif key not in MOUNT_GENERIC and not key.startswith("x-"):
            raise BadInput(f"unknown mount option {opt!r}: buffyfs takes "
                           + ", ".join([*FSTAB_FLAGS, *(k + "=" for k in FSTAB_VALUES)]))
    return out


def start_detached(mountpoint: str, cache_dir: Path, flags: list[str]) -> int:
    """Start ``buffyfs mount MOUNTPOINT --foreground FLAGS`` in its own session and
    return its pid once the mount is live (it writes ``ready`` on a pipe); CacheError
    with the daemon's own last words when it does not get there."""
    from buffyfs import safeio
    from buffyfs.store.cache import Cache

    Cache(cache_dir).close()  # a cache directory we cannot use is one clear error, here
    read_end, write_end = os.pipe()
    cmd = [*daemon_command(), "mount", os.path.abspath(mountpoint), "--foreground",
           "--cache", str(cache_dir), *flags, "--ready-fd", str(write_end)]
    errors = cache_dir / "buffyfs.start-error"
    with open(errors, "w", opener=safeio.opener) as err:  # never through a planted link
        proc = subprocess.Popen(cmd, pass_fds=(write_end,), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                cwd="/")
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        import select

        r, _, _ = select.select([ready], [], [], MOUNT_READY_TIMEOUT)
        line = ready.readline() if r else b""
    if line.startswith(b"ready"):
        return proc.pid
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    message = safeio.read_text(errors).strip().splitlines()
    raise CacheError(message[-1].removeprefix("buffyfs: error: ") if message
                     else f"the mount daemon exited with status {code}")


def daemon_command() -> list[str]:
    """How the detached daemon is started: this interpreter, on the installed package.

    ``-P`` (Python 3.11+) keeps the working directory off ``sys.path``: with a plain
    ``python -m buffyfs``, a ``buffyfs/`` in the directory the user ran ``buffyfs mount``
    from would be imported instead, and run with the user's rights (root, for a system
    mount). ``-I`` would do that too but also drop ``PYTHONPATH`` and the user's
    site-packages, where ``pip install --user`` puts buffyfs and its dependencies. The
    daemon also runs in ``/``, so it keeps no directory busy and finds nothing relative.
    The flags this command runs with (a script's ``#!python3 -s``) are passed on.
    """
    inherited = [flag for flag, on in (("-I", sys.flags.isolated),
                                       ("-E", sys.flags.ignore_environment),
                                       ("-s", sys.flags.no_user_site)) if on]
    return [sys.executable, "-P", *inherited, "-m", "buffyfs"]


# How long a mount point may take to answer the probe below. A live buffyfs answers in
# milliseconds; a daemon that is being killed answers ECONNABORTED as soon as the kernel
# has closed its /dev/fuse (milliseconds too); one that is stopped or stuck never does.
PROBE_TIMEOUT = 5.0
DEAD_CONNECTION = (errno.ENOTCONN, errno.ECONNABORTED)


def probe_mount(path: str, timeout: float = PROBE_TIMEOUT) -> int | None:
    """statfs() the mount on ``path``: 0 when it answered, the errno when it failed, None
    when it did not answer within ``timeout``.

    statfs, not stat: the kernel answers stat of a FUSE root from its attribute cache
    (attr_timeout, 1 s for buffyfs) even after the daemon died, but always sends statfs
    to the daemon, so a dead connection shows at once: ENOTCONN, or ECONNABORTED for a
    request made while the daemon was being killed. The call runs in a daemon thread: a
    FUSE request nobody answers waits, killably, until the process exits.
    """
    import threading

    outcome: list[int] = []

    def statfs() -> None:
        try:
            os.statvfs(path)
            outcome.append(0)
        except OSError as e:
            outcome.append(e.errno or errno.EIO)

    probe = threading.Thread(target=statfs, name="probe-mount", daemon=True)
    probe.start()
    probe.join(timeout)
    return outcome[0] if outcome else None


def _fusermount(mountpoint: str, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    flags = "-uz" if lazy else "-u"
    return subprocess.run(["fusermount3", flags, mountpoint], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)


def clear_dead_mount(path: str) -> None:
    """Detach the mount a dead daemon left on ``path`` (lazily: a process may still have
    a file open there), and say so."""
    done = _fusermount(os.path.abspath(path), lazy=True)
    if done.returncode != 0:
        raise CacheError(f"cannot clear the dead mount on {path}: "
                         + (done.stderr.strip().splitlines() or ["fusermount3 failed"])[-1])
    print(f"buffyfs: cleared the dead mount on {path} (its daemon is gone)", file=sys.stderr)


def check_mountpoint(path: str, allow_non_empty: bool = False) -> None:
    """A directory to mount on; a dead mount left by a crashed daemon is cleared. A
    directory that holds something is refused unless ``allow_non_empty``: the mount
    would hide it (a mistyped mount point, as rclone and fuse2 refuse too)."""
    for _ in range(8):  # one dead mount per round: they may be stacked
        mounted = topmost(path)
        if mounted is None:
            break
        answer = probe_mount(path)
        if answer in DEAD_CONNECTION and mounted.fstype.startswith("fuse"):
            clear_dead_mount(path)
        elif answer is None:
            raise BadInput(f"{path} is a mount point that does not answer (a stopped or stuck "
                           f"daemon?): unmount it first, e.g. fusermount3 -uz {path}")
        else:
            raise BadInput(f"{path} is already a mount point; unmount it first")
    if not os.path.exists(path):
        raise BadInput(f"mount point {path} does not exist")
    if not os.path.isdir(path):
        raise BadInput(f"mount point {path} is not a directory")
    if not allow_non_empty:
        try:
            entries = os.listdir(path)
        except OSError as e:
            raise BadInput(f"cannot list mount point {path}: {e.strerror}") from None
        if entries:
            raise BadInput(f"mount point {path} is not empty ({len(entries)} entries, e.g. "
                           f"{sorted(entries)[0]!r}): the mount would hide them; pass "
                           "--allow-non-empty to mount there anyway")


def unmount(path: str, lazy: bool = False) -> None:
    """Unmount ``path`` and wait (a while) until the table says it is gone; a mount whose
    daemon died is cleared. CacheError when it is not mounted or cannot be unmounted."""
    mountpoint = os.path.abspath(path)
    if not is_mounted(mountpoint):
        raise CacheError(f"{path} is not mounted")
    done = _fusermount(mountpoint, lazy=lazy)
    if done.returncode != 0:
        if probe_mount(mountpoint) not in DEAD_CONNECTION:
            reason = (done.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
            if "busy" in reason:
                from buffyfs.busy import busy_note

                raise CacheError(f"cannot unmount {path}: it is busy, "
                                 f"{busy_note(mountpoint)}; close them, or detach it now "
                                 f"with: buffyfs umount --lazy {path}")
            raise CacheError(f"cannot unmount {path}: {reason}")
        clear_dead_mount(path)  # its daemon is gone, a file is still open there
    deadline = time.monotonic() + UMOUNT_TIMEOUT
    while is_mounted(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
