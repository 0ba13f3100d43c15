"""Issue 12, review leftovers: a SIGHUP reload writes the index off the event loop, so
that another process holding LMDB's writer lock (a long `buffyfs` command) does not stop
every file request of the mount until it lets go."""

from __future__ import annotations

import os
import signal
import threading

from buffyfs.store.index import Index
from tests.conftest import wait_for, writer_held
from tests.test_mount import read, status
from tests.test_ops import write_config

READS = 20
SIGNALS = 20


def test_a_reload_waiting_for_the_writer_lock_leaves_the_mount_answering(
        origin, tmp_path, mount_factory) -> None:
    origin.set("/a", b"a")
    config = write_config(tmp_path / "c.toml", origin, {"a": "/a"})
    mnt = mount_factory("--config", str(config))
    origin.set("/n", b"new one")  # the reload will add n
    write_config(config, origin, {"a": "/a", "n": "/n"})
    index = Index(mnt.cache / "index")  # as another process: the writer lock is the file's
    answered: list[str] = []
    pause = threading.Event()  # never set: the reader's pause between reads

    def reader() -> None:  # each read opens the file: the daemon's loop answers it
        for _ in range(READS):
            answered.append(status(mnt / "a/@status")["name"])
            pause.wait(0.1)

    reading = threading.Thread(target=reader, daemon=True)
    try:
        with writer_held(index):
            mnt.proc.send_signal(signal.SIGHUP)  # its write waits for the lock
            reading.start()
            reading.join(30)
            done_while_held = len(answered)
    finally:
        reading.join(30)
        index.close()
    assert done_while_held == READS, f"{done_while_held} of {READS} reads answered"
    wait_for(lambda: "n" in os.listdir(mnt.path), 10, what="the reloaded source")
    assert read(mnt / "n/latest") == b"new one"


def test_signals_while_a_reload_waits_make_one_more_reload(
        origin, tmp_path, mount_factory) -> None:
    """SIGHUPs that arrive while a reload waits for the writer lock are answered by one
    reload that starts after all of them (not one full reload each), and that reload
    reads the file as it is after the last signal."""
    origin.set("/a", b"a")
    config = write_config(tmp_path / "c.toml", origin, {"a": "/a"})
    mnt = mount_factory("--config", str(config))
    index = Index(mnt.cache / "index")
    try:
        with writer_held(index):
            mnt.proc.send_signal(signal.SIGHUP)  # the first reload: waits for the lock
            for i in range(SIGNALS):
                names = {"a": "/a", f"s{i}": "/a"}
                write_config(config, origin, names)  # a later signal, a later file
                mnt.proc.send_signal(signal.SIGHUP)
    finally:
        index.close()
    last = f"s{SIGNALS - 1}"
    wait_for(lambda: last in os.listdir(mnt.path), 15, what="the last file's source")

    def reloads() -> int:
        return mnt.log_text().count("SIGHUP: config ")

    # the first, then one for the rest (a signal may come late: one more); the kernel
    # and trio may also merge signals that come before the first reload: one in all
    wait_for(lambda: reloads() >= 1, 10, what="the reloads")
    assert 1 <= reloads() <= 3, mnt.log_text()
