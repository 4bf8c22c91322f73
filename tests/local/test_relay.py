"""The coordinator's relay: postings follow the stored status, answers become engine observations."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fedtrain.contract.errors import EXIT_BAD_DATA, EXIT_REFUSED, TemporaryStorageError
from fedtrain.contract.layout import Layout
from fedtrain.contract.sitetask import (
    PROTOCOL_VERSION,
    REASON_KEPT,
    REASON_LIMIT,
    SiteResult,
    encode,
    parse_posting,
    parse_scores_record,
)
from fedtrain.contract.storage import DirectoryStore
from fedtrain.engine import decide
from fedtrain.engine.status import Observation, TrainingStatus
from fedtrain.sites.relay import SiteRelay
from fedtrain.spec import FederatedTrainingSpec, parse_spec
from fedtrain.worker.weights import save_weights


def spec(rounds: int = 2, **clients: object) -> FederatedTrainingSpec:
    return parse_spec({"rounds": rounds, "seed": 4, "roundDeadlineSeconds": 60,
                       "clients": {"list": [{"name": "hq"}, {"name": "munich", "site": {},
                                                               "training": {"localEpochs": 3}}], **clients},
                       "strategy": {"name": "fedprox", "parameters": {"mu": 0.1}},
                       "privacy": {"clipNorm": 2.0, "noiseMultiplier": 0.5}})


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    found = DirectoryStore(tmp_path / "training")
    save_weights(found, Layout().global_weights(0), {"w": np.zeros(3, np.float32)}, {"round": 0})
    return found


def round_one(the_spec: FederatedTrainingSpec) -> TrainingStatus:
    """The status once init succeeded and round 1's clients were launched."""
    first = decide(the_spec, TrainingStatus(), {}, 100.0).status
    return decide(the_spec, first, {"init-a1": Observation("succeeded", 0)}, 101.0).status


def test_a_site_gets_its_task_with_its_settings_and_the_model_checksum(store: DirectoryStore) -> None:
    the_spec = spec()
    relay = SiteRelay(store, the_spec, "team-signs/signs")
    status = round_one(the_spec)
    assert relay.observe(status) == {}  # nothing posted yet: the engine asks for the task again
    relay.publish(status)
    posting = parse_posting(store.read_bytes("sites/munich/task.json"))
    task = posting.task
    assert posting.phase == "Running" and task is not None
    assert (task.id, task.kind, task.round, task.global_key) == ("r0001-munich-a1", "train", 1,
                                                                 "round-0000/global.safetensors")
    sidecar = json.loads(store.read_bytes("round-0000/global.json"))
    assert task.global_sha256 == sidecar["sha256"]
    assert task.train is not None and (task.train.epochs, task.train.mu, task.train.clip_norm) == (3, 0.1, 2.0)
    assert task.privacy is not None and task.privacy.sampling_rate == 1.0
    assert task.deadline == 101.0 + 60 and task.strategy == "fedprox" and task.seed == 4
    assert relay.observe(status) == {"r0001-munich-a1": Observation("running")}


def test_answers_become_observations(store: DirectoryStore) -> None:
    the_spec = spec()
    relay = SiteRelay(store, the_spec, "team-signs/signs")
    status = round_one(the_spec)
    relay.publish(status)
    key = Layout().site_result("munich", "r0001-munich-a1")
    store.write_bytes(key, encode(SiteResult("r0001-munich-a1", "munich", "failed", EXIT_REFUSED, "no fedprox")))
    assert relay.observe(status)["r0001-munich-a1"] == Observation("failed", EXIT_REFUSED, None, "no fedprox")
    output = {"num_examples": 5, "metrics": {"train_loss": 0.5}, "sha256": "a" * 64}
    store.write_bytes(key, encode(SiteResult("r0001-munich-a1", "munich", "succeeded", 0, None, output)))
    assert relay.observe(status)["r0001-munich-a1"] == Observation("succeeded", 0, output)
    store.write_bytes(key, b"{not json")
    seen = relay.observe(status)["r0001-munich-a1"]
    assert seen.state == "failed" and seen.exit_code == EXIT_BAD_DATA and "answer was refused" in (seen.reason or "")


def test_a_new_relay_posts_the_same_task_again_and_withdraws_it_when_the_round_moves_on(
        store: DirectoryStore) -> None:
    the_spec = spec()
    status = round_one(the_spec)
    SiteRelay(store, the_spec, "team-signs/signs").publish(status)
    first = store.read_bytes("sites/munich/task.json")
    again = SiteRelay(store, the_spec, "team-signs/signs")  # a restarted coordinator
    again.publish(status)
    assert store.read_bytes("sites/munich/task.json") == first
    munich = status.round(1).clients["munich"]  # type: ignore[union-attr]
    munich.state = "dropped"
    again.publish(status)
    assert parse_posting(store.read_bytes("sites/munich/task.json")).task is None
    status.phase = "Succeeded"
    again.publish(status)
    assert parse_posting(store.read_bytes("sites/munich/task.json")).phase == "Succeeded"


def test_a_failed_training_tells_the_sites_without_naming_other_clients(store: DirectoryStore) -> None:
    the_spec = spec()
    status = round_one(the_spec)
    relay = SiteRelay(store, the_spec, "team-signs/signs")
    relay.publish(status)
    status.phase, status.reason = "Failed", "QuorumMissed"
    status.message = "round 1 failed: hq failed: cannot read /data/hq/secret-file.csv"
    relay.publish(status)
    posting = parse_posting(store.read_bytes("sites/munich/task.json"))
    assert (posting.phase, posting.task, posting.message) == ("Failed", None, "the training failed (QuorumMissed)")
    assert b"hq" not in store.read_bytes("sites/munich/task.json")


def test_a_deleted_training_tells_every_site_even_from_a_new_process(store: DirectoryStore) -> None:
    the_spec = spec()
    SiteRelay(store, the_spec, "team-signs/signs").publish(round_one(the_spec))
    SiteRelay(store, the_spec, "team-signs/signs").end()  # the operator's finalizer, after a restart
    posting = parse_posting(store.read_bytes("sites/munich/task.json"))
    assert (posting.phase, posting.task) == ("Deleted", None)


# --- a hostile site: whatever it writes under its own keys is one refused answer, never a failed pass -------------

TRAIN_OUTPUT = {"num_examples": 5, "metrics": {"train_loss": 0.5}, "sha256": "a" * 64}
SCORE = {"examples": 40, "accuracy": 0.5, "loss": 1.2}


def answer_bytes(task: str, output: object, **fields: object) -> bytes:
    document = {"task": task, "site": "munich", "state": "succeeded", "exit_code": 0, "reason": None,
                "output": output, "version": PROTOCOL_VERSION, **fields}
    return json.dumps(document).encode()


HOSTILE_TRAINING = [
    pytest.param(answer_bytes("r0001-munich-a1", [1, 2]), "output: Input should be an object", id="output-list"),
    pytest.param(answer_bytes("r0001-munich-a1", {**TRAIN_OUTPUT, "num_examples": 10**9}),
                 "claims 1000000000 examples, more than the 1000000", id="billion-examples"),
    pytest.param(answer_bytes("r0001-munich-a1", {**TRAIN_OUTPUT, "num_examples": "5"}),
                 "num_examples: Input should be a valid integer", id="examples-string"),
    pytest.param(answer_bytes("r0001-munich-a1", {**TRAIN_OUTPUT, "num_examples": True}),
                 "num_examples: Input should be a valid integer", id="examples-bool"),
    pytest.param(answer_bytes("r0001-munich-a1", {**TRAIN_OUTPUT, "metrics": {"loss": float("nan")}}),
                 "metrics.loss: Input should be a finite number", id="metric-nan"),
    pytest.param(answer_bytes("r0001-munich-a1", {**TRAIN_OUTPUT, "sha256": "../../etc"}),
                 "sha256: String should match pattern", id="sha256-pattern"),
    pytest.param(answer_bytes("r0001-munich-a1", TRAIN_OUTPUT, state="done"), "state: Input should be",
                 id="unknown-state"),
    pytest.param(answer_bytes("r0001-munich-a1", TRAIN_OUTPUT, exit_code="0"), "exit_code: Input should be a valid "
                 "integer", id="exit-code-string"),
    pytest.param(answer_bytes("r0001-munich-a1", TRAIN_OUTPUT, surprise=1), "surprise: Extra inputs",
                 id="unknown-field"),
    pytest.param(answer_bytes("r0001-hamburg-a1", TRAIN_OUTPUT), "answers task 'r0001-hamburg-a1'",
                 id="another-task"),
    pytest.param(answer_bytes("r0001-munich-a1", TRAIN_OUTPUT, reason="x" * 100_000), "bytes allowed for it",
                 id="oversized"),
    pytest.param(b"[]", "Input should be an object", id="a-list"),
    pytest.param(b"\xff\xfe", "not a site result", id="not-utf8"),
]


def test_a_sites_failure_reason_is_kept_short(store: DirectoryStore) -> None:
    """A reason up to REASON_LIMIT is a valid answer, but the status keeps REASON_KEPT of it (rounds keep reasons)."""
    the_spec = spec(minSuccessful=1)
    relay = SiteRelay(store, the_spec, "team-signs/signs")
    status = round_one(the_spec)
    relay.publish(status)
    long = answer_bytes("r0001-munich-a1", {}, state="failed", exit_code=1, reason="x" * REASON_LIMIT)
    store.write_bytes(Layout().site_result("munich", "r0001-munich-a1"), long)
    seen = relay.observe(status)["r0001-munich-a1"]
    assert seen.state == "failed" and seen.reason == "x" * REASON_KEPT


def test_a_sites_failure_reason_reaches_the_status_as_text_never_as_control_sequences(store: DirectoryStore) -> None:
    """Escape sequences, a carriage return, NUL and a bidirectional override become U+FFFD; the words stay."""
    the_spec = spec(minSuccessful=1)
    relay = SiteRelay(store, the_spec, "team-signs/signs")
    status = round_one(the_spec)
    relay.publish(status)
    reason = "disk full\x1b[2J\x1b]0;owned\x07\r\x00 at \u202eadmin\n\tretry later: é"
    store.write_bytes(Layout().site_result("munich", "r0001-munich-a1"),
                      answer_bytes("r0001-munich-a1", {}, state="failed", exit_code=1, reason=reason))
    seen = relay.observe(status)["r0001-munich-a1"]
    assert seen.state == "failed"
    assert seen.reason == "disk full\ufffd[2J\ufffd]0;owned\ufffd\ufffd\ufffd at \ufffdadmin\n\tretry later: é"


def test_a_posting_shows_its_phase_and_message_as_bounded_text() -> None:
    """What the coordinator writes for a site to show is text too, and no longer than a reason."""
    posting = parse_posting(json.dumps({"phase": "Failed\x1b[31m", "task": None,
                                        "message": "\x1b[2J" + "m" * 10 * REASON_LIMIT}).encode())
    assert posting.phase == "Failed\ufffd[31m"
    assert posting.message.startswith("\ufffd[2J") and len(posting.message) == REASON_LIMIT


@pytest.mark.parametrize(("data", "said"), HOSTILE_TRAINING)
def test_a_hostile_training_answer_is_refused_with_its_reason(store: DirectoryStore, data: bytes, said: str) -> None:
    the_spec = spec(minSuccessful=1)
    relay = SiteRelay(store, the_spec, "team-signs/signs")
    status = round_one(the_spec)
    relay.publish(status)
    store.write_bytes(Layout().site_result("munich", "r0001-munich-a1"), data)
    seen = relay.observe(status)["r0001-munich-a1"]
    assert (seen.state, seen.exit_code, seen.output) == ("failed", EXIT_BAD_DATA, None)
    assert said in (seen.reason or ""), seen.reason
    assert (seen.reason or "").startswith("munich's answer was refused: ")
    following = decide(the_spec, status, {"r0001-munich-a1": seen}, 102.0)  # the engine: one failed client
    munich = following.status.round(1).clients["munich"]  # type: ignore[union-attr]
    assert munich.state == "failed" and said in (munich.reason or "")
    assert following.status.phase == "Running"


def test_an_oversized_answer_is_refused_without_being_read(store: DirectoryStore,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    the_spec = spec()
    relay = SiteRelay(store, the_spec, "team-signs/signs")
    status = round_one(the_spec)
    relay.publish(status)
    path = store.path(Layout().site_result("munich", "r0001-munich-a1"))
    path.parent.mkdir(parents=True)
    with path.open("wb") as stream:  # 200 MB, sparse: it costs the test machine no disk
        stream.truncate(200 * 1024 * 1024)
    monkeypatch.setattr(DirectoryStore, "read_bytes", lambda self, key: pytest.fail(f"{key} read whole"))
    tracemalloc.start()
    seen = relay.observe(status)["r0001-munich-a1"]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen.state == "failed" and "209715200 bytes, over the 65536 bytes allowed" in (seen.reason or "")
    assert peak < 1024 * 1024


def evaluating(the_spec: FederatedTrainingSpec, store: DirectoryStore) -> TrainingStatus:
    """The status once round 1 (the last) was aggregated and munich is asked to score its model in a task of its own.

    Earlier rounds' models are scored by the next round's training tasks (`test_a_training_task_carries_...`).
    """
    assert the_spec.rounds == 1
    save_weights(store, Layout().global_weights(1), {"w": np.ones(3, np.float32)}, {"round": 1})
    status = round_one(the_spec)
    trained = {"r0001-hq-a1": Observation("succeeded", 0), "r0001-munich-a1": Observation("succeeded", 0)}
    status = decide(the_spec, status, trained, 102.0).status
    aggregated = {**trained, "r0001-aggregate-a1": Observation("succeeded", 0, {"accepted": ["hq", "munich"],
                                                                                "accuracy": 0.3, "loss": 2.0})}
    status = decide(the_spec, status, aggregated, 103.0).status
    assert status.round(1).evaluations is not None  # type: ignore[union-attr]
    return status


HOSTILE_SCORES = [
    pytest.param({**SCORE, "accuracy": 7.0}, "accuracy: Input should be less than or equal to 1", id="accuracy-7"),
    pytest.param({**SCORE, "loss": 1e308}, "loss: Input should be less than or equal to 1000000", id="loss-1e308"),
    pytest.param({**SCORE, "accuracy": float("nan")}, "accuracy: Input should be a finite number", id="accuracy-nan"),
    pytest.param({**SCORE, "accuracy": -0.1}, "accuracy: Input should be greater than or equal to 0",
                 id="accuracy-negative"),
    pytest.param({**SCORE, "loss": float("inf")}, "loss: Input should be a finite number", id="loss-inf"),
    pytest.param({**SCORE, "examples": 10**18}, "examples: Input should be less than or equal to 2147483647",
                 id="examples-1e18"),
    pytest.param({**SCORE, "examples": 2_000_000}, "claims 2000000 examples", id="examples-over-the-spec"),
    pytest.param({**SCORE, "examples": 0}, "examples: Input should be greater than or equal to 1", id="no-examples"),
    pytest.param({**SCORE, "accuracy": "0.5"}, "accuracy: Input should be a valid number", id="accuracy-string"),
    pytest.param({"examples": 40, "accuracy": 0.5}, "loss: Field required", id="no-loss"),
]


@pytest.mark.parametrize(("output", "said"), HOSTILE_SCORES)
def test_a_hostile_score_is_refused_and_the_round_completes_without_it(store: DirectoryStore, output: object,
                                                                        said: str) -> None:
    the_spec = spec(rounds=1)
    relay = SiteRelay(store, the_spec, "team-signs/signs")
    status = evaluating(the_spec, store)
    relay.publish(status)
    store.write_bytes(Layout().site_result("munich", "e0001-munich-a1"), answer_bytes("e0001-munich-a1", output))
    seen = relay.observe(status)["e0001-munich-a1"]
    assert seen.state == "failed" and said in (seen.reason or ""), seen.reason
    done = decide(the_spec, status, {"e0001-munich-a1": seen}, 104.0).status
    record = done.round(1)
    assert record is not None and record.finished_at is not None and record.site_scores == {}
    assert record.federated is None and done.federated_accuracy is None
    assert done.best_accuracy == 0.3  # the central score: no site's figure reached it
    json.dumps(done.to_json(), allow_nan=False)  # nothing an API server would refuse
    relay.publish(done)
    recorded = parse_scores_record(store.read_bytes(Layout().federated_scores(1)))
    assert recorded.sites == {}  # finalize finds no score of munich's to use


def test_the_accepted_scores_are_recorded_once_for_finalize(store: DirectoryStore) -> None:
    the_spec = spec(rounds=1)
    relay = SiteRelay(store, the_spec, "team-signs/signs")
    status = evaluating(the_spec, store)
    relay.publish(status)
    store.write_bytes(Layout().site_result("munich", "e0001-munich-a1"), answer_bytes("e0001-munich-a1", SCORE))
    seen = relay.observe(status)
    assert seen["e0001-munich-a1"] == Observation("succeeded", 0, SCORE)
    done = decide(the_spec, status, seen, 104.0).status
    relay.publish(done)
    key = Layout().federated_scores(1)
    record = parse_scores_record(store.read_bytes(key))
    assert record.sites["munich"].accuracy == 0.5
    assert (record.combine, record.outlier_distance) == ("weighted", 0.2)  # how finalize must combine them
    store.write_bytes(key, b"changed")
    relay.publish(done)
    assert store.read_bytes(key) == b"changed"  # written once by this process
    SiteRelay(store, the_spec, "team-signs/signs").publish(done)
    assert store.read_bytes(key) == b"changed"  # a new process writes only what is missing


def carrying(the_spec: FederatedTrainingSpec, store: DirectoryStore) -> tuple[TrainingStatus, dict[str, Observation]]:
    """The status once round 1 was aggregated: its evaluation travels with round 2's training tasks."""
    save_weights(store, Layout().global_weights(1), {"w": np.ones(3, np.float32)}, {"round": 1})
    trained = {"r0001-hq-a1": Observation("succeeded", 0), "r0001-munich-a1": Observation("succeeded", 0)}
    status = decide(the_spec, round_one(the_spec), trained, 102.0).status
    aggregated = {**trained, "r0001-aggregate-a1": Observation("succeeded", 0, {"accepted": ["hq", "munich"]})}
    status = decide(the_spec, status, aggregated, 103.0).status
    return status, aggregated


TRAINED = {"num_examples": 5, "metrics": {"train_loss": 0.5}, "sha256": "a" * 64}


def test_a_training_task_carries_the_evaluation_of_the_model_it_trains_from(store: DirectoryStore) -> None:
    the_spec = spec()
    relay = SiteRelay(store, the_spec, "team-signs/signs")
    status, seen = carrying(the_spec, store)
    first = status.round(1)
    assert first is not None and first.carried and first.finished_at is not None and status.current_round == 2
    relay.publish(status)
    task = parse_posting(store.read_bytes("sites/munich/task.json")).task
    assert task is not None and (task.kind, task.round, task.evaluate_base) == ("train", 2, True)
    assert task.global_key == Layout().global_weights(1)  # the model it scores is the one it trains from
    store.write_bytes(Layout().site_result("munich", "r0002-munich-a1"),
                      answer_bytes("r0002-munich-a1", {**TRAINED, "evaluation": SCORE}))
    answers = relay.observe(status)
    assert answers["r0002-munich-a1"] == Observation("succeeded", 0, {**TRAINED, "evaluation": SCORE})
    done = decide(the_spec, status, {**seen, **answers, "r0002-hq-a1": Observation("succeeded", 0)}, 104.0).status
    first = done.round(1)
    assert first is not None and first.scored and first.site_scores["munich"].accuracy == 0.5
    relay.publish(done)
    assert parse_scores_record(store.read_bytes(Layout().federated_scores(1))).sites["munich"].accuracy == 0.5


@pytest.mark.parametrize(("output", "said"), HOSTILE_SCORES[:3])
def test_a_hostile_carried_score_loses_the_score_never_the_update(store: DirectoryStore, output: object,
                                                                   said: str) -> None:
    the_spec = spec()
    relay = SiteRelay(store, the_spec, "team-signs/signs")
    status, seen = carrying(the_spec, store)
    relay.publish(status)
    store.write_bytes(Layout().site_result("munich", "r0002-munich-a1"),
                      answer_bytes("r0002-munich-a1", {**TRAINED, "evaluation": output}))
    answer = relay.observe(status)["r0002-munich-a1"]
    assert answer.state == "succeeded" and said in str((answer.output or {})["evaluation_refused"])
    done = decide(the_spec, status, {**seen, "r0002-munich-a1": answer, "r0002-hq-a1": Observation("succeeded", 0)},
                  104.0).status
    first, second = done.round(1), done.round(2)
    assert first is not None and first.evaluations is not None and first.evaluations["munich"].state == "failed"
    assert said in (first.evaluations["munich"].reason or "") and first.federated is None
    assert second is not None and second.clients["munich"].state == "succeeded"


class FailingWrites:
    """A store whose next ``failures`` writes fail as a store that is down for a moment does."""

    def __init__(self, store: DirectoryStore, failures: int) -> None:
        self.store, self.failures = store, failures

    def write_bytes(self, key: str, data: bytes) -> None:
        if self.failures:
            self.failures -= 1
            raise TemporaryStorageError(f"{key}: the store did not answer")
        self.store.write_bytes(key, data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


def test_an_unchanged_status_is_published_once_and_again_after_a_failed_try(
        store: DirectoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    the_spec = spec()
    status = round_one(the_spec)
    relay = SiteRelay(FailingWrites(store, failures=1), the_spec, "team-signs/signs")  # type: ignore[arg-type]
    with pytest.raises(TemporaryStorageError):
        relay.publish(status)
    relay.publish(status)  # the same status: tried again, since the last try did not get through
    assert parse_posting(store.read_bytes("sites/munich/task.json")).task is not None
    built: list[object] = []
    monkeypatch.setattr(SiteRelay, "task", lambda self, wanted: built.append(wanted))
    relay.publish(status)
    relay.publish(status.model_copy(deep=True))  # an equal status: nothing to build or write
    assert built == []
    status.round(1).clients["munich"].state = "dropped"  # type: ignore[union-attr]  # changed in place
    relay.publish(status)
    assert parse_posting(store.read_bytes("sites/munich/task.json")).task is None
