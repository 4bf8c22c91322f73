"""How often a site reads its posting, and how often the coordinator looks for answers, by the store's kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedtrain.contract.layout import Layout
from fedtrain.contract.storage import DirectoryStore, S3Settings, S3Store
from fedtrain.engine import decide
from fedtrain.engine.status import Observation, TrainingStatus
from fedtrain.local.runner import PASS_SECONDS, pass_seconds
from fedtrain.sites.pace import ACTIVE, FASTEST, GROWTH, LOCAL_ACTIVE, LOCAL_FASTEST, Pace
from fedtrain.sites.relay import SiteRelay
from fedtrain.spec import parse_spec
from fedtrain.worker.weights import save_weights


def s3_store() -> S3Store:
    """An S3 store that is never asked anything (it is only made)."""
    return S3Store("bucket", "prefix", S3Settings(endpoint="http://127.0.0.1:9", access_key_id="a",
                                                   secret_access_key="b"))


def waits(pace: Pace, count: int) -> list[float]:
    return [round(pace.next_wait(), 6) for _ in range(count)]


def test_an_object_store_is_read_soon_after_something_moved_then_less_and_less_often() -> None:
    pace = Pace.for_store(30.0, reads_are_local=False)
    pace.follow(running=True, poll_seconds=30.0)
    found = waits(pace, 12)
    assert found[0] == FASTEST and found[1] == round(FASTEST * GROWTH, 6)
    assert max(found) == ACTIVE and found[-1] == ACTIVE  # while the training runs: never slower than ACTIVE
    pace.follow(running=False, poll_seconds=30.0)  # idle: up to pollSeconds
    assert max(waits(pace, 12)) == 30.0
    pace.moved()
    assert pace.next_wait() == FASTEST


def test_a_store_in_a_directory_is_read_every_few_hundredths_of_a_second_while_the_training_runs() -> None:
    pace = Pace.for_store(30.0, reads_are_local=True)
    pace.follow(running=True, poll_seconds=30.0)
    found = waits(pace, 8)
    assert found[0] == LOCAL_FASTEST and max(found) == LOCAL_ACTIVE == found[-1]
    pace.follow(running=False, poll_seconds=30.0)  # idle costs no more than on S3: pollSeconds
    assert max(waits(pace, 40)) == 30.0
    pace.follow(running=True, poll_seconds=0.05)  # a shorter pollSeconds still wins
    assert pace.next_wait() <= 0.05


def test_which_stores_have_local_reads(tmp_path: Path) -> None:
    assert DirectoryStore(tmp_path).reads_are_local
    s3 = s3_store()
    assert not s3.reads_are_local  # a request each: billed and a round trip away


def test_the_coordinator_looks_often_only_while_sites_answer_through_a_local_store(tmp_path: Path) -> None:
    spec = parse_spec({"rounds": 1, "clients": {"list": [{"name": "hq"}, {"name": "munich", "site": {}}]}})
    store = DirectoryStore(tmp_path / "training")
    save_weights(store, Layout().global_weights(0), {"w": np.zeros(3, np.float32)}, {"round": 0})
    relay = SiteRelay(store, spec, "team-signs/signs")
    before = decide(spec, TrainingStatus(), {}, 100.0).status  # init runs here: no site task yet
    assert pass_seconds(relay, before) == PASS_SECONDS
    training = decide(spec, before, {"init-a1": Observation("succeeded", 0)}, 101.0).status
    assert pass_seconds(relay, training) == LOCAL_FASTEST  # munich's answer may come at any moment
    assert pass_seconds(None, training) == PASS_SECONDS  # no sites: local tasks wake the loop themselves
    s3 = s3_store()
    assert pass_seconds(SiteRelay(s3, spec, "team-signs/signs"), training) == PASS_SECONDS  # each look is billed
