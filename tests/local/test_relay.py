"""The coordinator's relay: postings follow the stored status, answers become engine observations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedtrain.engine import decide
from fedtrain.engine.status import Observation, TrainingStatus
from fedtrain.sites.relay import SiteRelay
from fedtrain.spec import FederatedTrainingSpec, parse_spec
from fedtrain.worker.errors import EXIT_REFUSED
from fedtrain.worker.layout import Layout
from fedtrain.worker.sitetask import SiteResult, encode, parse_posting
from fedtrain.worker.storage import DirectoryStore
from fedtrain.worker.weights import save_weights


def spec() -> FederatedTrainingSpec:
    return parse_spec({"rounds": 2, "seed": 4, "roundDeadlineSeconds": 60,
                       "clients": {"list": [{"name": "hq"}, {"name": "munich", "site": {},
                                                               "training": {"localEpochs": 3}}]},
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
    store.write_bytes(key, encode(SiteResult("r0001-munich-a1", "munich", "succeeded", 0, None, {"n": 5})))
    assert relay.observe(status)["r0001-munich-a1"] == Observation("succeeded", 0, {"n": 5})
    store.write_bytes(key, b"{not json")
    seen = relay.observe(status)["r0001-munich-a1"]
    assert seen.state == "failed" and "unreadable result" in (seen.reason or "")


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
