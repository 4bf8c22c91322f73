"""Round engine transitions, table by table: a simulated executor answers each launched task."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from fedtrain.contract.errors import EXIT_NON_FINITE_MODEL
from fedtrain.engine import Observation, Task, TrainingStatus, decide, select_clients, task_id
from fedtrain.engine.engine import TEMPORARY_RETRIES
from fedtrain.engine.status import Cancel, Decision
from fedtrain.spec import FederatedTrainingSpec, parse_spec

Outcome = Callable[[Task, float], Observation | None]  # None: still running


def spec(**overrides: Any) -> FederatedTrainingSpec:
    data: dict[str, Any] = {"rounds": 2, "clients": {"count": 3}, "roundDeadlineSeconds": 100}
    for key, value in overrides.items():
        data[key] = value
    return parse_spec(data)


def ok(task: Task, now: float) -> Observation:
    output = {"accuracy": 0.1 * task.round, "loss": 1.0 / max(task.round, 1), "accepted": ["client-00"],
              "rejected": {}}
    if task.kind == "finalize":
        output = {"model_uri": "models:/signs/1", "model_version": "1"}
    return Observation("succeeded", 0, output if task.kind in ("aggregate", "finalize") else None)


class Simulation:
    """Feeds the engine's launches back as observations, one decision per tick, like an executor."""

    def __init__(self, the_spec: FederatedTrainingSpec, outcome: Outcome = ok, reload: bool = False) -> None:
        self.spec, self.outcome, self.reload = the_spec, outcome, reload
        self.status = TrainingStatus()
        self.observations: dict[str, Observation] = {}
        self.launched: list[str] = []
        self.cancelled: list[str] = []
        self.events: list[str] = []
        self.now = 1000.0

    def tick(self, seconds: float = 1.0) -> Decision:
        self.now += seconds
        decision = decide(self.spec, self.status, self.observations, self.now)
        for action in decision.actions:
            if isinstance(action, Cancel):
                self.cancelled.append(action.task_id)
                continue
            task = action.task
            if task.id not in self.launched:
                self.launched.append(task.id)
            result = self.outcome(task, self.now)
            self.observations[task.id] = result or Observation("running")
        self.events += [f"{e.reason}: {e.message}" for e in decision.events]
        status = decision.status
        if self.reload:  # as if another process picked it up from the resource's status
            status = TrainingStatus.model_validate(json.loads(json.dumps(status.to_json())))
        self.status = status
        return decision

    def run(self, ticks: int = 50) -> TrainingStatus:
        for _ in range(ticks):
            self.tick()
            if self.status.phase in ("Succeeded", "Failed", "Suspended"):
                break
        return self.status


def condition(status: TrainingStatus, kind: str) -> str:
    return next(c.status for c in status.conditions if c.type == kind)


def test_happy_path_init_rounds_finalize() -> None:
    sim = Simulation(spec())
    status = sim.run()
    assert status.phase == "Succeeded" and status.current_round == 2
    assert sim.launched == ["init-a1", "r0001-client-00-a1", "r0001-client-01-a1", "r0001-client-02-a1",
                            "r0001-aggregate-a1", "r0002-client-00-a1", "r0002-client-01-a1", "r0002-client-02-a1",
                            "r0002-aggregate-a1", "finalize-a1"]
    assert [r.accuracy for r in status.rounds] == [pytest.approx(0.1), pytest.approx(0.2)]
    assert status.best_round == 2 and status.model_version == "1" and status.model_uri == "models:/signs/1"
    assert status.progress == "2/2"
    assert condition(status, "Succeeded") == "True" and condition(status, "Running") == "False"
    assert condition(status, "Degraded") == "False"


def test_resuming_from_the_serialised_status_at_every_step_changes_nothing() -> None:
    straight, reloaded = Simulation(spec(rounds=3)), Simulation(spec(rounds=3), reload=True)
    straight.run()
    reloaded.run()
    assert reloaded.launched == straight.launched
    assert reloaded.status.to_json() == straight.status.to_json()


def test_deciding_twice_on_the_same_observations_asks_for_the_same_tasks() -> None:
    sim = Simulation(spec(), outcome=lambda t, n: None if t.kind == "train" else ok(t, n))
    sim.tick()
    sim.tick()
    first = decide(sim.spec, sim.status, sim.observations, sim.now)
    second = decide(sim.spec, sim.status, sim.observations, sim.now)
    assert first.launches == second.launches and first.status == second.status
    assert sim.status == decide(sim.spec, sim.status, sim.observations, sim.now).status


def failing(clients: dict[str, int], kinds: tuple[str, ...] = ("train",), attempts: int = 99) -> Outcome:
    """Clients (or kinds) that fail with an exit code for their first ``attempts`` attempts."""
    def outcome(task: Task, now: float) -> Observation:
        if task.kind in kinds and (task.client in clients or task.kind != "train") and task.attempt <= attempts:
            code = clients.get(task.client or "", clients.get(task.kind, 70))
            return Observation("failed", code, None, "boom")
        return ok(task, now)
    return outcome


def test_a_crashed_client_is_retried_and_the_round_goes_on() -> None:
    sim = Simulation(spec(), failing({"client-01": 70}, attempts=1))
    status = sim.run()
    assert status.phase == "Succeeded"
    assert "r0001-client-01-a2" in sim.launched
    assert any(e.startswith("ClientRetried: round 1: client-01 retried after exit code 70") for e in sim.events)


def test_bad_input_is_not_retried_but_the_quorum_holds() -> None:
    sim = Simulation(spec(clients={"count": 3, "minSuccessful": 2}), failing({"client-01": 2}))
    status = sim.run()
    assert status.phase == "Succeeded"
    assert "r0001-client-01-a2" not in sim.launched
    assert status.rounds[0].clients["client-01"].state == "failed"
    assert "bad input" in (status.rounds[0].clients["client-01"].reason or "")
    assert condition(status, "Degraded") == "True"


def test_quorum_missed_fails_the_training_with_the_reasons() -> None:
    sim = Simulation(spec(clients={"count": 3, "minSuccessful": 2}), failing({"client-00": 3, "client-01": 2}))
    status = sim.run()
    assert status.phase == "Failed" and status.current_round == 1
    assert "2 of 3 clients failed, 2 must succeed" in status.message and "client-00: exit code 3" in status.message
    assert not any(t.startswith("r0001-aggregate") for t in sim.launched)
    assert condition(status, "Failed") == "True"


def test_quorum_missed_retries_the_round_when_configured() -> None:
    the_spec = spec(clients={"count": 3, "minSuccessful": 3, "maxRetries": 0},
                    stragglers={"onMissedQuorum": "retry", "maxRoundRetries": 1})
    sim = Simulation(the_spec, failing({"client-02": 70}, attempts=1))
    status = sim.run()
    assert status.phase == "Succeeded"
    assert "r0001-client-00-a2" in sim.launched and "r0001-client-02-a2" in sim.launched
    assert status.rounds[0].attempt == 2
    assert any(e.startswith("RoundRetried") for e in sim.events)


def test_round_retries_are_bounded() -> None:
    the_spec = spec(clients={"count": 2, "maxRetries": 0}, stragglers={"onMissedQuorum": "retry",
                                                                        "maxRoundRetries": 2})
    sim = Simulation(the_spec, failing({"client-00": 70}))
    status = sim.run()
    assert status.phase == "Failed" and status.rounds[0].attempt == 3


def test_stragglers_are_dropped_at_the_deadline_when_the_quorum_holds() -> None:
    slow = {"client-02"}
    sim = Simulation(spec(clients={"count": 3, "minSuccessful": 2}),
                     lambda t, n: None if t.client in slow else ok(t, n))
    sim.tick()
    sim.tick()
    assert sim.status.current_round == 1 and sim.status.rounds[0].aggregation is None  # waiting for client-02
    sim.tick(seconds=200)  # past the 100 s deadline
    assert sim.cancelled == ["r0001-client-02-a1"]
    assert sim.status.rounds[0].clients["client-02"].state == "dropped"
    assert any(e.startswith("StragglersDropped") for e in sim.events)
    slow.clear()
    assert sim.run().phase == "Succeeded"


def test_deadline_without_quorum_fails() -> None:
    sim = Simulation(spec(clients={"count": 3, "minSuccessful": 2}),
                     lambda t, n: None if t.client in ("client-01", "client-02") else ok(t, n))
    sim.tick()  # init
    sim.tick()  # round 1 starts
    sim.tick(seconds=200)
    assert sim.status.phase == "Failed" and "deadline of 100s passed with 1 of 2" in sim.status.message
    assert set(sim.cancelled) == {"r0001-client-01-a1", "r0001-client-02-a1"}


def test_rejected_updates_miss_the_quorum() -> None:
    sim = Simulation(spec(), failing({"aggregate": 4}, kinds=("aggregate",)))
    status = sim.run()
    assert status.phase == "Failed" and "aggregation rejected the updates" in status.message
    assert "r0001-aggregate-a2" not in sim.launched


def test_a_non_finite_aggregate_fails_the_round_with_its_reason() -> None:
    sim = Simulation(spec(), failing({"aggregate": EXIT_NON_FINITE_MODEL}, kinds=("aggregate",)))
    status = sim.run()
    assert status.phase == "Failed" and "aggregation refused a non-finite global model" in status.message
    assert next(c.reason for c in status.conditions if c.type == "Failed") == "NonFiniteModel"
    assert "r0001-aggregate-a2" not in sim.launched  # the same updates would give the same aggregate


def test_a_non_finite_aggregate_retries_the_round_under_the_straggler_rules() -> None:
    the_spec = spec(stragglers={"onMissedQuorum": "retry", "maxRoundRetries": 1})
    sim = Simulation(the_spec, failing({"aggregate": EXIT_NON_FINITE_MODEL}, kinds=("aggregate",), attempts=1))
    status = sim.run()
    assert status.phase == "Succeeded" and status.rounds[0].attempt == 2
    assert "r0001-aggregate-a2" in sim.launched  # the retried round's aggregation under a new id
    assert any(e.startswith("RoundRetried: round 1 retried (attempt 2): aggregation refused a non-finite")
               for e in sim.events)


@pytest.mark.parametrize(("kind", "code", "phase_reason"), [
    ("init", 3, "BadData"), ("init", 2, "BadInput"), ("finalize", 70, "TaskFailed"),
])
def test_failed_init_or_finalize(kind: str, code: int, phase_reason: str) -> None:
    sim = Simulation(spec(clients={"count": 2, "maxRetries": 1}), failing({kind: code}, kinds=(kind,)))
    status = sim.run()
    assert status.phase == "Failed" and status.message.startswith(f"{kind} failed: exit code {code}")
    assert any(e.startswith(phase_reason) for e in sim.events)
    assert (f"{kind}-a2" in sim.launched) == (code == 70)  # only internal errors are retried
    assert any(e.startswith("TaskRetried") for e in sim.events) == (code == 70)


def test_suspend_stops_between_rounds_and_resume_continues() -> None:
    sim = Simulation(spec(rounds=3))
    sim.run(ticks=3)  # init, round 1 clients, round 1 aggregation launched
    sim.spec = spec(rounds=3, suspend=True)
    status = sim.run()
    assert status.phase == "Suspended" and status.current_round == 1 and status.progress == "1/3"
    assert condition(status, "Suspended") == "True"
    before = list(sim.launched)
    sim.tick()
    assert sim.launched == before  # nothing new while suspended
    sim.spec = spec(rounds=3, suspend=False)
    assert sim.run().phase == "Succeeded" and sim.status.current_round == 3
    assert any(e.startswith("Resumed: resumed from round 1") for e in sim.events)


def test_a_training_created_suspended_starts_nothing_until_resumed() -> None:
    sim = Simulation(spec(suspend=True))
    status = sim.run()
    assert status.phase == "Suspended" and sim.launched == [] and "before it started" in status.message
    sim.spec = spec(suspend=False)
    assert sim.run().phase == "Succeeded"
    assert sim.launched[0] == "init-a1"


def test_per_round_sampling_is_seeded_and_sized() -> None:
    the_spec = spec(rounds=5, clients={"count": 10, "perRound": 4})
    chosen = [select_clients(the_spec, r) for r in range(1, 6)]
    assert all(len(c) == 4 for c in chosen)
    assert chosen == [select_clients(the_spec, r) for r in range(1, 6)]
    assert len({tuple(c) for c in chosen}) > 1
    status = Simulation(the_spec).run()
    assert [r.selected for r in status.rounds] == chosen


def test_condition_times_change_only_with_their_status() -> None:
    sim = Simulation(spec(rounds=3), lambda t, n: None if t.kind == "aggregate" else ok(t, n))
    sim.tick()
    first = {c.type: c.last_transition_time for c in sim.status.conditions}
    sim.tick(seconds=30)
    second = {c.type: c.last_transition_time for c in sim.status.conditions}
    assert first == second


def test_task_ids_are_deterministic() -> None:
    assert task_id("train", 2, 3, "client-01") == "r0003-client-01-a2"
    assert task_id("aggregate", 1, 12) == "r0012-aggregate-a1"
    assert task_id("init", 1) == "init-a1"


def test_a_failure_without_an_exit_code_is_described_by_the_executors_reason_alone() -> None:
    from fedtrain.engine.engine import describe_failure

    pull = Observation("failed", None, None, "ImagePullBackOff: Back-off pulling image fedtrain/wrokre")
    assert describe_failure(pull) == "ImagePullBackOff: Back-off pulling image fedtrain/wrokre"
    assert describe_failure(Observation("failed")) == "failed"
    assert describe_failure(Observation("failed", 1, None, "Traceback")) == "exit code 1 (failed): Traceback"


def test_image_pull_errors_are_not_retried_and_name_the_failed_reason() -> None:
    from fedtrain.engine.engine import cause
    from fedtrain.engine.status import ClientTask

    assert cause(ClientTask(exit_code=2)) == "BadInput"
    assert cause(ClientTask(exit_code=137, reason="exit code 137 (failed): OOMKilled")) == "OOMKilled"
    assert cause(ClientTask(reason="ImagePullBackOff: Back-off pulling image")) == "ImagePullBackOff"
    assert cause(ClientTask(exit_code=1, reason="exit code 1 (failed): Traceback")) is None
    def pull_error(task: Task, now: float) -> Observation:
        if task.kind == "train" and task.client != "client-00":
            return Observation("failed", None, None, "ErrImagePull: pull access denied for fedtrain/wrokre")
        return ok(task, now)

    sim = Simulation(spec(clients={"count": 3, "minSuccessful": 2, "maxRetries": 3}), pull_error)
    status = sim.run()
    assert status.phase == "Failed"
    assert not [t for t in sim.launched if t.endswith("-a2")]  # a wrong image stays wrong: no retry
    assert condition_reason(status, "Failed") == "ErrImagePull"
    assert "pull access denied" in status.message


def test_a_pod_waiting_for_resources_shows_in_degraded() -> None:
    def unschedulable(task: Task, now: float) -> Observation | None:
        if task.kind == "train" and task.client == "client-01":
            return Observation("running", None, None, "Unschedulable: 0/3 nodes are available: Insufficient cpu")
        return ok(task, now)

    sim = Simulation(spec(), unschedulable)
    sim.run(ticks=5)
    degraded = next(c for c in sim.status.conditions if c.type == "Degraded")
    assert degraded.status == "True" and degraded.reason == "TasksWaiting"
    assert "client-01: Unschedulable" in degraded.message


def condition_reason(status: TrainingStatus, kind: str) -> str:
    return next(c.reason for c in status.conditions if c.type == kind)


def test_temporary_storage_failures_are_retried_without_spending_max_retries() -> None:
    sim = Simulation(spec(clients={"count": 3, "minSuccessful": 3, "maxRetries": 0}),
                     failing({"client-01": 75}, attempts=TEMPORARY_RETRIES))
    status = sim.run()
    assert status.phase == "Succeeded"  # maxRetries 0: any other failure would have ended the round
    assert [t for t in sim.launched if t.startswith("r0001-client-01")] == [
        f"r0001-client-01-a{n}" for n in range(1, TEMPORARY_RETRIES + 2)]
    assert status.rounds[0].clients["client-01"].temporary_failures == TEMPORARY_RETRIES
    assert any(e.startswith("ClientRetried: round 1: client-01 retried after exit code 75 (temporary storage "
                            "failure)") for e in sim.events)


@pytest.mark.parametrize("max_retries", [0, 1])
def test_past_the_bound_a_temporary_failure_counts_like_any_other(max_retries: int) -> None:
    sim = Simulation(spec(clients={"count": 3, "minSuccessful": 3, "maxRetries": max_retries}),
                     failing({"client-01": 75}))
    status = sim.run()
    assert status.phase == "Failed" and "exit code 75 (temporary storage failure)" in status.message
    last = TEMPORARY_RETRIES + 1 + max_retries  # the free attempts, the first, then maxRetries ordinary retries
    assert [t for t in sim.launched if t.startswith("r0001-client-01")] == [
        f"r0001-client-01-a{n}" for n in range(1, last + 1)]


def test_an_aggregation_whose_store_was_down_runs_again_and_the_round_completes() -> None:
    sim = Simulation(spec(clients={"count": 3, "maxRetries": 0}),
                     failing({"aggregate": 75}, kinds=("aggregate",), attempts=2))
    status = sim.run()
    assert status.phase == "Succeeded" and status.rounds[0].rejected == {}
    assert "r0001-aggregate-a3" in sim.launched and "r0001-aggregate-a4" not in sim.launched
    resumed = TrainingStatus.model_validate(json.loads(json.dumps(status.to_json())))  # kept in the status
    assert resumed.rounds[0].aggregation is not None and resumed.rounds[0].aggregation.temporary_failures == 2


def test_an_update_weighted_below_its_claim_is_named_in_a_warning_event() -> None:
    reason = "claims 1000000 examples; weighted as 700 (10 x the round's median 70, clients.maxWeightOverMedian)"

    def capping(task: Task, now: float) -> Observation:
        found = ok(task, now)
        if task.kind != "aggregate" or found.output is None:
            return found
        return Observation("succeeded", 0, {**found.output, "capped": {"client-02": reason}})

    sim = Simulation(spec(rounds=1), capping)
    assert sim.run().phase == "Succeeded"
    assert sim.events.count(f"UpdatesCapped: round 1: client-02: {reason}") == 1
