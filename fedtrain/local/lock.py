"""One `fedtrain run` per work directory: an exclusive lock on ``<workdir>/run.lock`` while it runs.

Two runners on one directory would both drive the training: each launches the tasks the engine
asks for, both write ``status.json``, and each takes the other's processes for lost ones. The lock
is an ``flock`` on an open file, so the kernel releases it when the process ends however it ends
(a kill, a crash): a stale lock file never blocks a later run. The holder writes who it is into
the file, so the refusal can name it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "run.lock"


class WorkdirBusy(Exception):
    """Another process runs the training of this work directory."""


@contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold the work directory's lock while the block runs; `WorkdirBusy` at once when another process holds it."""
    path = workdir / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusy(f"{workdir} is in use by another `fedtrain run` ({_holder(path)}); wait for it to "
                              "end or stop it, or give this run another --workdir") from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()} since "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        yield
    finally:
        os.close(descriptor)  # releases the lock; the file stays (deleting it would race a next run's open)


def _holder(path: Path) -> str:
    """Who holds the lock, as it wrote itself into the file."""
    try:
        said = path.read_text(errors="replace").strip()
    except OSError:
        said = ""
    return said[:200] or "a process that has not said who it is yet"
