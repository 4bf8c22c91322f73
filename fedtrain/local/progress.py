"""What `fedtrain run` shows while it trains: a live display on a terminal, plain lines elsewhere.

Both take the runner's callbacks (`Event`, `TrainingStatus`). The live display (rich) keeps two
bars: rounds done, with elapsed time, ETA and the last accuracy; and the current round's clients.
Events print above it. Written to a pipe or a file, the same information is one line per event
and one per finished round, with no colours and no cursor movement, so logs stay readable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from fedtrain.engine.status import Event, RoundStatus, TrainingStatus

FINISHED_STATES = ("succeeded", "failed", "dropped")


def rounds_done(status: TrainingStatus) -> int:
    """The highest round whose aggregation is recorded."""
    return max((r.round for r in status.rounds if r.finished_at is not None), default=0)


def clients_done(record: RoundStatus) -> int:
    """Selected clients whose task has ended, one way or another."""
    return sum(1 for task in record.clients.values() if task.state in FINISHED_STATES)


def clock_text(seconds: float) -> str:
    """``0:03:05``."""
    return str(timedelta(seconds=round(max(seconds, 0.0))))


class PlainProgress:
    """One line per event and per finished round, for pipes and log files."""

    def __init__(self, out: IO[str], total_rounds: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.out, self.total, self.clock = out, total_rounds, clock
        self.started = clock()
        self.first_done: int | None = None  # rounds already done when this process started
        self.printed = 0

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.out.flush()

    def event(self, event: Event) -> None:
        """``Reason: message``."""
        self._line(f"{'warning: ' if event.warning else ''}{event.reason}: {event.message}")

    def status(self, status: TrainingStatus) -> None:
        """A line for each round finished since the last call."""
        done = rounds_done(status)
        if self.first_done is None:
            self.first_done = self.printed = done  # a resumed training does not repeat its rounds
        for number in range(self.printed + 1, done + 1):
            record = status.round(number)
            if record is not None:
                self._line(self._round_line(record, number))
        self.printed = max(self.printed, done)

    def _round_line(self, record: RoundStatus, number: int) -> str:
        elapsed = self.clock() - self.started
        ran = number - (self.first_done or 0)
        eta = elapsed / ran * (self.total - number) if ran > 0 else 0.0
        accuracy = f"accuracy {record.accuracy:.4f}" if record.accuracy is not None else "no accuracy"
        ok = record.count("succeeded")
        return (f"round {number}/{self.total} done: {accuracy}, {ok}/{len(record.selected)} clients, "
                f"elapsed {clock_text(elapsed)}, eta {clock_text(eta)}")

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


class LiveProgress:
    """Two live bars on a terminal (rounds; the current round's clients); events print above them."""

    def __init__(self, console: Console, total_rounds: int, clients_per_round: int) -> None:
        self.progress = Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), TextColumn("{task.fields[note]}"), console=console,
                                 transient=False)
        self.rounds: TaskID = self.progress.add_task("rounds", total=total_rounds, note="")
        self.clients: TaskID = self.progress.add_task("clients", total=clients_per_round, note="")
        self.shown_round = 0

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.progress.stop()

    def event(self, event: Event) -> None:
        """The event's reason in colour, then its message."""
        style = "yellow" if event.warning else "cyan"
        self.progress.console.print(Text.assemble((event.reason, style), " ", event.message))

    def status(self, status: TrainingStatus) -> None:
        """Move the bars: rounds done and the last accuracy; the current round's clients."""
        note = f"accuracy {status.accuracy:.4f}" if status.accuracy is not None else status.phase
        self.progress.update(self.rounds, completed=rounds_done(status), note=note)
        current = status.round(status.current_round)
        if current is None:
            return
        if current.round != self.shown_round:  # a new round: its clients' bar and clock start again
            self.progress.reset(self.clients, total=len(current.selected), description=f"round {current.round}")
            self.shown_round = current.round
        self.progress.update(self.clients, completed=clients_done(current), note=current_note(current))


def current_note(record: RoundStatus) -> str:
    """What the current round is doing: its clients, then its aggregation."""
    if record.finished_at is not None:
        return "done"
    if record.aggregation is not None:
        return "aggregating"
    running = sum(1 for task in record.clients.values() if task.state == "running")
    return f"{running} training"
