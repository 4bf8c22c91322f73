"""A secure round's site tasks: the ``secure`` block and its inbox parse strictly, the stages' ids and outputs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedtrain.contract.errors import BadDataError
from fedtrain.contract.secmessages import MAX_SHARE_SET, SharesMessage
from fedtrain.contract.sitetask import (
    SecureSettings,
    SiteTask,
    TrainSettings,
    digest,
    parse_task,
    secure_train_output,
    stage_output,
)
from fedtrain.worker.secagg import ClientKeys, Context, make_shares

IDENTITY = "team/signs/0123abcd"
CONTEXT = Context(IDENTITY, 3, 2)
MEMBERS = ("berlin", "hq", "munich")


def keys(client: str) -> ClientKeys:
    return ClientKeys.derive(client.encode().ljust(32, b"#"), CONTEXT, client)


def shares_from(sender: str) -> SharesMessage:
    advertisements = {c: keys(c).advertisement() for c in MEMBERS}
    return make_shares(keys(sender), advertisements, MEMBERS, 2)


def secure_task(kind: str = "unmask", **secure: Any) -> SiteTask:
    settings = {"identity": IDENTITY, "round_attempt": 2, "threshold": 2, "clip_norm": 5.0, "weight_unit": 200,
                "advertised": MEMBERS, "peers": MEMBERS, "survivors": MEMBERS,
                "advertisements": {c: keys(c).advertisement() for c in MEMBERS},
                "shares": {c: shares_from(c).addressed_to("munich") for c in ("berlin", "hq")}, **secure}
    letter = {"keys": "k", "shares": "s", "unmask": "u", "train": "r"}[kind]
    return SiteTask(id=f"{letter}0003-munich-a1", kind=kind, round=3, site="munich",  # type: ignore[arg-type]
                    training="team/signs", total_rounds=5, strategy="fedavg", architecture="tiny_cnn",
                    global_key="round-0002/global.safetensors", global_sha256="ab" * 32, deadline=1e9,
                    train=TrainSettings() if kind == "train" else None, secure=SecureSettings(**settings))


def changed(document: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """``document`` with the field at ``path`` set to ``value`` (None removes it), its digest made to match."""
    body = json.loads(json.dumps({k: v for k, v in document.items() if k != "digest"}))
    target = body
    for part in path[:-1]:
        target = target[part]
    if value is None:
        target.pop(path[-1])
    else:
        target[path[-1]] = value
    return {**body, "digest": digest(body)}


@pytest.mark.parametrize("kind", ["keys", "shares", "train", "unmask"])
def test_a_secure_task_round_trips_with_its_inbox(kind: str) -> None:
    task = secure_task(kind)
    parsed = parse_task(json.loads(json.dumps(task.to_json())))
    assert parsed == task
    assert parsed.secure is not None and parsed.secure.shares["hq"].ciphertexts.keys() == {"munich"}


def test_a_relayed_share_holds_only_the_recipients_entry() -> None:
    full = shares_from("hq")
    assert set(full.ciphertexts) == set(MEMBERS)
    trimmed = full.addressed_to("munich")
    assert trimmed.ciphertexts == {"munich": full.ciphertexts["munich"]} and trimmed.sender == "hq"
    assert full.addressed_to("paris").ciphertexts == {}


@pytest.mark.parametrize(("path", "value", "said"), [
    (("secure",), None, "a unmask task without its 'secure' settings"),
    (("secure", "advertisements", "hq", "extra"), "x", "secure.advertisements.hq.extra: Extra inputs are not "
                                                      "permitted"),
    (("secure", "advertisements", "hq", "round"), "3", "secure.advertisements.hq.round: Input should be a valid "
                                                       "integer"),
    (("secure", "shares", "hq", "ciphertexts"), {"../x": "QUJD"}, "secure.shares.hq.ciphertexts"),
    (("secure", "peers"), ["Not-A-Label"], "secure.peers.0: String should match pattern"),
    (("secure", "survivors"), [f"c{i}" for i in range(MAX_SHARE_SET + 1)], "secure.survivors: Tuple should have "
                                                                          "at most 256 items"),
    (("secure", "threshold"), 1, "secure.threshold: Input should be greater than or equal to 2"),
    (("secure", "clip_norm"), float("inf"), "secure.clip_norm"),
    (("secure", "round_attempt"), 0, "secure.round_attempt"),
    (("secure", "note"), "x", "secure.note: Unexpected keyword argument"),
], ids=["missing", "extra-field", "string-round", "bad-recipient", "bad-name", "too-many", "threshold", "clip",
        "attempt", "unknown"])
def test_a_secure_block_that_is_not_one_is_refused_naming_the_field(path: tuple[str, ...], value: Any,
                                                                      said: str) -> None:
    document = changed(secure_task().to_json(), path, value)
    with pytest.raises(BadDataError) as refused:
        parse_task(document, "munich's task.json")
    assert said in str(refused.value)


def test_an_evaluation_carries_no_secure_block() -> None:
    task = secure_task()
    document = changed({**task.to_json(), "id": "e0003-munich-a1", "kind": "evaluate"}, ("kind",), "evaluate")
    with pytest.raises(BadDataError, match="an evaluate task with 'secure' settings"):
        parse_task(document)


@pytest.mark.parametrize(("kind", "ident"), [("keys", "k0003-munich-a1"), ("shares", "s0003-munich-a1"),
                                             ("unmask", "u0003-munich-a1")])
def test_a_stage_task_needs_its_stages_id(kind: str, ident: str) -> None:
    document = secure_task(kind).to_json()
    assert parse_task(document).id == ident
    with pytest.raises(BadDataError, match=f"is not the id of a {kind} task"):
        parse_task(changed(document, ("id",), "r0003-munich-a1"))


def test_stage_and_masked_training_outputs_are_strict() -> None:
    assert stage_output({"opened": ["hq"], "refused": {"berlin": "fails authentication"}}).refused == {
        "berlin": "fails authentication"}
    assert secure_train_output({"metrics": {"val_accuracy": 0.5}, "length": 10}).length == 10
    with pytest.raises(BadDataError, match=r"refused\.berlin: String should have at most 500 characters"):
        stage_output({"refused": {"berlin": "x" * 501}})
    with pytest.raises(BadDataError, match="num_examples: Extra inputs are not permitted"):
        secure_train_output({"length": 10, "num_examples": 4})
    with pytest.raises(BadDataError, match="length: Input should be greater than or equal to 1"):
        secure_train_output({"length": 0})
