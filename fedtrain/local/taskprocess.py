"""A task process of the fork server: it runs tasks one at a time, each as a fresh process would.

A task forked fresh from the server pays, besides its work, what a process holding torch pays on
the first use of a model: page faults on a new heap, oneDNN primitives for the model's shapes,
allocator caches. For a small client that was about a quarter of its CPU in a round. A task
process therefore stays alive after a task that cannot have left anything behind, and the server
gives it the next task of the same kind.

What a task sees is what a fresh process forked from the server gives it:

- its own argv, stdout and stderr files (file descriptors 1 and 2 point at them during the task
  only) and exit code;
- the server's environment plus the task's own, set back afterwards (the server reuses a process
  only for a task with the same additions);
- Python's, NumPy's and torch's global random generators in the state the process was forked with;
- torch's thread count as the task asks.

A process is retired (it exits right after reporting) when its task failed, when it ran a command
that is not `REUSABLE` (init and finalize: data generation, MLflow, plots set up global state; a
site's task trains, evaluates or runs a secure stage on data its site made beforehand, so it is
reusable), when a thread it started is still running, when it has run `MAX_TASKS`, or when its
resident memory grew past `MEMORY_GROWTH` times what it held after its first task. The server
forks another in its place.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch

EXIT_INTERNAL = 70  # the worker's code for an internal error (fedtrain.contract.errors)
REUSABLE = ("train", "aggregate", "evaluate", "secure", "site-task")  # commands that leave no global state behind
MAX_TASKS = 200
MEMORY_GROWTH = 1.5


@dataclass
class Pristine:
    """The state a task starts from: the process's own when it was forked."""

    environment: dict[str, str]
    python_random: Any
    numpy_random: Any
    torch_random: torch.Tensor

    @classmethod
    def capture(cls) -> Pristine:
        """Remember the environment and the global random generators as they are now."""
        return cls(dict(os.environ), random.getstate(), np.random.get_state(), torch.get_rng_state())

    def restore(self, environment: dict[str, str]) -> None:
        """Back to the captured state, with ``environment`` added."""
        os.environ.clear()
        os.environ.update(self.environment)
        os.environ.update(environment)
        random.setstate(self.python_random)
        np.random.set_state(self.numpy_random)
        torch.set_rng_state(self.torch_random)


class LineReader:
    """Requests from the server, one per line, on a pipe that stays open between them."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer = fd, b""

    def next(self) -> bytes | None:
        """The next request, or None once the server closed the pipe (it stopped, or retired this process)."""
        while b"\n" not in self.buffer:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line


def cpu_seconds() -> float:
    """User and system seconds of this process (all its threads) and of any process it waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def resident_bytes() -> int:
    """Resident memory of the calling process now (not its peak)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_all(fd: int, data: bytes) -> None:
    """All of ``data``: a write to a pipe may be cut short by a signal once the pipe is full."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _point_output(stdout: str, stderr: str) -> None:
    """File descriptors 1 and 2 (and so ``sys.stdout``, ``sys.stderr``) at these files."""
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)


def _become_task_process(inherited: list[int]) -> None:  # pragma: no cover - runs in a forked child
    """Die with the server, take back the signals, close the server's descriptors, own line-buffered output."""
    import ctypes

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the server
    os.setpgid(0, 0)
    signal.set_wakeup_fd(-1)  # the server's wake-up pipe and SIGCHLD handler are not the task's
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for fd in inherited:
        os.close(fd)
    _point_output(os.devnull, os.devnull)  # fd 1 was the server's protocol pipe: nothing may land there
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def run_task(request: dict[str, Any], pristine: Pristine) -> int:  # pragma: no cover - runs in a task process
    """One task, its output in its files, from the pristine state; its exit code."""
    from fedtrain.worker.cli import main

    _point_output(request["stdout"], request["stderr"])
    try:
        pristine.restore(request.get("env") or {})
        torch.set_num_threads(int(request.get("threads", 1)))
        try:
            return main(request["argv"])
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def prepare(modules: list[str]) -> None:  # pragma: no cover - runs in a task process
    """Import ``modules`` ahead of the task; one that fails is left for the task, which then fails saying why."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:  # the task imports it again and reports the error
            continue


def reusable(request: dict[str, Any], code: int, tasks: int, first_resident: int) -> bool:
    """Whether this process may run another task (see the module's docstring)."""
    command = (request.get("argv") or [""])[0]
    return (code == 0 and command in REUSABLE and threading.active_count() == 1 and tasks < MAX_TASKS
            and resident_bytes() <= MEMORY_GROWTH * first_resident)


def serve_tasks(requests: int, notices: int, inherited: list[int]) -> NoReturn:  # pragma: no cover - a child
    """Run requests until the server closes the pipe or the process retires; report each exit as it happens.

    The report (exit code, CPU seconds, resident bytes, whether the process stays) goes through the
    pipe shared with the server before anything else, so the next task starts while a retiring
    process is still being torn down.
    """
    code = EXIT_INTERNAL
    try:
        _become_task_process(inherited)
        pristine, lines = Pristine.capture(), LineReader(requests)
        tasks, first_resident = 0, 0
        while (line := lines.next()) is not None:
            request = json.loads(line)
            if "prepare" in request:  # imports ahead of a task (the server's --prepare); nothing to report
                prepare(request["prepare"])
                pristine = Pristine.capture()  # what the imports set (MLflow's environment defaults) stays
                continue
            started = cpu_seconds()
            code = run_task(request, pristine)
            tasks += 1
            first_resident = first_resident or resident_bytes()
            stays = reusable(request, code, tasks, first_resident)
            pristine.restore({})
            _point_output(os.devnull, os.devnull)  # whatever a library writes later is no task's
            notice = {"pid": os.getpid(), "exit": code, "cpu": cpu_seconds() - started, "rss": resident_bytes(),
                      "reusable": stays}
            write_all(notices, (json.dumps(notice) + "\n").encode())  # one short line: never interleaved
            if not stays:
                os._exit(code)
        os._exit(0)
    except BaseException:  # outside the worker's own handling: say so where the task's stderr goes
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(code or EXIT_INTERNAL)
