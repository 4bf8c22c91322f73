"""The relay in a secure round: each stage's site task carries the roster and the others' messages, parsed, once.

A coordinator with an in-cluster client (hq) and two sites (munich, hamburg) goes through the
stages of round 1 as its engine decides them; the clients' messages are real ones, written where
each client writes them (a site in its own folder). What a site may not read reaches it only
inside its task, and what a site writes counts only once it parses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from fedtrain.contract.errors import EXIT_BAD_DATA
from fedtrain.contract.layout import Layout
from fedtrain.contract.secmessages import Advertisement, SharesMessage, round_share_sets
from fedtrain.contract.sitetask import SiteResult, SiteTask, encode, parse_posting
from fedtrain.contract.storage import DirectoryStore
from fedtrain.engine import decide
from fedtrain.engine.status import Observation, TrainingStatus
from fedtrain.sites.relay import SiteRelay
from fedtrain.spec import FederatedTrainingSpec, parse_spec
from fedtrain.tasks import Placement, remote, worker_arguments
from fedtrain.worker.secagg import ClientKeys, Context, make_shares
from fedtrain.worker.weights import save_weights

IDENTITY = "team-signs/signs/0123abcd"
CLIENTS = ("hamburg", "hq", "munich")
SITES = ("munich", "hamburg")
LAYOUT = Layout(sites=frozenset(SITES))
CONTEXT = Context(IDENTITY, 1, 1)


MASKED = save_safetensors({"masked": np.zeros(4, np.uint32)})  # the 3 values of the global model, and the weight


def spec() -> FederatedTrainingSpec:
    return parse_spec({"rounds": 2, "seed": 4, "roundDeadlineSeconds": 60,
                       "clients": {"list": [{"name": "hq"}, {"name": "munich", "site": {}},
                                            {"name": "hamburg", "site": {}}], "maxExamples": 300},
                       "privacy": {"clipNorm": 5.0, "secureAggregation": {"threshold": 2}}})


def keys(client: str) -> ClientKeys:
    return ClientKeys.derive(client.encode().ljust(32, b"#"), CONTEXT, client)


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    found = DirectoryStore(tmp_path / "training")
    save_weights(found, Layout().global_weights(0), {"w": np.zeros(3, np.float32)}, {"round": 0})
    return found


def round_one(the_spec: FederatedTrainingSpec) -> TrainingStatus:
    """The status once init succeeded: round 1's key stage launched for every client."""
    first = decide(the_spec, TrainingStatus(), {}, 100.0).status
    return decide(the_spec, first, {"init-a1": Observation("succeeded", 0)}, 101.0).status


def answer(store: DirectoryStore, site: str, ident: str, output: dict[str, object] | None = None) -> None:
    """The site's answer that it finished a task."""
    store.write_bytes(Layout().site_result(site, ident), encode(SiteResult(ident, site, "succeeded", 0, None,
                                                                           output or {})))


def posted(store: DirectoryStore, site: str) -> SiteTask:
    task = parse_posting(store.read_bytes(f"sites/{site}/task.json")).task
    assert task is not None
    return task


def advertise(store: DirectoryStore, relay: SiteRelay, status: TrainingStatus) -> TrainingStatus:
    """Every client advertises its keys where it writes them; the engine moves to the share stage."""
    for client in CLIENTS:
        store.write_bytes(LAYOUT.secure_message(1, 1, client, "keys.json"), keys(client).advertisement().to_bytes())
    relay.publish(status)
    for site in SITES:
        answer(store, site, f"k0001-{site}-a1")
    seen = {**relay.observe(status), "k0001-hq-a1": Observation("succeeded", 0)}
    return decide(spec(), status, seen, 102.0).status


def share(store: DirectoryStore, relay: SiteRelay, status: TrainingStatus) -> TrainingStatus:
    """Every client shares its secrets with its share set; the engine moves to masked training."""
    advertisements = {c: keys(c).advertisement() for c in CLIENTS}
    for client in CLIENTS:
        message = make_shares(keys(client), advertisements, CLIENTS, 2)
        store.write_bytes(LAYOUT.secure_message(1, 1, client, "shares.json"), message.to_bytes())
    relay.publish(status)
    for site in SITES:
        answer(store, site, f"s0001-{site}-a1", {"recipients": 3})
    seen = {**relay.observe(status), "s0001-hq-a1": Observation("succeeded", 0)}
    return decide(spec(), status, seen, 103.0).status


def test_a_site_advertises_through_a_task_and_the_in_cluster_client_runs_its_stage_here(
        store: DirectoryStore) -> None:
    the_spec, status = spec(), round_one(spec())
    relay = SiteRelay(store, the_spec, "team-signs/signs", IDENTITY)
    relay.publish(status)
    task = posted(store, "munich")
    assert (task.id, task.kind, task.global_key) == ("k0001-munich-a1", "keys", "round-0000/global.safetensors")
    assert task.secure is not None and task.train is None
    assert (task.secure.identity, task.secure.round_attempt, task.secure.threshold) == (IDENTITY, 1, 2)
    assert (task.secure.clip_norm, task.secure.weight_unit, task.secure.equal_weights) == (5.0, 300, False)
    assert task.secure.advertisements == {} and task.secure.shares == {}
    launched = decide(the_spec, status, {}, 101.5).launches
    assert {t.id: remote(t, the_spec) for t in launched} == {"k0001-hq-a1": False, "k0001-munich-a1": True,
                                                             "k0001-hamburg-a1": True}
    hq = next(t for t in launched if t.client == "hq")
    arguments = worker_arguments(hq, the_spec, Placement("/store", "/data", "signs", "team-signs", "0123abcd"))
    assert arguments[arguments.index("--sites") + 1] == "munich,hamburg"  # hq reads the sites' messages there
    assert arguments[arguments.index("--training-id") + 1] == IDENTITY


@pytest.mark.parametrize(("written", "said"), [
    (None, "keys.json: missing"),
    (b"{not json", "munich's key advertisement: the document: Invalid JSON"),
    (keys("hamburg").advertisement().to_bytes(), "munich's key advertisement: names client 'hamburg'"),
    (ClientKeys.derive(b"m" * 32, Context(IDENTITY, 2, 1), "munich").advertisement().to_bytes(),
     "stale or replayed"),
], ids=["missing", "not-json", "another-client", "another-round"])
def test_a_site_whose_message_does_not_parse_fails_its_stage_with_the_reason(
        store: DirectoryStore, written: bytes | None, said: str) -> None:
    the_spec, status = spec(), round_one(spec())
    relay = SiteRelay(store, the_spec, "team-signs/signs", IDENTITY)
    relay.publish(status)
    if written is not None:
        store.write_bytes(LAYOUT.secure_message(1, 1, "munich", "keys.json"), written)
    answer(store, "munich", "k0001-munich-a1")
    seen = relay.observe(status)["k0001-munich-a1"]
    assert seen.state == "failed" and seen.exit_code == EXIT_BAD_DATA, seen
    assert "its keys stage's message" in (seen.reason or "") and said in (seen.reason or ""), seen.reason
    store.write_bytes(LAYOUT.secure_message(1, 1, "munich", "keys.json"), keys("munich").advertisement().to_bytes())
    assert relay.observe(status)["k0001-munich-a1"] == Observation("succeeded", 0, {"recipients": None, "opened": [],
                                                                                     "refused": {}})


def test_the_share_and_training_tasks_relay_the_members_advertisements(store: DirectoryStore) -> None:
    the_spec = spec()
    relay = SiteRelay(store, the_spec, "team-signs/signs", IDENTITY)
    status = advertise(store, relay, round_one(the_spec))
    relay.publish(status)
    task = posted(store, "munich")
    assert task.id == "s0001-munich-a1" and task.secure is not None
    assert task.secure.advertised == ("hq", "munich", "hamburg")
    assert task.secure.advertisements == {c: keys(c).advertisement() for c in ("hamburg", "hq")}
    status = share(store, relay, status)
    relay.publish(status)
    task = posted(store, "munich")
    assert (task.id, task.kind) == ("r0001-munich-a1", "train") and task.secure is not None
    assert task.secure.peers == ("hq", "munich", "hamburg") and task.secure.shares == {}
    assert set(task.secure.advertisements) == {"hamburg", "hq"}
    assert task.train is not None and task.train.clip_norm is None  # the masked upload clips


def test_a_masked_training_counts_only_with_its_masked_update_and_no_example_count(store: DirectoryStore) -> None:
    the_spec = spec()
    relay = SiteRelay(store, the_spec, "team-signs/signs", IDENTITY)
    status = share(store, relay, advertise(store, relay, round_one(the_spec)))
    relay.publish(status)
    answer(store, "munich", "r0001-munich-a1", {"metrics": {"val_accuracy": 0.5}, "length": 9})
    seen = relay.observe(status)["r0001-munich-a1"]
    assert seen.state == "failed" and "secure-a1/masked.safetensors: missing" in (seen.reason or ""), seen
    key = LAYOUT.secure_message(1, 1, "munich", "masked.safetensors")
    for wrong in (b"masked", save_safetensors({"masked": np.zeros(5, np.uint32)}),
                  save_safetensors({"masked": np.zeros(4, np.int32)}),
                  save_safetensors({"masked": np.zeros(4, np.uint32), "extra": np.zeros(1, np.uint32)}),
                  MASKED + b"  "):
        store.write_bytes(key, wrong)  # checked whole: no survivor's vector can leave the sum once revealed
        seen = relay.observe(status)["r0001-munich-a1"]
        assert seen.state == "failed" and ("uint32 tensor 'masked' of 4 elements" in (seen.reason or "")
                                           or "too short" in (seen.reason or "")), seen
    store.write_bytes(key, MASKED)
    assert relay.observe(status)["r0001-munich-a1"].state == "succeeded"
    answer(store, "munich", "r0001-munich-a1", {"metrics": {}, "length": 9, "num_examples": 40})
    seen = relay.observe(status)["r0001-munich-a1"]
    assert seen.state == "failed" and "num_examples: Extra inputs are not permitted" in (seen.reason or "")


def test_the_unmask_task_relays_each_senders_share_for_this_site_alone_as_first_read(store: DirectoryStore) -> None:
    the_spec = spec()
    relay = SiteRelay(store, the_spec, "team-signs/signs", IDENTITY)
    status = share(store, relay, advertise(store, relay, round_one(the_spec)))
    relay.publish(status)
    for site in SITES:
        store.write_bytes(LAYOUT.secure_message(1, 1, site, "masked.safetensors"), MASKED)
        answer(store, site, f"r0001-{site}-a1", {"metrics": {}, "length": 9})
    seen = {**relay.observe(status), "r0001-hq-a1": Observation("succeeded", 0)}
    status = decide(the_spec, status, seen, 104.0).status
    hamburg_shares = store.read_bytes(LAYOUT.secure_message(1, 1, "hamburg", "shares.json"))
    other = make_shares(keys("hamburg"), {c: keys(c).advertisement() for c in CLIENTS}, CLIENTS, 2)
    store.write_bytes(LAYOUT.secure_message(1, 1, "hamburg", "shares.json"), other.to_bytes())  # a second version
    relay.publish(status)
    task = posted(store, "munich")
    assert (task.id, task.kind) == ("u0001-munich-a1", "unmask") and task.secure is not None
    assert task.secure.survivors == ("hq", "munich", "hamburg")
    assert {s: set(m.ciphertexts) for s, m in task.secure.shares.items()} == {"hamburg": {"munich"}, "hq": {"munich"}}
    relayed = task.secure.shares["hamburg"].ciphertexts["munich"]
    assert relayed == SharesMessage.parse(hamburg_shares, CONTEXT, "hamburg").ciphertexts["munich"]  # as first read
    assert relayed != other.ciphertexts["munich"]  # the second version is never relayed


def test_a_relay_without_the_trainings_identity_refuses_to_post_a_secure_task(store: DirectoryStore) -> None:
    with pytest.raises(Exception, match="needs the training's identity"):
        SiteRelay(store, spec(), "team-signs/signs").publish(round_one(spec()))


def test_the_share_graph_of_the_relay_is_the_clients(store: DirectoryStore) -> None:
    """SecAgg+ with one neighbour each: a site's inbox holds its share set only."""
    the_spec = parse_spec({**spec().model_dump(by_alias=True, exclude_none=True),
                           "clients": {"list": [{"name": n, "site": {}} for n in ("a", "b", "c", "d", "e")]},
                           "privacy": {"clipNorm": 5.0, "secureAggregation": {"threshold": 2, "neighbours": 2}}})
    relay = SiteRelay(store, the_spec, "team-signs/signs", IDENTITY)
    status = round_one(the_spec)
    names = ("a", "b", "c", "d", "e")
    layout = Layout(sites=frozenset(names))
    for name in names:
        ad = ClientKeys.derive(name.encode().ljust(32, b"#"), CONTEXT, name).advertisement()
        store.write_bytes(layout.secure_message(1, 1, name, "keys.json"), ad.to_bytes())
        answer(store, name, f"k0001-{name}-a1")
    status = decide(the_spec, status, relay.observe(status), 102.0).status
    relay.publish(status)
    task = posted(store, "a")
    graph = round_share_sets(names, 2, 4, 1, 1)
    assert task.secure is not None
    assert set(task.secure.advertisements) == set(graph["a"]) - {"a"} and len(graph["a"]) == 3
    assert all(isinstance(ad, Advertisement) for ad in task.secure.advertisements.values())


def test_a_client_that_refused_shares_is_named_in_a_warning_event() -> None:
    the_spec = spec()
    status = round_one(the_spec)
    secure = status.round(1).secure  # type: ignore[union-attr]
    assert secure is not None
    secure.stage = "unmask"
    output = {"opened": ["hq"], "refused": {"hamburg": "hamburg's share for munich: fails authentication"}}
    decision = decide(the_spec, status, {"u0001-munich-a1": Observation("succeeded", 0, output)}, 102.0)
    named = [e for e in decision.events if e.reason == "SecureSharesRefused"]
    assert [e.message for e in named] == ["round 1: munich refused the shares of hamburg's (hamburg's share for "
                                          "munich: fails authentication)"]
    assert all(e.warning for e in named)
    assert not [e for e in decide(the_spec, decision.status, {}, 103.0).events if e.reason == "SecureSharesRefused"]
