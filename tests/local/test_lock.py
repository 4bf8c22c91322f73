"""One `fedtrain run` per work directory: a second fails at once naming the directory and the holder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedtrain.cli import main
from fedtrain.local.lock import LOCK_FILE, WorkdirBusy, workdir_lock
from tests.local.test_run import manifest, write

HOLD = """
import sys, time
from pathlib import Path
from fedtrain.local.lock import workdir_lock
with workdir_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_of_a_held_directory_fails_at_once_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = tmp_path / "w"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code = main(["run", str(write(tmp_path / "ft.yaml", manifest("locked", 1))), "--workdir", str(workdir)])
        said = " ".join(capsys.readouterr().err.split())
        assert code == 2
        assert f"{workdir} is in use by another `fedtrain run` (pid {holder.pid} on" in said
        assert sorted(p.name for p in workdir.iterdir()) == [LOCK_FILE]  # no spec, status or uid written
    finally:
        holder.kill()
        holder.wait()
    with workdir_lock(workdir):  # the kernel released a killed holder's lock: no stale lock blocks the next run
        assert f"pid {os.getpid()} " in (workdir / LOCK_FILE).read_text()


def test_the_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    with workdir_lock(tmp_path), pytest.raises(WorkdirBusy, match=str(tmp_path)), workdir_lock(tmp_path):
        pass
    with workdir_lock(tmp_path):
        pass
