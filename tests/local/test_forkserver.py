"""The fork server's task processes: each task isolated as a fresh process would be, processes reused only when safe.

One server for the module (starting it imports torch); real worker commands on a tiny training.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedtrain.contract.errors import EXIT_BAD_INPUT
from fedtrain.local.executor import ForkedTask, ForkServer

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server() -> Iterator[ForkServer]:
    forks = ForkServer([], spares=2)
    yield forks
    forks.close()


class Tasks:
    """Starts worker commands on the server and reads what they left."""

    def __init__(self, server: ForkServer, logs: Path, workdir: Path) -> None:
        self.server, self.logs, self.workdir = server, logs, workdir
        self.count = 0

    def start(self, *argv: object, env: dict[str, str] | None = None) -> tuple[str, ForkedTask]:
        self.count += 1
        ident = f"t{self.count}"
        task = self.server.start(ident, [str(a) for a in argv], self.logs / f"{ident}.out", self.logs / f"{ident}.err",
                                 threads=1, environment=env)
        return ident, task

    def run(self, *argv: object, env: dict[str, str] | None = None) -> tuple[str, int]:
        ident, task = self.start(*argv, env=env)
        return ident, task.wait()

    def output(self, ident: str) -> Any:
        return json.loads((self.logs / f"{ident}.out").read_text())

    def error(self, ident: str) -> str:
        return (self.logs / f"{ident}.err").read_text()


@pytest.fixture(scope="module")
def tasks(server: ForkServer, synth_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Tasks:
    """A tiny initialised training to run train and evaluate tasks on."""
    root = tmp_path_factory.mktemp("forks")
    (root / "logs").mkdir()
    runner = Tasks(server, root / "logs", root / "work")
    ident, code = runner.run("init", "--workdir", runner.workdir, "--data", synth_tree, "--clients", 2,
                             "--architecture", "tiny_cnn", "--image-size", 16, "--seed", 1)
    assert code == 0, runner.error(ident)
    return runner


def train(tasks: Tasks, client: str = "client-00", epochs: int = 1) -> tuple[str, int]:
    return tasks.run("train", "--workdir", tasks.workdir, "--round", 1, "--client", client, "--epochs", epochs,
                     "--batch-size", 8, "--device", "cpu")


def evaluate(tasks: Tasks, **kwargs: Any) -> tuple[str, int]:
    return tasks.run("evaluate", "--workdir", tasks.workdir, "--round", 0, "--device", "cpu", **kwargs)


def test_a_process_runs_the_next_task_from_the_state_a_fresh_one_has(tasks: Tasks) -> None:
    first, code = train(tasks)
    assert code == 0, tasks.error(first)
    again, code = train(tasks)
    assert code == 0, tasks.error(again)
    pids = tasks.server.pids
    assert pids[again] == pids[first]  # the same process ran both
    # ... and trained exactly as the first, fresh one did: same seeds, same update to the bit
    assert tasks.output(again)["sha256"] == tasks.output(first)["sha256"]
    assert tasks.server.cpu_seconds[again] > 0


def test_a_site_runs_its_next_task_in_the_same_process_from_the_state_a_fresh_one_has(
        server: ForkServer, synth_tree: Path, tmp_path: Path) -> None:
    """A site's task reuses a warm process as a training does, and trains exactly as a fresh process."""
    from tests.worker.test_site_task import SITE, posted

    (tmp_path / "logs").mkdir()
    site = Tasks(server, tmp_path / "logs", tmp_path / "work")
    ident, code = site.run("init", "--workdir", site.workdir, "--data", synth_tree, "--clients", 2,
                           "--client-names", f"hq,{SITE}", "--own-data-clients", SITE, "--architecture", "tiny_cnn",
                           "--image-size", 16, "--seed", 1)
    assert code == 0, site.error(ident)
    answers = []
    for attempt in (1, 2):  # two attempts of one task: the same work, answered under keys of their own
        task = posted(site.workdir, "train", 1, attempt=attempt).to_json()
        ident, code = site.run("site-task", "--workdir", site.workdir, "--task-json", json.dumps(task),
                               "--data", synth_tree, "--device", "cpu")
        assert code == 0, site.error(ident)
        answers.append(ident)
    first, again = answers
    assert server.pids[again] == server.pids[first]
    assert site.output(again)["sha256"] == site.output(first)["sha256"]


def test_memory_does_not_grow_across_tasks(tasks: Tasks) -> None:
    idents = [evaluate(tasks)[0] for _ in range(6)]
    pids = {tasks.server.pids[i] for i in idents}
    assert len(pids) == 1, pids
    resident = [tasks.server.resident_bytes[i] for i in idents]
    assert resident[-1] <= resident[1] * 1.1, resident
    assert len({json.dumps(tasks.output(i)) for i in idents}) == 1  # the same scores every time


def test_a_task_with_other_environment_runs_in_another_process(tasks: Tasks, tmp_path: Path) -> None:
    plain, code = evaluate(tasks)
    assert code == 0
    cached, code = evaluate(tasks, env={"FEDTRAIN_DECODED_CACHE": str(tmp_path / "cache")})
    assert code == 0, tasks.error(cached)
    assert list((tmp_path / "cache").iterdir())  # the task saw its variable...
    after, code = evaluate(tasks)
    assert code == 0
    assert tasks.server.pids[cached] not in (tasks.server.pids[plain], tasks.server.pids[after])  # ...no other did


def test_a_failed_task_retires_its_process(tasks: Tasks) -> None:
    evaluate(tasks)
    earlier = set(tasks.server.pids.values())
    failed, code = tasks.run("evaluate", "--workdir", tasks.workdir, "--round", 99, "--device", "cpu")
    assert code == EXIT_BAD_INPUT and "round 99 has not been aggregated" in tasks.error(failed)
    assert tasks.server.pids[failed] in earlier  # a process that had run a task before...
    following, code = evaluate(tasks)
    assert code == 0
    assert tasks.server.pids[following] != tasks.server.pids[failed]  # ...and runs none after its failure


def test_a_killed_task_is_reported_and_its_process_replaced(tasks: Tasks) -> None:
    ident, task = tasks.start("train", "--workdir", tasks.workdir, "--round", 1, "--client", "client-01",
                              "--epochs", 500, "--batch-size", 8, "--device", "cpu")
    pid = wait_for(lambda: tasks.server.pids.get(ident))
    os.kill(pid, signal.SIGKILL)
    assert task.wait() == -signal.SIGKILL
    following, code = evaluate(tasks)
    assert code == 0 and tasks.server.pids[following] != pid


def test_cancel_stops_the_task_and_the_processes_it_started(tasks: Tasks, tmp_path: Path) -> None:
    ident, task = tasks.start("synth-gtsrb", "--out", tmp_path / "data", "--per-class", 400)
    pid = wait_for(lambda: tasks.server.pids.get(ident))
    wait_for(lambda: (tmp_path / "data").exists() or None)  # its generator processes are at work
    task.terminate()
    assert task.wait() == -signal.SIGTERM
    assert wait_for(lambda: not group_alive(pid) or None)


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, which only wait for their reaper, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended while we looked
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_for(condition: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_a_coordinator_whose_clients_all_train_elsewhere_prepares_once_init_has_ended(
        synth_tree: Path, tmp_path: Path) -> None:
    """A sites-only coordinator runs no task while the sites train round 1: it prepares finalize then, not later."""
    coordinator = ForkServer([], spares=1, prepare=["finalize"], warm=False)  # it trains nothing: no warm-up step
    try:
        (tmp_path / "logs").mkdir()
        tasks = Tasks(coordinator, tmp_path / "logs", tmp_path / "work")
        assert coordinator.prepared == {}  # set-up first: init's start waits for no fork
        ident, code = tasks.run("init", "--workdir", tasks.workdir, "--data", synth_tree, "--clients", 1,
                                "--architecture", "tiny_cnn", "--image-size", 16, "--seed", 1)
        assert code == 0, tasks.error(ident)
        prepared = wait_for(lambda: coordinator.prepared.get("finalize"))  # no other task asked for
        assert prepared != coordinator.pids[ident]
    finally:
        coordinator.close()


def test_finalize_runs_in_the_process_prepared_for_it_once_training_began(synth_tree: Path, tmp_path: Path) -> None:
    """``prepare``: a process is forked for finalize once init has ended and imports MLflow while it waits."""
    forks = ForkServer([], spares=1, prepare=["finalize"])
    try:
        (tmp_path / "logs").mkdir()
        runner = Tasks(forks, tmp_path / "logs", tmp_path / "work")
        ident, code = runner.run("init", "--workdir", runner.workdir, "--data", synth_tree, "--clients", 1,
                                 "--architecture", "tiny_cnn", "--image-size", 16, "--seed", 1)
        assert code == 0, runner.error(ident)
        trained, code = train(runner)
        assert code == 0, runner.error(trained)
        deadline = time.monotonic() + 30
        while "finalize" not in forks.prepared and time.monotonic() < deadline:
            time.sleep(0.05)
        assert forks.prepared["finalize"] not in (forks.pids[ident], forks.pids[trained])
        ident, code = runner.run("aggregate", "--workdir", runner.workdir, "--round", 1, "--device", "cpu")
        assert code == 0, runner.error(ident)
        assert forks.pids[ident] != forks.prepared["finalize"]  # kept for finalize only
        ident, code = runner.run("finalize", "--workdir", runner.workdir, "--round", 1, "--device", "cpu",
                                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert code == 0, runner.error(ident)
        assert forks.pids[ident] == forks.prepared["finalize"]
        summary = runner.output(ident)
        assert summary["model_version"] is None and summary["tracking_error"] is None
        assert sorted(Path(p).name for p in summary["plots"]) == ["accuracy.png", "confusion.png", "loss.png"]
    finally:
        forks.close()
