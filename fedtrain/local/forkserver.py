"""A fork server for local worker tasks: import torch once, run tasks in processes forked from it.

Starting Python and importing torch (and torchvision) costs 3 to 7 seconds per process, more than a
small client's whole round. This server imports them once and warms them up (one intra-op thread,
so that no thread pool exists yet when it forks). Tasks run in task processes forked from it (see
`taskprocess`), with exactly the arguments a Job would get, their stdout and stderr in files, their
exit code reported back.

What a task would otherwise pay besides its work stays off its critical path:

- forking (about 65 ms for a process holding torch): the server keeps ``--spares`` task processes
  ready, forked while no request waits;
- the first use of torch in a new process (page faults on a new heap, oneDNN primitives for the
  model's shapes): a task process that ran a train, aggregate or evaluate task runs the next one
  of the same environment, each from the same pristine state (see `taskprocess`);
- tearing a process down and noticing its exit: a task process reports its exit code through a
  pipe shared with the server as its first act after the task, so the next task starts at once;
  one that dies without reporting (killed, crashed) is reported when it is reaped, with its
  signal as a negative exit code, and replaced;
- the imports of the training's last task (``--prepare finalize``): once init has ended (or a
  resumed training's first task is handed out), a process is forked for finalize and imports
  MLflow, its sqlite store, matplotlib and `torch.export` (`PREPARED`: about 3.4 s of a quiet core)
  beside the rounds, instead of after the last one.

Protocol, one JSON object per line. In: ``{"id", "argv", "stdout", "stderr", "threads", "env"}`` to
run, ``{"cancel": id}`` to stop (SIGTERM to the task's process group). Out: ``{"ready": true}``
once, ``{"prepared", "pid"}`` for a process kept for a command, ``{"id", "pid"}`` when started,
``{"id", "exit", "cpu", "rss"}`` when done (``cpu``: the task's user and system seconds; ``rss``:
its process's resident bytes afterwards, absent when it died).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from fedtrain.local.taskprocess import REUSABLE, serve_tasks, write_all

STOP_GRACE_SECONDS = 5.0  # for the last tasks to end after SIGTERM when the server stops
# Commands a process can be prepared for (``--prepare``), and what such a process imports ahead of its
# task: what finalize imports beyond the worker's other commands (MLflow's store opens its schema
# modules on first use; the plots are drawn by a child forked from the finalize process; MLflow logs a
# PyTorch model through torch.export, whose first import brings in torch._dynamo: 1.3 s of CPU, which a
# server that warmed up with a training step had mostly paid already, one that skipped it had not).
PREPARED: dict[str, tuple[str, ...]] = {
    "finalize": ("fedtrain.worker.finalize", "fedtrain.worker.tracking", "fedtrain.worker.plots", "mlflow",
                 "mlflow.pytorch", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
                 "mlflow.store.model_registry.sqlalchemy_store", "torch.export._trace"),
}
# A prepared process is forked once the training's set-up is over: when a set-up task ends (as soon as
# nothing else waits on the server), or when the server hands out a task past the set-up (a resumed
# training's first). So no start of the set-up waits for it, and a coordinator whose clients are all
# sites imports while they train the first round instead of beside its first aggregation.
SETUP_COMMANDS = ("init",)


def _send(message: dict[str, Any]) -> None:
    sys.__stdout__.write(json.dumps(message) + "\n")  # type: ignore[union-attr]
    sys.__stdout__.flush()  # type: ignore[union-attr]


def warm_up() -> None:
    """Pay the first-use costs once, so that forked children start warm.

    About 2 s: torch's first forward and backward, Adam, the image and safetensors codecs. With one
    intra-op thread no OpenMP thread pool exists yet when the server forks; each child then sets
    its own thread count.
    """
    import tempfile
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image

    from fedtrain.worker.models import TinyCnn
    from fedtrain.worker.training import TrainConfig, state_to_numpy, train_local
    from fedtrain.worker.weights import read_weights_file, save_weights_file

    torch.set_num_threads(1)
    model = TinyCnn(2)
    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    train_local(model, images, np.array([0, 1]), TrainConfig(batch_size=2))
    with tempfile.TemporaryDirectory() as folder:
        save_weights_file(Path(folder) / "w.safetensors", state_to_numpy(model), {"num_examples": 1})
        read_weights_file(Path(folder) / "w.safetensors")
        Image.fromarray(images[0]).save(Path(folder) / "i.ppm")
        Image.open(Path(folder) / "i.ppm").convert("RGB")


def _pipe(blocking_write: bool) -> tuple[int, int]:
    """A pipe whose read end never blocks the server's loop."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, blocking_write)
    return read_end, write_end


def _terminate(pid: int) -> None:
    """SIGTERM a task process and the processes it started (its process group), as a Pod's containers are stopped."""
    with contextlib.suppress(ProcessLookupError):  # gone already (its notice crossed the request)
        os.killpg(pid, signal.SIGTERM)


@dataclass
class Worker:
    """A task process: idle (``task`` None) or running a task; ``env`` and ``command`` of its last task."""

    pid: int
    requests: int  # the server's end of the pipe the process reads its requests from
    task: str | None = None
    env: str | None = None  # None: fresh, it has run nothing yet
    command: str | None = None
    prepared: str | None = None  # the command it imported ahead for (`PREPARED`); it runs no other


def _command(request: dict[str, Any]) -> str:
    return str((request.get("argv") or [""])[0])


def _env_key(request: dict[str, Any]) -> str:
    return json.dumps(request.get("env") or {}, sort_keys=True)


class Server:
    """Hands requests to task processes; reports starts and exits on stdout."""

    def __init__(self, spares: int, prepare: tuple[str, ...] = ()) -> None:
        self.wanted = max(1, spares)
        self.to_prepare = [command for command in prepare if command in PREPARED]
        self.set_up = False  # a set-up task has ended: the prepared processes are due
        self.workers: dict[int, Worker] = {}
        self.notices, self.notice_end = _pipe(blocking_write=True)  # task processes report on notice_end
        self.wake, self.wake_end = _pipe(blocking_write=False)  # readable when a child exits (SIGCHLD)
        signal.set_wakeup_fd(self.wake_end)
        signal.signal(signal.SIGCHLD, lambda number, frame: None)
        self.notice_buffer = b""

    def fork_worker(self) -> Worker:
        """A fresh task process waiting for requests; it keeps none of the server's other descriptors."""
        read_end, write_end = os.pipe()
        inherited = [write_end, self.notices, self.wake, self.wake_end, *(w.requests for w in self.workers.values())]
        pid = os.fork()
        if pid == 0:
            serve_tasks(read_end, self.notice_end, inherited)
        with contextlib.suppress(ProcessLookupError):  # as the child does: whichever runs first, a cancel finds it
            os.setpgid(pid, pid)
        os.close(read_end)
        worker = self.workers[pid] = Worker(pid, write_end)
        return worker

    def retire(self, worker: Worker) -> None:
        """Forget a process: it reads end-of-file and exits (or it is exiting already)."""
        self.workers.pop(worker.pid, None)
        os.close(worker.requests)

    def general(self) -> list[Worker]:
        """The processes that are not kept for one command (``spares`` counts these)."""
        return [w for w in self.workers.values() if w.prepared is None]

    def prepare(self) -> None:
        """Fork the processes that ``--prepare`` asks for; each imports its command's modules while it waits."""
        for command in self.to_prepare:
            worker = self.fork_worker()
            worker.prepared = command
            write_all(worker.requests, json.dumps({"prepare": list(PREPARED[command])}).encode() + b"\n")
            _send({"prepared": command, "pid": worker.pid})
        self.to_prepare = []

    def choose(self, request: dict[str, Any]) -> Worker:
        """The process prepared for the command, a warm idle one for a reusable command, else a fresh one."""
        prepared = [w for w in self.workers.values() if w.task is None and w.prepared == _command(request)]
        if prepared:
            return prepared[0]
        idle = [w for w in self.general() if w.task is None]
        if _command(request) in REUSABLE:
            warm = [w for w in idle if w.env == _env_key(request)]
            if warm:
                return min(warm, key=lambda w: w.command != _command(request))
        fresh = [w for w in idle if w.env is None]
        return fresh[0] if fresh else self.fork_worker()

    def handle(self, request: dict[str, Any]) -> None:
        """Cancel a task, or hand a request to a task process."""
        if "cancel" in request:
            for worker in self.workers.values():
                if worker.task == request["cancel"]:
                    _terminate(worker.pid)
            return
        line = json.dumps(request).encode() + b"\n"
        while True:
            worker = self.choose(request)
            try:
                write_all(worker.requests, line)
                break
            except BrokenPipeError:  # it died while idle: reaped later; take another
                self.retire(worker)
        worker.task, worker.env, worker.command = request["id"], _env_key(request), _command(request)
        _send({"id": request["id"], "pid": worker.pid})
        if self.to_prepare and worker.command not in SETUP_COMMANDS:  # the training runs: no start waits for this
            self.prepare()

    def read_notices(self) -> None:
        """Exit reports of tasks: passed on now, before a retiring process's teardown ends."""
        try:
            self.notice_buffer += os.read(self.notices, 65536)
        except BlockingIOError:
            return
        while b"\n" in self.notice_buffer:
            line, self.notice_buffer = self.notice_buffer.split(b"\n", 1)
            notice = json.loads(line)
            worker = self.workers.get(int(notice["pid"]))
            if worker is None or worker.task is None:
                continue
            _send({"id": worker.task, "exit": int(notice["exit"]), "cpu": float(notice["cpu"]),
                   "rss": int(notice["rss"])})
            worker.task = None
            self.set_up = self.set_up or worker.command in SETUP_COMMANDS
            if not notice["reusable"]:
                self.retire(worker)
            elif sum(w.task is None for w in self.general()) > self.wanted:
                self.retire(worker)  # more idle processes than tasks can run at once

    def reap(self) -> None:
        """Collect exited children; report the tasks of those that died without a report (killed, crashed)."""
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.read_notices()  # a report written just before the exit is not mistaken for a silent death
            worker = self.workers.get(pid)
            if worker is None:
                continue
            if worker.task is not None:
                _send({"id": worker.task, "exit": os.waitstatus_to_exitcode(status),
                       "cpu": usage.ru_utime + usage.ru_stime})
            self.retire(worker)

    def serve(self, stdin: int) -> None:
        """Until stdin closes: run requests, report exits, keep enough processes ready when nothing waits."""
        buffer = b""
        while True:
            missing = len(self.general()) < self.wanted
            due = self.set_up and bool(self.to_prepare)
            readable, _, _ = select.select([stdin, self.wake, self.notices], [], [], 0 if missing or due else 1.0)
            if not readable and missing:
                self.fork_worker()
                continue
            if not readable and due:
                self.prepare()
                continue
            if self.notices in readable:
                self.read_notices()
            if self.wake in readable:
                while True:  # drain; the exits are collected below
                    try:
                        os.read(self.wake, 4096)
                    except BlockingIOError:
                        break
            if stdin in readable:
                chunk = os.read(stdin, 65536)
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    self.handle(json.loads(line))
            self.reap()
        self.stop()

    def stop(self) -> None:
        """Stop running tasks (the runner starts them again on resume), release the idle processes, reap them."""
        for worker in list(self.workers.values()):
            _terminate(worker.pid)
            self.retire(worker)
        self.collect(STOP_GRACE_SECONDS)

    def collect(self, seconds: float) -> None:
        """Wait (a bounded time) for every child to be gone, so that their CPU time is counted as this server's."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.01)


def serve(preload: list[str], spares: int = 1, prepare: tuple[str, ...] = (), warm: bool = True) -> None:
    """Import the heavy modules and warm them up, then run requests in forked children until stdin closes.

    ``warm``: False for a runner none of whose tasks trains (a coordinator whose clients are all
    sites): the warm-up is a training step, about 1.2 s of a quiet core before the first task can start.
    """
    import importlib

    for module in ["torch", "fedtrain.worker.cli", "fedtrain.worker.jobs", *preload]:
        importlib.import_module(module)
    if warm:
        warm_up()
    server = Server(spares, prepare)
    for _ in range(server.wanted):
        server.fork_worker()
    _send({"ready": True})
    server.serve(sys.stdin.fileno())


def main(argv: list[str]) -> None:
    """``python -m fedtrain.local.forkserver [--spares N] [--prepare COMMAND] [module...]``."""
    parser = argparse.ArgumentParser(prog="fedtrain.local.forkserver")
    parser.add_argument("--spares", type=int, default=1, help="children forked ahead of time (the tasks run at once)")
    parser.add_argument("--prepare", action="append", default=[], choices=sorted(PREPARED),
                        help="keep a process for this command, its modules imported while the training runs")
    parser.add_argument("--no-warm-up", dest="warm", action="store_false",
                        help="skip the warm-up training step: none of the runner's tasks trains")
    parser.add_argument("preload", nargs="*", help="modules to import before forking, besides torch and the worker")
    args = parser.parse_args(argv)
    serve(args.preload, max(0, args.spares), tuple(args.prepare), args.warm)


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.stdout.flush()
    # Nothing is left to write, and an interpreter holding torch takes about 2 s to tear down: every
    # runner that stops (each `fedtrain run`, each test cluster) would wait for it.
    os._exit(0)
