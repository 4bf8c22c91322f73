"""The local executor's record of finished tasks: what a runner started again after a crash knows."""

from __future__ import annotations

import json
from pathlib import Path

from fedtrain.engine.status import Observation
from fedtrain.local.executor import LocalExecutor

CANCELLED = Observation("failed", None, None, "cancelled")


def executor(workdir: Path) -> LocalExecutor:
    return LocalExecutor(workdir, parallelism=1, fork_server=False)


def test_finished_tasks_survive_a_restart_one_appended_line_each(tmp_path: Path) -> None:
    first = executor(tmp_path)
    for task in ("r0001-train-a", "r0001-train-b"):
        first.cancel(task)  # ends a task without running a process: recorded as failed
    lines = (tmp_path / "tasks.jsonl").read_text().splitlines()
    assert [json.loads(line)["task"] for line in lines] == ["r0001-train-a", "r0001-train-b"]
    again = executor(tmp_path)
    assert again.poll() == {"r0001-train-a": CANCELLED, "r0001-train-b": CANCELLED}


def test_a_line_cut_short_by_a_crash_is_a_task_to_run_again_and_later_lines_are_kept(tmp_path: Path) -> None:
    executor(tmp_path).cancel("r0001-train-a")
    with (tmp_path / "tasks.jsonl").open("a") as file:
        file.write('{"task": "r0001-train-b", "state": "succ')  # the runner died in the middle of this write
    restarted = executor(tmp_path)
    assert set(restarted.poll()) == {"r0001-train-a"}
    restarted.cancel("r0001-train-c")
    assert set(executor(tmp_path).poll()) == {"r0001-train-a", "r0001-train-c"}


def test_the_whole_file_record_of_earlier_versions_is_read(tmp_path: Path) -> None:
    (tmp_path / "tasks.json").write_text(json.dumps({"init": {"state": "succeeded", "exit_code": 0,
                                                              "output": {"round": 0}, "reason": None}}))
    executor(tmp_path).cancel("r0001-train-a")
    assert executor(tmp_path).poll() == {"init": Observation("succeeded", 0, {"round": 0}), "r0001-train-a": CANCELLED}
