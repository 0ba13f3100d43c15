"""The systemd units in contrib/systemd: ``systemd-analyze verify`` accepts them, and they
keep to what a FUSE daemon needs (readiness, unmount on stop, no setting that would hide
the mount from the host).

``systemd-analyze`` comes with Debian's ``systemd`` package; the test fails, not skips,
without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
SYSTEM_UNIT = UNITS / "buffyfs.service"
USER_UNIT = UNITS / "buffyfs-user.service"
BINARY = "/usr/local/bin/buffyfs"

# Settings that put the service in its own mount namespace, whose mounts do not
# propagate to the host (systemd.exec(5)): the FUSE mount would be invisible outside.
NAMESPACING = {
    "PrivateMounts", "PrivateTmp", "PrivateDevices", "PrivateIPC", "ProtectSystem",
    "ProtectHome", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths",
    "NoExecPaths", "BindPaths", "BindReadOnlyPaths", "TemporaryFileSystem",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "RootDirectory", "RootImage",
    "MountAPIVFS", "DynamicUser", "PrivateUsers", "LogNamespace", "MountImages",
    "ExtensionImages", "ExtensionDirectories",
}
# Settings that imply NoNewPrivileges=yes for a process without CAP_SYS_ADMIN (every user
# service): they would stop the setuid fusermount3 from mounting.
IMPLY_NO_NEW_PRIVILEGES = {
    "NoNewPrivileges", "LockPersonality", "MemoryDenyWriteExecute", "ProtectClock",
    "ProtectHostname", "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime",
    "RestrictSUIDSGID", "SystemCallArchitectures", "SystemCallFilter", "SystemCallLog",
}


def parse_unit(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; continuation lines joined."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(path: Path, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in parse_unit(path) if s == section and k == key]


@pytest.fixture(scope="module")
def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if not found:
        pytest.fail("systemd-analyze is missing: install the Debian package 'systemd' "
                    "(apt-get install -y systemd)")
    return found


def stage(tmp_path: Path, unit: Path) -> Path:
    """A copy of ``unit`` whose buffyfs binary is a stub in ``tmp_path`` (verify needs the
    ExecStart binaries to exist)."""
    stub = tmp_path / "bin" / "buffyfs"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = unit.read_text()
    assert BINARY in text
    copy = tmp_path / unit.name
    copy.write_text(text.replace(BINARY, str(stub)))
    return copy


def verify(analyze: str, unit: Path, tmp_path: Path, user: bool) -> list[str]:
    """Run ``systemd-analyze verify``; return its complaints about ``unit``.

    verify exits 0 on mere warnings (unknown keys, unparsable values), so every line that
    names the unit counts as a complaint too.
    """
    env = dict(os.environ)
    args = [analyze]
    if user:
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)  # the user manager's lookup paths need it
        env["HOME"] = str(tmp_path / "home")
        args.append("--user")
    args += ["verify", str(unit)]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60,
                          cwd=tmp_path)
    output = (done.stdout + done.stderr).splitlines()
    complaints = [line for line in output if unit.name in line or str(tmp_path) in line]
    if done.returncode != 0:
        complaints.append(f"exit status {done.returncode}: " + " | ".join(output))
    return complaints


# --- systemd-analyze verify ---------------------------------------------------------------


def test_system_unit_verifies(analyze: str, tmp_path: Path) -> None:
    assert verify(analyze, stage(tmp_path, SYSTEM_UNIT), tmp_path, user=False) == []


def test_user_unit_verifies(analyze: str, tmp_path: Path) -> None:
    assert verify(analyze, stage(tmp_path, USER_UNIT), tmp_path, user=True) == []


@pytest.mark.parametrize("mistake", ["FooBar=1", "ProtectSystem=sometimes",
                                     "ExecStartPost=/nonexistent/buffyfs"])
def test_verify_catches_mistakes(analyze: str, tmp_path: Path, mistake: str) -> None:
    # The check above is not vacuous: a unit with a typo fails it.
    copy = stage(tmp_path, SYSTEM_UNIT)
    copy.write_text(copy.read_text().replace("[Service]\n", f"[Service]\n{mistake}\n"))
    assert verify(analyze, copy, tmp_path, user=False) != []


# --- what the units say -------------------------------------------------------------------


def test_system_unit_commands() -> None:
    assert values(SYSTEM_UNIT, "Type") == ["notify"]
    assert values(SYSTEM_UNIT, "ExecStart") == [
        "/usr/local/bin/buffyfs mount /mnt/buffy --config /etc/buffyfs/config.toml "
        "--foreground --allow-other"
    ]
    assert values(SYSTEM_UNIT, "ExecStop") == ["/usr/local/bin/buffyfs umount /mnt/buffy"]
    assert values(SYSTEM_UNIT, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert "multi-user.target" in values(SYSTEM_UNIT, "WantedBy", "Install")
    assert "network-online.target" in values(SYSTEM_UNIT, "After", "Unit")


def test_user_unit_commands() -> None:
    assert values(USER_UNIT, "Type") == ["notify"]
    assert values(USER_UNIT, "ExecStart") == [
        "/usr/local/bin/buffyfs mount %h/buffy --config %h/.config/buffyfs/config.toml "
        "--foreground"
    ]
    assert values(USER_UNIT, "ExecStop") == ["/usr/local/bin/buffyfs umount %h/buffy"]
    assert values(USER_UNIT, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert "default.target" in values(USER_UNIT, "WantedBy", "Install")


@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_mount_stays_visible_to_the_host(unit: Path) -> None:
    keys = {k for s, k, _ in parse_unit(unit) if s == "Service"}
    assert not keys & NAMESPACING, f"{unit.name}: would hide the mount: {keys & NAMESPACING}"
    assert values(unit, "MountFlags") in ([], ["shared"])
    # a dead mount left by a crash is cleared before the next start, errors ignored
    pre = values(unit, "ExecStartPre")
    assert pre and pre[0].startswith("-") and "fusermount3 -u -z" in pre[0]


def test_system_unit_hardening_keeps_fuse_working() -> None:
    assert values(SYSTEM_UNIT, "User") == []  # root: mount(2) directly, no setuid helper
    assert values(SYSTEM_UNIT, "NoNewPrivileges") == ["yes"]
    caps = " ".join(values(SYSTEM_UNIT, "CapabilityBoundingSet")).split()
    assert caps == ["CAP_SYS_ADMIN"]  # mount(2) and umount2(2)
    assert values(SYSTEM_UNIT, "DevicePolicy") == ["closed"]
    assert "/dev/fuse rw" in values(SYSTEM_UNIT, "DeviceAllow")
    filters = " ".join(values(SYSTEM_UNIT, "SystemCallFilter")).split()
    assert "@mount" in filters and "@system-service" in filters
    families = " ".join(values(SYSTEM_UNIT, "RestrictAddressFamilies")).split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)  # sd_notify, HTTP


def test_user_unit_lets_fusermount3_gain_privileges() -> None:
    keys = {k for s, k, _ in parse_unit(USER_UNIT) if s == "Service"}
    assert not keys & IMPLY_NO_NEW_PRIVILEGES, keys & IMPLY_NO_NEW_PRIVILEGES
    assert "--allow-other" not in " ".join(values(USER_UNIT, "ExecStart"))


@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_units_run_the_installed_script(unit: Path) -> None:
    # `python -m buffyfs` would import a buffyfs/ from the working directory first
    for key in ("ExecStart", "ExecStop"):
        for command in values(unit, key):
            assert command.split()[0] == BINARY, command
            assert " -m " not in command and "python" not in command, command


@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_units_restart_a_wedged_daemon(unit: Path) -> None:
    # The daemon sends WATCHDOG=1 from its event loop every WatchdogSec/2 (watchdog.py,
    # tests/test_liveness.py): a loop blocked for WatchdogSec gets it killed, and
    # restarted. The heartbeats come from the main process only.
    (watchdog,) = values(unit, "WatchdogSec")
    assert watchdog.endswith("s") and 10 <= int(watchdog[:-1]) <= 120, watchdog
    assert values(unit, "NotifyAccess") == ["main"]
    assert values(unit, "Restart") == ["on-failure"]  # a watchdog kill counts as a failure
