"""Failures found outside the rounds go through the engine; a finished training never changes again."""

from __future__ import annotations

import pytest

from fedtrain.engine import Observation, TrainingStatus, decide, fail
from fedtrain.engine.status import Cancel, Launch, Reason
from fedtrain.spec import parse_spec

SPEC = parse_spec({"rounds": 2, "clients": {"count": 2}})


def running_round_one() -> TrainingStatus:
    """A status whose round 1 is training, reached by deciding as an executor would."""
    status = decide(SPEC, TrainingStatus(), {}, 10.0).status
    status = decide(SPEC, status, {"init-a1": Observation("succeeded", 0)}, 11.0).status
    assert status.phase == "Running" and status.current_round == 1
    return status


def test_failing_a_running_training_cancels_its_tasks_and_says_why() -> None:
    status = running_round_one()
    decision = fail(status, Reason.FORBIDDEN, "the API server refused POST /jobs", 20.0, generation=3)
    failed = decision.status
    assert failed.phase == "Failed" and failed.reason == "Forbidden" and failed.observed_generation == 3
    assert decision.actions == [Cancel("r0001-client-00-a1"), Cancel("r0001-client-01-a1")]
    assert [(e.reason, e.warning) for e in decision.events] == [("Forbidden", True)]
    conditions = {c.type: (c.status, c.reason) for c in failed.conditions}
    assert conditions["Failed"] == ("True", "Forbidden") and conditions["Running"][0] == "False"
    assert status.phase == "Running"  # the input is not modified


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_training_is_final(phase: str) -> None:
    final = running_round_one()
    final.phase, final.reason = phase, None if phase == "Succeeded" else "QuorumMissed"
    assert fail(final, Reason.INVALID_SPEC, "spec.storage: ...", 30.0, generation=9).status == final
    later = decide(parse_spec({"rounds": 5, "clients": {"count": 4}}), final,
                   {"r0001-client-00-a1": Observation("failed", 1)}, 30.0, generation=9)
    assert later.status == final and later.actions == [] and later.events == []


def test_the_printed_accuracy_has_four_significant_digits() -> None:
    status = running_round_one()
    trained = {f"r0001-client-0{i}-a1": Observation("succeeded", 0) for i in range(2)}
    aggregated = decide(SPEC, status, trained, 12.0)
    assert [a.task.kind for a in aggregated.actions if isinstance(a, Launch)] == ["aggregate"]
    output = {"accuracy": 0.07751937984496124, "loss": 3.7, "accepted": ["client-00", "client-01"],
              "epsilon": 12.345678}
    done = decide(SPEC, aggregated.status, {**trained, "r0001-aggregate-a1": Observation("succeeded", 0, {
        **output, "dp_delta": 1e-5})}, 13.0).status
    assert done.accuracy == 0.07752 and done.privacy_epsilon == 12.35
    assert done.rounds[0].accuracy == 0.07751937984496124  # the record keeps full precision


def test_deciding_never_changes_the_status_it_was_given() -> None:
    """`decide` copies only what it changes in place (TrainingStatus.fork): check every pass of a busy training.

    150 clients (so rounds are compacted), failures retried, a round whose quorum is missed and retried.
    """
    spec = parse_spec({"rounds": 4, "clients": {"count": 150, "minSuccessful": 140, "maxRetries": 1},
                       "stragglers": {"onMissedQuorum": "retry", "maxRoundRetries": 2}})
    status, observations, now = TrainingStatus(), dict[str, Observation](), 0.0
    while status.phase not in ("Succeeded", "Failed") and now < 500:
        now += 1
        before = status.model_copy(deep=True)
        decision = decide(spec, status, observations, now)
        assert status == before
        for action in decision.actions:
            if isinstance(action, Launch):
                task = action.task
                broken = task.client is not None and task.client.endswith(("3", "7")) and task.round == 2 \
                    and task.attempt < 3  # round 2 misses its quorum once
                flaky = task.client is not None and task.client.endswith("5") and task.attempt == 1
                output = {"accuracy": 0.5, "accepted": [], "rejected": {}} if task.kind == "aggregate" else None
                observations[task.id] = Observation("failed", 1, None, "crash") if broken or flaky \
                    else Observation("succeeded", 0, output)
        status = decision.status
    assert status.phase == "Succeeded"
    assert status.rounds[1].attempt == 2  # the retried round
    assert status.rounds[0].counts is not None and status.rounds[0].selected == []  # compacted
