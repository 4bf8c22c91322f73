"""Secure aggregation's round stages in the engine: keys, shares, masked training, unmasking, then aggregation."""

from __future__ import annotations

from typing import Any

import pytest

from fedtrain.contract.errors import EXIT_BAD_DATA, EXIT_SECURE_ROUND
from fedtrain.engine import Observation, Task, TrainingStatus
from fedtrain.engine.status import Reason
from tests.engine.test_engine import Simulation, ok, spec


def secure(threshold: int = 3, min_successful: int | None = None, **overrides: Any) -> Any:
    return spec(clients={"count": 4, "minSuccessful": min_successful or threshold}, privacy={
        "clipNorm": 5.0, "secureAggregation": {"threshold": threshold}}, **overrides)


def order(sim: Simulation, round_number: int = 1) -> list[str]:
    """The kinds of a round's tasks in the order they were launched, each kind once."""
    kinds: list[str] = []
    for ident in sim.launched:
        kind = {"k": "keys", "s": "shares", "r": "train", "u": "unmask"}.get(ident[0], "other")
        if ident[0] in "ksru" and ident[1:5] == f"{round_number:04d}" and kind not in kinds:
            kinds.append(kind)
        elif "aggregate" in ident and ident.startswith(f"r{round_number:04d}") and "aggregate" not in kinds:
            kinds.append("aggregate")
    return kinds


class Recorder:
    """Answers like `ok`, keeping every task the engine launched (with its roster)."""

    def __init__(self, fail: dict[tuple[str, str], int] | None = None) -> None:
        self.tasks: list[Task] = []
        self.fail = fail or {}  # (kind, client) -> exit code, every attempt

    def __call__(self, task: Task, now: float) -> Observation | None:
        self.tasks.append(task)
        code = self.fail.get((task.kind, task.client or ""))
        if code is not None:
            return Observation("failed", code, reason="refused")
        return ok(task, now)

    def of(self, kind: str, round_number: int = 1) -> list[Task]:
        return [t for t in self.tasks if t.kind == kind and t.round == round_number]


def test_a_secure_round_runs_keys_shares_training_unmasking_then_aggregation() -> None:
    recorder = Recorder()
    sim = Simulation(secure(), recorder)
    status = sim.run(80)
    assert status.phase == "Succeeded", sim.events
    assert order(sim) == ["keys", "shares", "train", "unmask", "aggregate"]
    clients = ["client-00", "client-01", "client-02", "client-03"]
    for kind in ("train", "unmask", "aggregate"):
        assert all(t.peers == tuple(clients) for t in recorder.of(kind)), kind
    assert all(t.survivors == tuple(clients) for t in recorder.of("unmask") + recorder.of("aggregate"))
    assert all(t.round_attempt == 1 for t in recorder.tasks if t.round == 1)
    assert status.rounds[0].secure is None, "the rosters are dropped once the round completed"


def test_a_plain_round_has_no_secure_stages() -> None:
    sim = Simulation(spec(clients={"count": 4}))
    sim.run(80)
    assert order(sim) == ["train", "aggregate"]


@pytest.mark.parametrize(("kind", "stage_after"), [("keys", "shares"), ("shares", "train"), ("train", "unmask")])
def test_a_client_dropping_at_a_stage_is_left_out_of_every_later_roster(kind: str, stage_after: str) -> None:
    recorder = Recorder({(kind, "client-02"): EXIT_BAD_DATA})
    sim = Simulation(secure(), recorder)
    status = sim.run(80)
    assert status.phase == "Succeeded", sim.events
    assert all(t.client != "client-02" for t in recorder.of(stage_after))
    kept = ("client-00", "client-01", "client-03")
    if kind in ("keys", "shares"):  # it never shared: nobody masks against it
        assert all(t.peers == kept for t in recorder.of("train"))
    else:  # it shared, then dropped: the survivors reveal its masking key's shares
        assert all(t.peers == (*kept[:2], "client-02", kept[2]) for t in recorder.of("unmask"))
        assert all(t.survivors == kept for t in recorder.of("unmask") + recorder.of("aggregate"))


def test_a_client_that_never_shared_is_dropped_from_training_not_failed() -> None:
    sim = Simulation(secure(), Recorder({("shares", "client-01"): EXIT_BAD_DATA}))
    status = sim.run(80)
    counts = status.rounds[0].counts
    assert counts is not None and counts.dropped == 1 and counts.succeeded == 3


@pytest.mark.parametrize("kind", ["keys", "shares", "train", "unmask"])
def test_below_the_threshold_the_round_fails_with_a_named_reason(kind: str) -> None:
    fail = {(kind, "client-01"): EXIT_BAD_DATA, (kind, "client-02"): EXIT_BAD_DATA}
    sim = Simulation(secure(threshold=3, min_successful=1), Recorder(fail))  # the threshold, not the quorum, fails
    status = sim.run(80)
    assert status.phase == "Failed"
    assert status.reason == Reason.SECURE_THRESHOLD, status.message
    assert "secure aggregation: 2 of 4" in status.message and "threshold 3" in status.message


def test_down_to_the_threshold_the_round_completes() -> None:
    sim = Simulation(secure(threshold=2), Recorder({("train", "client-01"): EXIT_BAD_DATA,
                                                    ("keys", "client-02"): EXIT_BAD_DATA}))
    assert sim.run(80).phase == "Succeeded", sim.events


def test_the_quorum_holds_as_well_as_the_threshold() -> None:
    the_spec = spec(clients={"count": 4}, privacy={"clipNorm": 5.0, "secureAggregation": {"threshold": 2}})
    sim = Simulation(the_spec, Recorder({("keys", "client-02"): EXIT_BAD_DATA}))
    status = sim.run(80)
    assert status.phase == "Failed" and status.reason == Reason.QUORUM_MISSED, status.message


def test_a_failed_unmasking_retries_the_round_with_new_keys_and_new_task_ids() -> None:
    attempts: list[int] = []

    def outcome(task: Task, now: float) -> Observation | None:
        if task.kind == "aggregate" and task.round == 1 and task.round_attempt == 1:
            return Observation("failed", EXIT_SECURE_ROUND, reason="3 of 4 clients' shares, threshold 4")
        attempts.append(task.round_attempt)
        return ok(task, now)

    sim = Simulation(secure(stragglers={"onMissedQuorum": "retry"}), outcome)
    status = sim.run(120)
    assert status.phase == "Succeeded", sim.events
    assert any("RoundRetried" in e and "secure aggregation could not recover the sum" in e for e in sim.events)
    first = [i for i in sim.launched if i.startswith("k0001-client-00")]
    assert first == ["k0001-client-00-a1", "k0001-client-00-a2"], "a retried round advertises new keys"
    assert 2 in attempts
    assert len(sim.launched) == len(set(sim.launched))


def test_a_straggler_at_a_stage_is_dropped_at_the_deadline() -> None:
    def outcome(task: Task, now: float) -> Observation | None:
        if task.kind == "shares" and task.client == "client-03" and task.round == 1:
            return None  # never answers
        return ok(task, now)

    sim = Simulation(secure(), outcome)
    for _ in range(20):
        sim.tick()
    sim.tick(200)  # past roundDeadlineSeconds
    status = sim.run(80)
    assert status.phase == "Succeeded", sim.events
    assert "s0001-client-03-a1" in sim.cancelled
    assert any("while sharing secrets" in e for e in sim.events)


def test_resuming_from_the_serialised_status_at_every_step_of_a_secure_round() -> None:
    plain = Simulation(secure())
    plain.run(80)
    reloaded = Simulation(secure(), reload=True)
    status = reloaded.run(80)
    assert status.phase == "Succeeded"
    assert reloaded.launched == plain.launched, "a restarted coordinator neither repeats nor skips a stage"


def test_the_secure_status_round_trips() -> None:
    sim = Simulation(secure(), lambda task, now: None if task.kind == "train" else ok(task, now))
    for _ in range(10):
        sim.tick()
    data = sim.status.to_json()
    current = data["rounds"][0]
    assert current["secure"]["stage"] == "train"
    assert current["secure"]["shared"] == ["client-00", "client-01", "client-02", "client-03"]
    assert TrainingStatus.model_validate(data).to_json() == data
