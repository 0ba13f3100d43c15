"""Who holds a mount point busy: what ``buffyfs umount`` names when ``fusermount3 -u``
answers "Device or resource busy"."""

from __future__ import annotations

import os


def holders(mountpoint: str) -> list[tuple[int, str]]:
    """(pid, command name) of the processes with a file, directory or mapping open
    under ``mountpoint`` (as ``fuser -m`` finds them; only those we may look at)."""
    inside = mountpoint.rstrip("/") + "/"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        base = f"/proc/{pid}"
        try:
            links = [os.path.join(base, n) for n in ("cwd", "root", "exe")]
            links += [os.path.join(base, "fd", fd) for fd in os.listdir(base + "/fd")]
            targets = []
            for link in links:
                try:
                    targets.append(os.readlink(link))
                except OSError:
                    continue
            with open(base + "/maps") as maps:  # mapped files: address ... inode path
                targets += [parts[5].strip() for line in maps
                            if len(parts := line.split(None, 5)) == 6]
            if any(t == mountpoint or t.startswith(inside) for t in targets):
                with open(base + "/comm") as comm:
                    found.append((int(pid), comm.read().strip()))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return found


def busy_note(mountpoint: str) -> str:
    """Which processes hold the mount, for the error line (or how to find them)."""
    held = holders(mountpoint)
    if not held:
        return f"held by processes this user cannot see (find them with: fuser -vm {mountpoint})"
    shown = ", ".join(f"pid {pid} ({name})" for pid, name in held[:8])
    more = f" and {len(held) - 8} more" if len(held) > 8 else ""
    return f"held by {shown}{more}"
