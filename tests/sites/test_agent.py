"""The site's decisions: which posted task it runs, refuses, leaves or stops, and what it reports."""

from __future__ import annotations

import json

import pytest

from fedtrain.contract.errors import EXIT_REFUSED
from fedtrain.contract.sitetask import Posting, SiteResult, parse_task
from fedtrain.sites import agent
from fedtrain.sites.participation import ParticipationStatus
from fedtrain.worker.strategies.privacy import epsilon
from tests.sites.documents import DEADLINE, participation, private, secure, site_task

POLICY = participation(policy={"strategies": ["fedavg"]}).policy
BEFORE = DEADLINE - 60


def decide(posting: Posting | None, now: float = BEFORE, answered: bool = False, running: str | None = None,
           suspended: bool = False) -> agent.SiteAction:
    return agent.plan(posting, "munich", POLICY, now, answered, running, suspended)


def test_an_accepted_task_runs() -> None:
    task = site_task()
    assert decide(Posting("Running", task)) == agent.Run(task)


def test_nothing_posted_is_idle() -> None:
    assert isinstance(decide(None), agent.Idle)
    assert isinstance(decide(Posting("Running", None)), agent.Idle)


def test_an_answered_task_is_never_run_again() -> None:
    action = decide(Posting("Running", site_task()), answered=True)
    assert isinstance(action, agent.Idle)
    assert not action.finished


def test_a_task_past_its_deadline_is_not_started() -> None:
    action = decide(Posting("Running", site_task()), now=DEADLINE + 1)
    assert isinstance(action, agent.Idle)
    assert "deadline" in action.why


def test_a_task_for_another_site_is_refused() -> None:
    task = site_task(site="hamburg", id="r0003-hamburg-a1")
    action = decide(Posting("Running", task))
    assert isinstance(action, agent.Refuse)
    assert "hamburg" in action.reason and "munich" in action.reason


def test_a_task_outside_the_policy_is_refused_naming_the_field() -> None:
    action = decide(Posting("Running", site_task(strategy="krum")))
    assert isinstance(action, agent.Refuse)
    assert "spec.policy.strategies" in action.reason


def test_a_running_task_goes_on_while_posted() -> None:
    task = site_task()
    assert decide(Posting("Running", task), running=task.id) == agent.Wait(task.id)


def test_a_withdrawn_task_is_cancelled() -> None:
    assert isinstance(decide(Posting("Running", None), running="r0003-munich-a1"), agent.Cancel)
    other = site_task(id="r0004-munich-a1", round=4)
    assert decide(Posting("Running", other), running="r0003-munich-a1") == agent.Cancel(
        "r0003-munich-a1", "the coordinator withdrew the task")


def test_a_finished_training_stops_the_site() -> None:
    action = decide(Posting("Succeeded", None))
    assert isinstance(action, agent.Idle)
    assert action.finished
    assert isinstance(decide(Posting("Failed", site_task()), running="r0003-munich-a1"), agent.Cancel)


def test_a_deleted_training_cancels_the_running_task_and_shows_why() -> None:
    task = site_task()
    running = agent.next_status(ParticipationStatus(), Posting("Running", task), agent.Run(task), now=100.0)
    deleted = Posting("Deleted", None, "the coordinator deleted the training")
    action = decide(deleted, running=task.id)
    assert action == agent.Cancel(task.id, "the training is Deleted")
    status = agent.next_status(running, deleted, action, now=200.0)
    conditions = {c.type: c for c in status.conditions}
    assert (status.phase, conditions["Ended"].status, conditions["Ended"].reason) == (
        "Deleted", "True", "TrainingDeleted")
    assert conditions["Participating"].status == "False"
    idle = decide(deleted)
    assert isinstance(idle, agent.Idle) and idle.finished
    assert agent.next_status(status, deleted, idle, now=300.0).phase == "Deleted"


def test_a_withdrawn_task_shows_in_the_status_until_the_next_one_runs() -> None:
    task = site_task()
    running = agent.next_status(ParticipationStatus(), Posting("Running", task), agent.Run(task), now=100.0)
    withdrawn = agent.next_status(running, Posting("Running", None), decide(Posting("Running", None), running=task.id),
                                  now=200.0)
    conditions = {c.type: c for c in withdrawn.conditions}
    assert (withdrawn.phase, conditions["Participating"].reason) == ("Withdrawn", "Withdrawn")
    assert conditions["Ended"].status == "False"
    assert "cancelled task r0003-munich-a1" in withdrawn.message
    later = agent.next_status(withdrawn, Posting("Running", None), decide(Posting("Running", None)), now=300.0)
    assert later.phase == "Withdrawn"


def test_a_posting_that_vanished_after_the_site_read_one_is_the_end() -> None:
    assert agent.vanished(None, ParticipationStatus()) is None  # nothing posted yet: wait
    seen = ParticipationStatus(training_phase="Running")
    posting = agent.vanished(None, seen)
    assert posting is not None and posting.phase == "Deleted"
    assert isinstance(decide(posting, running="r0003-munich-a1"), agent.Cancel)
    kept = Posting("Running", None)
    assert agent.vanished(kept, seen) is kept


def test_a_suspended_site_takes_no_new_task() -> None:
    assert isinstance(decide(Posting("Running", site_task()), suspended=True), agent.Idle)


def test_failure_reasons_never_show_the_site_paths() -> None:
    reason = "cannot read /srv/sites/munich/gtsrb/Final_Training/Images/00001/GT-00001.csv (in /srv/sites/munich)"
    result = agent.failure_result(site_task(), "munich", 3, reason, ["/srv/sites/munich/gtsrb/", "/srv/sites/munich"])
    assert result.state == "failed"
    assert result.exit_code == 3
    assert result.reason is not None
    assert "/srv" not in result.reason
    assert result.reason == "cannot read <site data> (in <site data>)"  # no file name tells what the site holds


@pytest.mark.parametrize(("reason", "redacted"), [
    ("cannot decode 00000_00001.ppm in Images/00007", "cannot decode <site data> in <site data>"),
    ("cache /tmp/fedtrain/decoded/own-munich.npz is corrupt", "cache <site data> is corrupt"),
    ("no labels: GT-final_test.csv", "no labels: <site data>"),
    ("torch.cuda.OutOfMemoryError: 2.5 GiB; exit 3", "torch.cuda.OutOfMemoryError: 2.5 GiB; exit 3"),
])
def test_redaction_leaves_no_path_or_file_name(reason: str, redacted: str) -> None:
    assert agent.redact(reason, []) == redacted


def test_a_refusal_is_a_failure_with_exit_77() -> None:
    result = agent.refusal_result(site_task(), "munich", "strategy krum is not accepted")
    assert (result.state, result.exit_code, result.task) == ("failed", EXIT_REFUSED, "r0003-munich-a1")
    assert result.reason is not None and "strategy krum" in result.reason


def test_worker_arguments_carry_the_task_with_its_digest() -> None:
    task = site_task()
    spec = participation(evaluation={"split": "validation"}, validationFraction=0.2)
    args = agent.worker_arguments(task, spec, "/store", "/data")
    assert args[0] == "site-task"
    assert parse_task(json.loads(args[args.index("--task-json") + 1])) == task
    assert args[args.index("--evaluation-split") + 1] == "validation"
    assert args[args.index("--validation-fraction") + 1] == "0.2"
    assert args[args.index("--data") + 1] == "/data"


def test_a_secure_task_names_the_sites_secret_and_a_plain_one_does_not() -> None:
    spec = participation()
    keys = site_task(id="k0003-munich-a1", kind="keys", train=None, secure=secure())
    made = agent.worker_arguments(keys, spec, "/store", "/data", agent.SecretFile("/site/secure.key"))
    assert made[made.index("--secret-file") + 1] == "/site/secure.key" and "--secret-provided" not in made
    given = agent.worker_arguments(keys, spec, "/store", "/data", agent.SecretFile("/var/run/key", provided=True))
    assert given[-3:] == ["--secret-file", "/var/run/key", "--secret-provided"]
    assert "--secret-file" not in agent.worker_arguments(site_task(), spec, "/store", "/data",
                                                         agent.SecretFile("/site/secure.key"))


def test_secure_stages_show_as_training_and_a_masked_round_counts_without_examples() -> None:
    keys = site_task(id="k0003-munich-a1", kind="keys", train=None, secure=secure())
    status = agent.next_status(ParticipationStatus(), Posting("Running", keys), agent.Run(keys), now=100.0)
    assert status.phase == "Training"
    status = agent.next_status(status, Posting("Running", keys), agent.Idle("answered"),
                               (keys, SiteResult(keys.id, "munich", "succeeded")), now=101.0)
    assert (status.phase, status.rounds_done) == ("Waiting", 0)
    assert status.message == "advertised its keys for round 3 (secure aggregation)"
    train = site_task(secure=secure())
    done = SiteResult(train.id, "munich", "succeeded", output={"metrics": {"val_accuracy": 0.5}, "length": 9})
    status = agent.next_status(status, Posting("Running", train), agent.Idle("answered"), (train, done), now=102.0)
    assert (status.rounds_done, status.last_accuracy, status.message) == (1, 0.5, "trained round 3 (masked)")


def test_status_counts_trained_rounds_and_their_accuracy() -> None:
    task = site_task(privacy=private())
    posting = Posting("Running", task)
    status = agent.next_status(ParticipationStatus(), posting, agent.Run(task), now=100.0)
    assert (status.phase, status.last_task, status.training_phase) == ("Training", task.id, "Running")
    done = SiteResult(task.id, "munich", "succeeded",
                      output={"num_examples": 40, "metrics": {"val_accuracy": 0.25}, "sha256": "cd" * 32})
    status = agent.next_status(status, posting, agent.Idle("answered"), (task, done), now=200.0)
    assert status.phase == "Waiting"
    assert status.rounds_done == 1
    assert status.last_accuracy == 0.25
    assert status.epsilon == round(epsilon(0.5, 1.0, task.round, 1e-5), 6)


def test_status_shows_a_refusal_and_the_evaluation_accuracy() -> None:
    refused = site_task(strategy="krum")
    status = agent.next_status(ParticipationStatus(), Posting("Running", refused),
                               agent.Refuse(refused, "strategy krum is not accepted"), now=100.0)
    assert status.phase == "Refused"
    assert status.last_refusal == "strategy krum is not accepted"
    assert {c.type: c.status for c in status.conditions}["Refused"] == "True"
    evaluate = site_task(id="e0003-munich-a1", kind="evaluate", train=None)
    scored = SiteResult(evaluate.id, "munich", "succeeded", output={"examples": 20, "accuracy": 0.5, "loss": 1.2})
    status = agent.next_status(status, Posting("Running", evaluate), agent.Idle("answered"), (evaluate, scored),
                               now=200.0)
    assert (status.phase, status.last_accuracy, status.rounds_done) == ("Waiting", 0.5, 0)
    conditions = {c.type: c for c in status.conditions}
    assert conditions["Refused"].status == "False"
    assert conditions["Refused"].last_transition_time == "1970-01-01T00:03:20Z"  # changed at 200 s


def test_condition_times_move_only_when_the_status_does() -> None:
    task = site_task()
    first = agent.next_status(ParticipationStatus(), Posting("Running", task), agent.Run(task), now=100.0)
    later = agent.next_status(first, Posting("Running", task), agent.Wait(task.id), now=500.0)
    assert later.conditions == first.conditions


def test_the_end_of_the_training_completes_the_site() -> None:
    status = agent.next_status(ParticipationStatus(), Posting("Succeeded", None, "3 rounds"),
                               agent.Idle("the training is Succeeded", finished=True), now=1.0)
    assert status.phase == "Completed"
    assert {c.type: c.status for c in status.conditions}["Completed"] == "True"
