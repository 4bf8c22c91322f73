"""What `fedtrain run` shows: live bars on a terminal, plain lines in a pipe."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from fedtrain.cli import progress_display
from fedtrain.engine.status import ClientTask, Event, RoundStatus, TrainingStatus
from fedtrain.local.progress import LiveProgress, PlainProgress


def status_after(done: int, total: int, training: int = 0) -> TrainingStatus:
    """``done`` rounds finished (accuracy 0.1 per round), then round ``done + 1`` with clients at work."""
    rounds = [RoundStatus(round=n, selected=["a", "b"], clients={"a": ClientTask(state="succeeded"),
                                                                  "b": ClientTask(state="succeeded")},
                          finished_at=float(n), accuracy=n / 10) for n in range(1, done + 1)]
    if done < total:
        states = ["succeeded"] * training + ["running"] * (2 - training)
        rounds.append(RoundStatus(round=done + 1, selected=["a", "b"],
                                  clients={c: ClientTask(state=s) for c, s in zip("ab", states, strict=True)}))  # type: ignore[arg-type]
    current = done + 1 if done < total else done
    return TrainingStatus(phase="Running", current_round=current, total_rounds=total, rounds=rounds,
                          accuracy=done / 10 if done else None)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_give_each_round_its_accuracy_elapsed_and_eta() -> None:
    out, clock = io.StringIO(), FakeClock()
    with PlainProgress(out, 4, clock) as display:
        display.status(status_after(0, 4))
        clock.now += 30
        display.status(status_after(1, 4, training=1))
        display.event(Event("ClientFailed", "client b of round 2 failed", warning=True))
        clock.now += 30
        display.status(status_after(3, 4))  # two rounds finished between two calls: both are printed
    assert out.getvalue().splitlines() == [
        "round 1/4 done: accuracy 0.1000, 2/2 clients, elapsed 0:00:30, eta 0:01:30",
        "warning: ClientFailed: client b of round 2 failed",
        "round 2/4 done: accuracy 0.2000, 2/2 clients, elapsed 0:01:00, eta 0:01:00",
        "round 3/4 done: accuracy 0.3000, 2/2 clients, elapsed 0:01:00, eta 0:00:20",
    ]


def test_a_resumed_training_does_not_repeat_its_finished_rounds() -> None:
    out = io.StringIO()
    display = PlainProgress(out, 4, FakeClock())
    display.status(status_after(2, 4))
    display.status(status_after(3, 4))
    assert [line.split(":")[0] for line in out.getvalue().splitlines()] == ["round 3/4 done"]


def test_a_terminal_gets_live_bars_with_rounds_clients_and_accuracy() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, color_system="standard")
    display = progress_display(console, 3, 2)
    assert isinstance(display, LiveProgress)
    with display:
        display.status(status_after(1, 3, training=1))
        display.event(Event("RoundCompleted", "round 1: accuracy 0.1000"))
        display.status(status_after(2, 3))
    shown = screen.getvalue()
    assert "\x1b[" in shown  # colours and cursor movement: a live display, not lines
    assert "RoundCompleted" in shown and "round 1: accuracy 0.1000" in shown
    last = shown.rsplit("rounds", 1)[1]
    assert "2/3" in last and "accuracy 0.2000" in last and "round 3" in last and "2 training" in last
    assert "eta" in last and "elapsed" in last


@pytest.mark.slow  # a whole training with MLflow registration: 20 s on a quiet machine, a minute on a busy one
def test_a_pipe_gets_plain_lines_from_the_cli(tmp_path: Path) -> None:
    manifest = {"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedTraining", "metadata": {"name": "piped"},
                "spec": {"rounds": 2, "model": {"architecture": "tiny_cnn", "imageSize": 16},
                         "dataset": {"synthetic": {"imagesPerClass": 2, "testImagesPerClass": 1,
                                                   "framesPerTrack": 2}},
                         "clients": {"count": 2}, "training": {"localEpochs": 1},
                         "worker": {"parallelism": 2, "device": "cpu"}}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(manifest))
    done = subprocess.run([sys.executable, "-m", "fedtrain.cli", "run", str(tmp_path / "ft.yaml"), "--workdir",
                           str(tmp_path / "w")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracies = [r["accuracy"] for r in json.loads((tmp_path / "w" / "status.json").read_text())["rounds"]]
    lines = done.stdout.splitlines()
    for number, accuracy in enumerate(accuracies, start=1):
        assert any(line.startswith(f"round {number}/2 done: accuracy {accuracy:.4f}, 2/2 clients, elapsed ")
                   for line in lines), done.stdout
    assert any(line.startswith("RoundCompleted: ") for line in lines)
    assert "\x1b[" not in done.stdout + done.stderr  # no colours, no cursor movement
    assert "progress.py" not in done.stdout and "runner.py" not in done.stdout  # no source-file columns
    assert isinstance(progress_display(Console(file=io.StringIO()), 2, 2), PlainProgress)
