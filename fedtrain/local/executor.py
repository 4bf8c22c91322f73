"""The local executor: worker commands as subprocesses, at most ``parallelism`` at a time.

What Jobs are to the operator, processes are here: each task runs ``fedtrain.worker.cli.main`` with
the same arguments a Job's container gets, either forked from a fork server that has imported torch
once (the default: see `forkserver`) or as a fresh ``python -m fedtrain.worker.cli`` process.
Finished tasks are recorded in ``tasks.jsonl``, one line appended per task as it ends, so that a
runner started again after a crash knows them; tasks that were running when it died have no record
and the engine starts them again (every worker command is idempotent). Children get SIGTERM when
the runner dies, so no orphan keeps writing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from fedtrain.engine.status import Observation

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Handle(Protocol):
    """A running task, whichever way it was started."""

    def poll(self) -> int | None:
        """The exit code, or None while running."""

    def terminate(self) -> None:
        """Ask the task to stop (SIGTERM)."""

    def wait(self) -> int:
        """Block until the task ends; its exit code."""


class ForkedTask:
    """A task forked by the fork server; its exit code arrives through the server's pipe."""

    def __init__(self, server: ForkServer, task_id: str) -> None:
        self.server, self.task_id = server, task_id

    def poll(self) -> int | None:
        """The exit code reported by the server, or None while running."""
        return self.server.exit_codes.get(self.task_id)

    def terminate(self) -> None:
        """Ask the server to SIGTERM the child."""
        self.server.send({"cancel": self.task_id})

    def wait(self) -> int:
        """Block until the server reports the exit code."""
        while (code := self.poll()) is None:
            time.sleep(0.02)
        return code


class ForkServer:
    """The runner's end of `fedtrain.local.forkserver`: one long-lived process that forks tasks."""

    def __init__(self, preload: Sequence[str], environment: Mapping[str, str] | None = None, spares: int = 1,
                 prepare: Sequence[str] = (), warm: bool = True) -> None:
        """Start the server; ``spares``: how many tasks can start at once without waiting for a fork.

        ``prepare``: commands to keep a process for, its imports done while the training runs
        (`forkserver.PREPARED`). ``warm``: False when none of the tasks trains (no warm-up step).
        """
        options = [f"--prepare={command}" for command in prepare] + ([] if warm else ["--no-warm-up"])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedtrain.local.forkserver", "--spares", str(spares), *options, *preload],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, preexec_fn=_die_with_parent,
            env=environment)
        self.exit_codes: dict[str, int] = {}
        self.cpu_seconds: dict[str, float] = {}  # each finished task's user and system seconds
        self.resident_bytes: dict[str, int] = {}  # its process's resident memory after it (when it reported)
        self.pids: dict[str, int] = {}  # the process each task ran in
        self.prepared: dict[str, int] = {}  # the process kept for each prepared command
        self.exited = threading.Event()  # set by the reader on every exit, so waiting needs no polling
        assert self.process.stdout is not None
        ready = self.process.stdout.readline()
        if not ready:
            raise RuntimeError("the fork server did not start")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            if "prepared" in message:
                self.prepared[message["prepared"]] = int(message["pid"])
                continue
            if "pid" in message:
                self.pids[message["id"]] = int(message["pid"])
            if "exit" in message:
                self.cpu_seconds[message["id"]] = float(message.get("cpu") or 0.0)
                if "rss" in message:
                    self.resident_bytes[message["id"]] = int(message["rss"])
                self.exit_codes[message["id"]] = int(message["exit"])
                self.exited.set()

    def send(self, request: dict[str, Any]) -> None:
        """One request line to the server."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def start(self, task_id: str, arguments: list[str], out: Path, err: Path, threads: int,
              environment: Mapping[str, str] | None = None) -> ForkedTask:
        """Fork a task; its output goes to ``out`` and ``err``; ``environment`` adds to the server's."""
        self.exit_codes.pop(task_id, None)
        self.send({"id": task_id, "argv": arguments, "stdout": str(out), "stderr": str(err), "threads": threads,
                   "env": dict(environment or {})})
        return ForkedTask(self, task_id)

    def close(self) -> None:
        """Close the server's stdin (it then stops) and wait for it."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def last_error_line(path: Path) -> str | None:
    """The worker's own error line (``fedtrain-worker X: error: ...``) or the last line of stderr."""
    if not path.exists():
        return None
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if ": error: " in line:
            return line.split(": error: ", 1)[1][:500]
    return lines[-1][:500] if lines else None


class LocalExecutor:
    """Runs tasks as processes; reports them as engine observations."""

    def __init__(self, workdir: Path, parallelism: int, threads_per_task: int | None = None,
                 fork_server: bool = True, preload: Sequence[str] = (), environment: Mapping[str, str] | None = None,
                 prepare: Sequence[str] = (), trains: bool = True) -> None:
        """``trains``: whether any task trains (a coordinator whose clients are all sites: none)."""
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.record = workdir / "tasks.jsonl"
        self.parallelism = parallelism
        self.threads = threads_per_task or max(1, (os.cpu_count() or 1) // parallelism)
        self.finished: dict[str, Observation] = self._load()
        self.running: dict[str, Handle] = {}
        self.environment = dict(environment if environment is not None else os.environ)
        self.server = ForkServer(preload, self.environment, spares=parallelism, prepare=prepare, warm=trains) \
            if fork_server else None
        self.queued: deque[tuple[str, list[str]]] = deque()
        self.started_at: dict[str, float] = {}
        self.durations: dict[str, float] = {}  # wall seconds of each finished task, from launch to its exit
        self.cpu_seconds: dict[str, float] = {}  # CPU seconds of each finished task (fork server only)

    def _load(self) -> dict[str, Observation]:
        """The recorded tasks (a later line wins); a last line cut short by a crash is a task to run again."""
        finished: dict[str, Observation] = {}
        legacy = self.record.with_suffix(".json")  # written whole after every task by earlier versions
        if legacy.exists():
            finished.update({k: Observation(**v) for k, v in json.loads(legacy.read_text()).items()})
        if self.record.exists():
            text = self.record.read_text()
            if text and not text.endswith("\n"):  # end the cut line, or the next record would join it
                with self.record.open("a") as file:
                    file.write("\n")
            for line in text.splitlines():
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    record = json.loads(line)
                    task_id = record.pop("task")
                    finished[task_id] = Observation(**record)
        return finished

    def _record(self, task_id: str) -> None:
        """Append the task's end: rewriting every finished task at each end cost a 1,000-task round minutes."""
        with self.record.open("a") as file:
            file.write(json.dumps({"task": task_id, **asdict(self.finished[task_id])}) + "\n")

    def knows(self, task_id: str) -> bool:
        """True when the task is finished, running or waiting for a slot."""
        return task_id in self.finished or task_id in self.running or any(t == task_id for t, _ in self.queued)

    def launch(self, task_id: str, arguments: Sequence[str]) -> None:
        """Queue a task unless it is already known (launching twice is harmless, as with Jobs)."""
        if not self.knows(task_id):
            self.queued.append((task_id, list(arguments)))
            self._fill()

    def cancel(self, task_id: str) -> None:
        """Stop a task and record it as failed (cancelled)."""
        self.queued = deque((t, a) for t, a in self.queued if t != task_id)
        process = self.running.pop(task_id, None)
        if process is not None:
            process.terminate()
            process.wait()
        if task_id not in self.finished:
            self.finished[task_id] = Observation("failed", None, None, "cancelled")
            self._record(task_id)

    def _fill(self) -> None:
        while self.queued and len(self.running) < self.parallelism:
            task_id, arguments = self.queued.popleft()
            out, err = self.logs / f"{task_id}.out", self.logs / f"{task_id}.err"
            self.started_at[task_id] = time.monotonic()
            if self.server is not None:
                self.running[task_id] = self.server.start(task_id, arguments, out, err, self.threads)
                continue
            environment = {**self.environment, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.threads),
                           "MKL_NUM_THREADS": str(self.threads)}
            with out.open("wb") as out_file, err.open("wb") as err_file:
                self.running[task_id] = subprocess.Popen(
                    [sys.executable, "-m", "fedtrain.worker.cli", *arguments], stdout=out_file, stderr=err_file,
                    stdin=subprocess.DEVNULL, env=environment, preexec_fn=_die_with_parent)

    def poll(self) -> dict[str, Observation]:
        """Reap finished processes, start queued ones, and report every task known."""
        changed = False
        for task_id, process in list(self.running.items()):
            code = process.poll()
            if code is None:
                continue
            del self.running[task_id]
            self.durations[task_id] = time.monotonic() - self.started_at.pop(task_id)
            if self.server is not None and task_id in self.server.cpu_seconds:
                self.cpu_seconds[task_id] = self.server.cpu_seconds[task_id]
            self.finished[task_id] = self._observe(task_id, code)
            self._record(task_id)
            changed = True
        if changed:
            self._fill()
        observations = dict(self.finished)
        for task_id in list(self.running) + [t for t, _ in self.queued]:
            observations[task_id] = Observation("running")
        return observations

    def _observe(self, task_id: str, code: int) -> Observation:
        if code != 0:
            return Observation("failed", code, None, last_error_line(self.logs / f"{task_id}.err"))
        try:
            output = json.loads((self.logs / f"{task_id}.out").read_text() or "null")
        except ValueError:
            output = None
        return Observation("succeeded", 0, output if isinstance(output, dict) else None)

    def wait(self, timeout: float) -> None:
        """Sleep until a process ends or ``timeout`` seconds pass."""
        if self.server is not None:  # the fork server reports exits as they happen
            self.server.exited.clear()
            if not any(p.poll() is not None for p in self.running.values()):
                self.server.exited.wait(timeout)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.running.values()):
                return
            time.sleep(0.05)

    @property
    def idle(self) -> bool:
        """Nothing running or queued."""
        return not self.running and not self.queued

    def shutdown(self) -> None:
        """Stop everything still running (their tasks will be started again on resume)."""
        self.queued.clear()
        for process in self.running.values():
            process.terminate()
        for process in self.running.values():
            process.wait()
        self.running.clear()
        if self.server is not None:
            self.server.close()
            self.server = None
