"""A training with many clients keeps a small status (etcd and kubectl carry it whole on every read).

The aggregation's results go through the worker's termination message, as on Kubernetes, where a
Pod keeps at most 4 KiB of it.
"""

from __future__ import annotations

import json

import pytest

from fedtrain.engine import Observation, TrainingStatus, decide, select_clients
from fedtrain.engine.engine import compact_history
from fedtrain.engine.status import DETAILED_CLIENTS, LISTED, Launch, RoundStatus
from fedtrain.spec import FederatedTrainingSpec, parse_spec
from fedtrain.worker.jobs import TERMINATION_MESSAGE_LIMIT, termination_message

STATUS_LIMIT = 256 * 1024


def run(per_round: int, rounds: int, failing: set[str]) -> tuple[FederatedTrainingSpec, TrainingStatus, int]:
    """Decide a 1,000-client training to the end, every task answered at once; the largest status seen."""
    spec = parse_spec({"rounds": rounds, "clients": {"list": [{"name": f"city-{i:04d}-road-operator-{i:012d}"}
                                                             for i in range(1000)],
                                                    "perRound": per_round, "minSuccessful": per_round // 2,
                                                    "maxRetries": 0}})
    status, observations, largest, now = TrainingStatus(), dict[str, Observation](), 0, 0.0
    while status.phase not in ("Succeeded", "Failed"):
        now += 1
        decision = decide(spec, status, observations, now)
        for action in decision.actions:
            if not isinstance(action, Launch):
                continue
            task = action.task
            if task.kind == "aggregate":
                trained = [c for c in decision.status.rounds[-1].selected if c not in failing]
                rejected = trained[:len(trained) // 3]
                result = {"round": task.round, "accuracy": 0.5, "loss": 1.0, "accepted": trained[len(rejected):],
                          "rejected": {c: "update norm 1e9 is over 10x the median" for c in rejected}}
                message = termination_message(result)  # what the aggregation Pod leaves: at most 4 KiB
                assert len(message.encode()) <= TERMINATION_MESSAGE_LIMIT
                observations[task.id] = Observation("succeeded", 0, json.loads(message))
            else:
                failed = task.client in failing
                observations[task.id] = Observation("failed" if failed else "succeeded", 1 if failed else 0,
                                                    None, "Traceback: " + "x" * 300 if failed else None)
        status = decision.status
        largest = max(largest, len(json.dumps(status.to_json())))
    return spec, status, largest


@pytest.mark.parametrize("per_round", [100, 1000])
def test_a_thousand_clients_keep_the_status_under_256_kib(per_round: int) -> None:
    failing = {f"city-{i:04d}-road-operator-{i:012d}" for i in range(0, 1000, 7)}
    spec, status, largest = run(per_round, rounds=12, failing=failing)
    assert status.phase == "Succeeded"
    assert largest < STATUS_LIMIT, largest
    old, last = status.rounds[0], status.rounds[-1]
    assert old.counts is not None and old.counts.selected == per_round and old.selected == []
    assert old.counts.failed == len(failing & set(select_clients(spec, 1))) > LISTED
    assert len(old.clients) == LISTED and all(t.state == "failed" for t in old.clients.values())
    trained = per_round - len(failing & set(select_clients(spec, 12)))
    assert last.counts is not None and last.counts.rejected == trained // 3
    assert last.counts.accepted == trained - trained // 3 and last.counts.failed == per_round - trained
    if per_round <= DETAILED_CLIENTS:  # the last round keeps every client while it fits
        assert len(last.selected) == per_round and len(last.rejected) == trained // 3
    else:
        assert last.selected == [] and len(last.rejected) == LISTED


def test_small_trainings_keep_every_client_of_their_recent_rounds() -> None:
    rounds = [RoundStatus(round=n, selected=["a", "b"], finished_at=float(n), accepted=["a", "b"]) for n in
              range(1, 60)]
    compact_history(rounds)
    detailed = [r.round for r in rounds if r.selected]
    assert detailed == list(range(10, 60))  # the newest rounds, 2 clients each, up to DETAILED_CLIENTS
    assert all(r.counts is not None and r.counts.accepted == 2 for r in rounds)


def test_a_thousand_clients_missing_the_quorum_keep_the_status_small() -> None:
    everyone = {f"city-{i:04d}-road-operator-{i:012d}" for i in range(1000)}
    _, status, largest = run(1000, rounds=2, failing=everyone)
    assert status.phase == "Failed" and status.reason == "QuorumMissed"
    assert "and 990 more" in status.message and len(status.message) < 5000
    assert largest < STATUS_LIMIT, largest
