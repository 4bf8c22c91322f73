"""A fork server for local worker tasks: import torch once, fork a child per task.

Starting Python and importing torch (and torchvision) costs 3 to 7 seconds per process, more than a
small client's whole round. This server imports them once; each task is a forked child that runs
``fedtrain.worker.cli.main`` with exactly the arguments a Job would get, its stdout and stderr in
files, its exit code reported back. The server itself never runs a torch operation, so no thread
pool exists yet when it forks.

Protocol, one JSON object per line. In: ``{"id", "argv", "stdout", "stderr", "threads"}`` to run,
``{"cancel": id}`` to stop. Out: ``{"id", "pid"}`` when started, ``{"id", "exit"}`` when done.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
from typing import Any


def _child(request: dict[str, Any]) -> None:  # pragma: no cover - runs in a forked child
    code = 70
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the server
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)  # the server's wake-up pipe and SIGCHLD handler are not the task's
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        os.environ.update(request.get("env") or {})  # a task's own settings (a Pod's env, in the test cluster)
        import torch

        torch.set_num_threads(int(request.get("threads", 1)))
        from fedtrain.worker.cli import main

        code = main(request["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


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


def _wake_on_child_exit() -> int:
    """A pipe that becomes readable when a child exits (SIGCHLD), so exits are reported at once."""
    read_end, write_end = os.pipe()
    for end in (read_end, write_end):
        os.set_blocking(end, False)
    signal.set_wakeup_fd(write_end)
    signal.signal(signal.SIGCHLD, lambda number, frame: None)
    return read_end


def serve(preload: list[str]) -> None:
    """Import the heavy modules and warm them up, then fork one child per request until stdin closes."""
    import importlib

    for module in ["torch", "fedtrain.worker.cli", "fedtrain.worker.jobs", *preload]:
        importlib.import_module(module)
    warm_up()
    wake = _wake_on_child_exit()
    _send({"ready": True})
    children: dict[int, str] = {}
    buffer = b""
    stdin = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([stdin, wake], [], [], 1.0)
        if wake in readable:
            os.read(wake, 4096)  # drain; the exits are collected below
        if stdin in readable:
            chunk = os.read(stdin, 65536)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                if "cancel" in request:
                    for pid, ident in children.items():
                        if ident == request["cancel"]:
                            os.kill(pid, signal.SIGTERM)
                    continue
                pid = os.fork()
                if pid == 0:
                    _child(request)
                children[pid] = request["id"]
                _send({"id": request["id"], "pid": pid})
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if pid in children:
                ident = children.pop(pid)
                _send({"id": ident, "exit": os.waitstatus_to_exitcode(status)})
    for pid in children:
        os.kill(pid, signal.SIGTERM)


if __name__ == "__main__":
    serve(sys.argv[1:])
    sys.stdout.flush()
    # Nothing is left to write, and an interpreter holding torch takes about 2 s to tear down: every
    # runner that stops (each `fedtrain run`, each test cluster) would wait for it.
    os._exit(0)
