"""Secure aggregation's protocol: exact sums, dropouts at every stage, forged and replayed messages refused."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from fedtrain.contract.errors import BadDataError, BadInputError
from fedtrain.worker.secagg import (
    ADVERTISEMENT_LIMIT,
    Advertisement,
    ClientKeys,
    Context,
    QuantisationPlan,
    QuantisationRangeError,
    Reveal,
    SecAggRefused,
    Share,
    SharesMessage,
    ThresholdNotMet,
    make_shares,
    mask,
    open_share,
    reveal,
    share_sets,
    unmask,
)

CONTEXT = Context("team-a/gtsrb", 3, 1)
TEMPLATE: dict[str, NDArray[Any]] = {
    "features.0.weight": np.zeros((4, 3, 3, 3), np.float32), "features.1.running_var": np.ones(4, np.float32),
    "features.1.num_batches_tracked": np.array(0, np.int64), "classifier.bias": np.zeros(5, np.float32)}
STAGES = ("advertise", "share", "upload", "reveal")


def names(count: int) -> list[str]:
    return [f"client-{i:02d}" for i in range(count)]


def master(client: str) -> bytes:
    return client.encode().ljust(32, b"#")


def random_delta(rng: np.random.Generator, clip: float) -> dict[str, NDArray[np.generic]]:
    """Float tensors of L2 norm <= clip (together), and a BatchNorm counter's integer step."""
    floats = {n: rng.normal(size=t.shape) for n, t in TEMPLATE.items() if t.dtype.kind == "f"}
    norm = np.sqrt(sum(float(np.sum(v**2)) for v in floats.values()))
    factor = clip * rng.uniform(0.2, 1.0) / norm
    delta: dict[str, NDArray[np.generic]] = {n: (v * factor).astype(np.float32) for n, v in floats.items()}
    delta["features.1.num_batches_tracked"] = np.array(rng.integers(-40, 400), np.int64)
    return delta


@dataclass
class Round:
    """One secure round run stage by stage, each client stopping before the stage named for it."""

    clients: list[str]
    neighbours: int
    threshold: int
    stops: Mapping[str, str] = field(default_factory=dict)
    context: Context = CONTEXT

    def __post_init__(self) -> None:
        self.sets = share_sets(self.clients, self.neighbours, seed="round-3")
        self.keys = {c: ClientKeys.derive(master(c), self.context, c) for c in self.clients}

    def doing(self, stage: str, clients: list[str]) -> list[str]:
        """Those of ``clients`` that do ``stage``: not stopped before it or at it."""
        return [c for c in clients if c not in self.stops or STAGES.index(self.stops[c]) > STAGES.index(stage)]

    def run(self, deltas: Mapping[str, Mapping[str, NDArray[np.generic]]], weights: Mapping[str, float],
            plan: QuantisationPlan) -> tuple[NDArray[np.uint32], list[str]]:
        advertisers = self.doing("advertise", self.clients)
        ads = {c: Advertisement.parse(self.keys[c].advertisement().to_bytes(), self.context, c) for c in advertisers}
        sharers = self.doing("share", advertisers)
        messages = {c: SharesMessage.parse(make_shares(self.keys[c], {m: ads[m] for m in self.sets[c] if m in ads},
                                                       self.sets[c], self.threshold).to_bytes(), self.context, c)
                    for c in sharers}
        uploaders = self.doing("upload", sharers)
        held = {r: {s: open_share(self.keys[r], ads[s], messages[s]) for s in self.sets[r] if s in messages}
                for r in uploaders}
        masked = {c: mask(plan.quantise(deltas[c], weights[c]), self.keys[c],
                          {m: ads[m] for m in self.sets[c] if m in messages}) for c in uploaders}
        dropped = set(sharers) - set(uploaders)
        reveals = {r: Reveal.parse(reveal(self.keys[r], held[r], uploaders, dropped).to_bytes(), self.context, r)
                   for r in self.doing("reveal", uploaders)}
        return unmask(masked, reveals, ads, self.sets, sharers, self.threshold, self.context), uploaders


def assert_weighted_mean(plan: QuantisationPlan, total: NDArray[np.uint32], survivors: list[str],
                         deltas: Mapping[str, Mapping[str, NDArray[np.generic]]], weights: Mapping[str, float]) -> None:
    sums, weight_sum = plan.dequantise(total)
    expected_weight = sum(weights[c] for c in survivors)
    assert weight_sum == pytest.approx(expected_weight, abs=len(survivors) / plan.weight_scale)
    bounds = plan.error_bound(weight_sum)
    for name in TEMPLATE:
        plain = sum(weights[c] * np.asarray(deltas[c][name], np.float64) for c in survivors) / expected_weight
        error = np.max(np.abs(sums[name] / weight_sum - plain))
        assert sums[name].shape == TEMPLATE[name].shape
        assert error <= bounds[name], f"{name}: error {error} beyond its bound {bounds[name]}"


def inputs(clients: list[str], seed: int = 0) -> tuple[dict[str, dict[str, NDArray[np.generic]]], dict[str, float]]:
    rng = np.random.default_rng(seed)
    return {c: random_delta(rng, 1.0) for c in clients}, {c: float(rng.uniform(0.05, 1.0)) for c in clients}


# --- share sets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "neighbours", "size"), [(10, 4, 5), (10, 3, 5), (30, 6, 7), (5, 4, 5), (5, 9, 5),
                                                           (6, 4, 5), (2, 1, 2)])
def test_share_sets_are_symmetric_sorted_and_sized(count: int, neighbours: int, size: int) -> None:
    clients = names(count)

    sets = share_sets(clients, neighbours, seed="r1")

    assert sorted(sets) == clients
    for client, members in sets.items():
        assert client in members and list(members) == sorted(members) and len(members) == min(size, count)
        assert all(client in sets[other] for other in members)


def test_share_sets_are_complete_when_neighbours_reach_everyone_and_seeded_otherwise() -> None:
    clients = names(12)

    complete, ring, again, other = (share_sets(clients, 11, "a"), share_sets(clients, 4, "a"),
                                    share_sets(clients, 4, "a"), share_sets(clients, 4, "b"))

    assert all(members == tuple(clients) for members in complete.values())
    assert ring == again and ring != other


@pytest.mark.parametrize(("clients", "neighbours"), [(["a", "a"], 2), (["a", "b"], 0), ([], 2)])
def test_share_sets_refuse_duplicates_and_no_neighbours(clients: list[str], neighbours: int) -> None:
    with pytest.raises(BadInputError):
        share_sets(clients, neighbours, "s")


# --- the full protocol --------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "neighbours", "threshold"), [(5, 4, 3), (10, 4, 3)])
def test_the_unmasked_sum_is_the_weighted_mean_within_the_quantisation_bound(count: int, neighbours: int,
                                                                             threshold: int) -> None:
    clients = names(count)
    deltas, weights = inputs(clients)
    plan = QuantisationPlan.for_model(TEMPLATE, clip_norm=1.0, max_clients=count)

    total, survivors = Round(clients, neighbours, threshold).run(deltas, weights, plan)

    assert survivors == clients
    assert_weighted_mean(plan, total, survivors, deltas, weights)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("count", "neighbours", "threshold", "stopping"), [
    (5, 4, 3, ["client-01", "client-03"]),  # complete graph: down to the threshold
    (10, 4, 3, ["client-02", "client-07"]),  # SecAgg+: two of a neighbourhood of five at most
])
def test_a_round_completes_with_clients_dropping_at_any_stage_down_to_the_threshold(
        stage: str, count: int, neighbours: int, threshold: int, stopping: list[str]) -> None:
    clients = names(count)
    deltas, weights = inputs(clients, seed=1)
    plan = QuantisationPlan.for_model(TEMPLATE, clip_norm=1.0, max_clients=count)
    round_ = Round(clients, neighbours, threshold, {c: stage for c in stopping})
    assert all(len(set(round_.sets[c]) - set(stopping)) >= threshold for c in clients)

    total, survivors = round_.run(deltas, weights, plan)

    expected = clients if stage == "reveal" else [c for c in clients if c not in stopping]
    assert survivors == expected
    assert_weighted_mean(plan, total, survivors, deltas, weights)


def test_clients_dropping_at_different_stages_together() -> None:
    clients = names(6)
    deltas, weights = inputs(clients, seed=2)
    plan = QuantisationPlan.for_model(TEMPLATE, clip_norm=1.0, max_clients=6)
    stops = {"client-00": "advertise", "client-02": "upload", "client-05": "reveal"}

    total, survivors = Round(clients, 5, 3, stops).run(deltas, weights, plan)

    assert survivors == ["client-01", "client-03", "client-04", "client-05"]
    assert_weighted_mean(plan, total, survivors, deltas, weights)


@pytest.mark.parametrize("stage", STAGES)
def test_one_client_below_the_threshold_fails_the_round_naming_the_counts(stage: str) -> None:
    clients = names(5)
    deltas, weights = inputs(clients)
    plan = QuantisationPlan.for_model(TEMPLATE, clip_norm=1.0, max_clients=5)
    round_ = Round(clients, 4, 3, {c: stage for c in ("client-00", "client-02", "client-04")})

    with pytest.raises(ThresholdNotMet, match=r"2 of 5 clients.*threshold 3"):
        round_.run(deltas, weights, plan)


# --- forged and replayed messages ---------------------------------------------------------------------


@dataclass
class Shared:
    """Three clients past the share stage: keys, advertisements, messages."""

    keys: dict[str, ClientKeys]
    ads: dict[str, Advertisement]
    messages: dict[str, SharesMessage]


def shared(context: Context = CONTEXT, clients: tuple[str, ...] = ("alpha", "bravo", "carol")) -> Shared:
    keys = {c: ClientKeys.derive(master(c), context, c) for c in clients}
    ads = {c: k.advertisement() for c, k in keys.items()}
    return Shared(keys, ads, {c: make_shares(keys[c], ads, clients, 2) for c in clients})


def with_entry(message: SharesMessage, recipient: str, sealed: str) -> SharesMessage:
    return message.model_copy(update={"ciphertexts": {**message.ciphertexts, recipient: sealed}})


def flipped(sealed: str, position: int) -> str:
    data = bytearray(base64.b64decode(sealed))
    data[position] ^= 1
    return base64.b64encode(bytes(data)).decode()


def test_a_share_opens_only_for_its_recipient_with_its_index() -> None:
    party = shared()

    share = open_share(party.keys["bravo"], party.ads["alpha"], party.messages["alpha"])

    assert share.sender == "alpha" and share.index == 2  # bravo's position in the sorted share set


@pytest.mark.parametrize("position", [0, 11, 12, 50, -1])  # nonce, ciphertext, tag
def test_an_altered_share_is_refused_naming_its_sender(position: int) -> None:
    party = shared()
    message = party.messages["alpha"]
    forged = with_entry(message, "bravo", flipped(message.ciphertexts["bravo"], position))

    with pytest.raises(SecAggRefused, match="alpha's share for bravo: fails authentication"):
        open_share(party.keys["bravo"], party.ads["alpha"], forged)


def test_a_share_forged_with_another_key_is_refused() -> None:
    party = shared()
    impostor = ClientKeys.derive(b"\x07" * 32, CONTEXT, "alpha")
    forged = make_shares(impostor, party.ads, ("alpha", "bravo", "carol"), 2)

    with pytest.raises(SecAggRefused, match="alpha's share for bravo: fails authentication"):
        open_share(party.keys["bravo"], party.ads["alpha"], forged)


@pytest.mark.parametrize("other", [Context("team-a/gtsrb", 2, 1), Context("team-a/gtsrb", 3, 2),
                                   Context("team-b/gtsrb", 3, 1)], ids=["round", "attempt", "training"])
def test_a_share_replayed_from_another_round_attempt_or_training_is_refused(other: Context) -> None:
    party, old = shared(), shared(other)
    replayed = old.messages["alpha"]
    relabelled = replayed.model_copy(update={"training": CONTEXT.training, "round": CONTEXT.round,
                                             "attempt": CONTEXT.attempt})

    with pytest.raises(SecAggRefused, match="stale or replayed"):
        open_share(party.keys["bravo"], party.ads["alpha"], replayed)
    with pytest.raises(SecAggRefused, match="alpha's share for bravo: fails authentication"):
        open_share(party.keys["bravo"], party.ads["alpha"], relabelled)
    with pytest.raises(SecAggRefused, match="stale or replayed"):
        SharesMessage.parse(replayed.to_bytes(), CONTEXT, "alpha")


@pytest.mark.parametrize(("source", "entry", "sender", "recipient"), [
    ("carol", "bravo", "alpha", "bravo"),  # carol's entry for bravo posted as alpha's
    ("alpha", "carol", "alpha", "bravo"),  # alpha's entry for carol handed to bravo
])
def test_an_entry_moved_to_another_sender_or_recipient_is_refused(source: str, entry: str, sender: str,
                                                                  recipient: str) -> None:
    party = shared()
    moved = with_entry(party.messages[sender], recipient, party.messages[source].ciphertexts[entry])

    with pytest.raises(SecAggRefused, match=f"{sender}'s share for {recipient}: fails authentication"):
        open_share(party.keys[recipient], party.ads[sender], moved)


def test_a_missing_entry_and_a_message_of_another_sender_are_refused() -> None:
    party = shared()
    empty = party.messages["alpha"].model_copy(update={"ciphertexts": {}})

    with pytest.raises(SecAggRefused, match="hold none for bravo"):
        open_share(party.keys["bravo"], party.ads["alpha"], empty)
    with pytest.raises(SecAggRefused, match="names sender 'carol'"):
        open_share(party.keys["bravo"], party.ads["alpha"], party.messages["carol"])
    with pytest.raises(SecAggRefused, match="name sender 'carol'"):
        SharesMessage.parse(party.messages["carol"].to_bytes(), CONTEXT, "alpha")


def test_make_shares_needs_threshold_advertised_members() -> None:
    party = shared(clients=("alpha", "bravo", "carol", "delta", "echo"))
    advertised = {c: party.ads[c] for c in ("alpha", "bravo")}

    with pytest.raises(ThresholdNotMet, match="alpha: 2 of 5 clients of its share set advertised keys, threshold 3"):
        make_shares(party.keys["alpha"], advertised, list(party.keys), 3)
    with pytest.raises(BadInputError, match="not in its own share set"):
        make_shares(party.keys["alpha"], party.ads, ["bravo", "carol"], 2)


def tamper(message: Reveal, kind: str, owner: str, change: str, which: int = 0) -> Reveal:
    """``message`` with ``owner``'s share of ``kind`` changed; ``which`` picks a different error per revealer.

    Identical errors in two shares can cancel in GF(2^128) (the combined secret is then right), so
    each tampering revealer flips other bits.
    """
    shares = dict(getattr(message, kind))
    data = bytearray(base64.b64decode(shares[owner]))
    if change == "index":
        data[1] ^= 3
    else:
        data[-1 - 5 * which] ^= 0x5B + 17 * which
    shares[owner] = base64.b64encode(bytes(data)).decode()
    return message.model_copy(update={kind: shares})


def tampered_round(kind: str, owner: str, stops: dict[str, str], change: str, revealers: tuple[str, ...]
                   ) -> tuple[Any, ...]:
    """Five clients, threshold 3; ``revealers`` reveal a wrong share of ``owner``'s ``kind``."""
    clients = names(5)
    round_ = Round(clients, 4, 3, stops)
    keys, sets = round_.keys, round_.sets
    ads = {c: k.advertisement() for c, k in keys.items()}
    messages = {c: make_shares(keys[c], ads, sets[c], 3) for c in clients}
    survivors = [c for c in clients if c not in stops]
    plan = QuantisationPlan.for_model(TEMPLATE, 1.0, 5)
    deltas, weights = inputs(clients)
    masked = {c: mask(plan.quantise(deltas[c], weights[c]), keys[c], ads) for c in survivors}
    reveals = {r: reveal(keys[r], {s: open_share(keys[r], ads[s], messages[s]) for s in clients}, survivors,
                         set(clients) - set(survivors)) for r in survivors}
    for which, revealer in enumerate(revealers):
        reveals[revealer] = tamper(reveals[revealer], kind, owner, change, which)
    return masked, reveals, ads, sets, clients, plan, deltas, weights, survivors


KINDS = [("seeds", "client-01", {}), ("masking_keys", "client-01", {"client-01": "upload"})]


@pytest.mark.parametrize(("kind", "owner", "stops"), KINDS)
def test_a_revealed_index_that_is_not_the_revealers_fails_unmasking_naming_it(kind: str, owner: str,
                                                                            stops: dict[str, str]) -> None:
    masked, reveals, ads, sets, clients, *_ = tampered_round(kind, owner, stops, "index", ("client-00",))
    with pytest.raises(SecAggRefused, match=f"client-00.*{owner}|{owner}.*client-00") as refused:
        unmask(masked, reveals, ads, sets, clients, 3, CONTEXT)
    assert not isinstance(refused.value, ThresholdNotMet)


@pytest.mark.parametrize(("kind", "owner", "stops"), KINDS)
def test_one_wrong_share_is_left_out_when_enough_others_reveal(kind: str, owner: str, stops: dict[str, str]) -> None:
    masked, reveals, ads, sets, clients, plan, _, weights, survivors = tampered_round(
        kind, owner, stops, "share", ("client-00",))
    _, weight_sum = plan.dequantise(unmask(masked, reveals, ads, sets, clients, 3, CONTEXT))
    assert weight_sum == pytest.approx(sum(weights[c] for c in survivors), abs=1e-6)


@pytest.mark.parametrize(("kind", "owner", "stops"), KINDS)
def test_too_many_wrong_shares_fail_unmasking_naming_the_revealers(kind: str, owner: str,
                                                                  stops: dict[str, str]) -> None:
    bad = ("client-00", "client-02", "client-03")  # every 3 of the revealers holds a wrong one
    masked, reveals, ads, sets, clients, *_ = tampered_round(kind, owner, stops, "share", bad)
    with pytest.raises(SecAggRefused, match=f"{owner}.*client-00.*too many of them revealed a wrong share") as refused:
        unmask(masked, reveals, ads, sets, clients, 3, CONTEXT)
    assert not isinstance(refused.value, ThresholdNotMet)


def test_unmask_refuses_an_upload_from_a_client_that_never_shared() -> None:
    party = shared()
    plan = QuantisationPlan.for_model(TEMPLATE, 1.0, 3)
    vector = np.zeros(plan.length, np.uint32)

    with pytest.raises(SecAggRefused, match="carol, who posted no shares"):
        unmask({c: vector for c in party.keys}, {}, party.ads, share_sets(list(party.keys), 2, "s"),
               ["alpha", "bravo"], 2, CONTEXT)


def test_reveal_refuses_a_sender_listed_both_surviving_and_dropped() -> None:
    party = shared()
    held = {s: open_share(party.keys["bravo"], party.ads[s], party.messages[s]) for s in party.keys}

    with pytest.raises(SecAggRefused, match="carol listed both as surviving and as dropped"):
        reveal(party.keys["bravo"], held, ["alpha", "carol"], ["carol"])
    done = reveal(party.keys["bravo"], held, ["alpha", "bravo"], ["carol"])
    assert sorted(done.seeds) == ["alpha", "bravo"] and sorted(done.masking_keys) == ["carol"]


def test_reveal_parse_refuses_both_shares_of_one_sender() -> None:
    party = shared()
    held = {s: open_share(party.keys["bravo"], party.ads[s], party.messages[s]) for s in party.keys}
    honest = reveal(party.keys["bravo"], held, ["alpha"], ["carol"])
    greedy = honest.model_copy(update={"masking_keys": {**honest.masking_keys, "alpha": honest.seeds["alpha"]}})

    with pytest.raises(SecAggRefused, match="reveals both shares of alpha"):
        Reveal.parse(greedy.to_bytes(), CONTEXT, "bravo")
    assert Reveal.parse(honest.to_bytes(), CONTEXT, "bravo") == honest


# --- advertisements -----------------------------------------------------------------------------------


def advertisement_json(**changes: object) -> bytes:
    value = json.loads(ClientKeys.derive(master("alpha"), CONTEXT, "alpha").advertisement().to_bytes())
    value.update(changes)
    return json.dumps(value).encode()


@pytest.mark.parametrize(("data", "reason"), [
    (advertisement_json(round=2), "round 2, attempt 1, not of 'team-a/gtsrb', round 3, attempt 1: stale or replayed"),
    (advertisement_json(attempt=2), "stale or replayed"),
    (advertisement_json(training="team-b/gtsrb"), "stale or replayed"),
    (advertisement_json(client="bravo"), "names client 'bravo'"),
    (advertisement_json(version=2), "version 2, this side speaks 1"),
    (advertisement_json(round="3"), "round: Input should be a valid integer"),
    (advertisement_json(extra="x"), "extra: Extra inputs are not permitted"),
    (advertisement_json(masking_key="!!!!"), "masking_key: String should match pattern"),
    (advertisement_json(masking_key="QUJD"), "masking key: 3 bytes, expected 32"),
    (advertisement_json(encryption_key="QUJD="), "encryption key: not canonical base64"),
    (advertisement_json(encryption_key="QUJDR"), "encryption key: not base64"),
    (advertisement_json(encryption_key=base64.b64encode(bytes(32)).decode()), "low-order X25519 point"),
    (advertisement_json(seed_commitment="0" * 63), "seed_commitment"),
    (advertisement_json(note="x" * ADVERTISEMENT_LIMIT), f"more than the {ADVERTISEMENT_LIMIT} allowed"),
    (b"[1, 2]", "Input should be an object"),
    (b"\xff", "Invalid JSON"),
], ids=["round", "attempt", "training", "client", "version", "string-round", "extra", "pattern", "short-key",
        "padding", "bad-base64", "low-order", "commitment", "oversize", "array", "not-json"])
def test_an_advertisement_is_refused_naming_the_client_and_why(data: bytes, reason: str) -> None:
    with pytest.raises(SecAggRefused, match="alpha's key advertisement") as refused:
        Advertisement.parse(data, CONTEXT, "alpha")
    assert reason in str(refused.value)


def test_an_advertisement_round_trips() -> None:
    advertisement = ClientKeys.derive(master("alpha"), CONTEXT, "alpha").advertisement()

    assert Advertisement.parse(advertisement.to_bytes(), CONTEXT, "alpha") == advertisement


# --- keys and labels ----------------------------------------------------------------------------------


def test_keys_are_derived_deterministically_per_context_and_client() -> None:
    first, again = (ClientKeys.derive(master("alpha"), CONTEXT, "alpha") for _ in range(2))
    others = [ClientKeys.derive(master("alpha"), context, "alpha")
              for context in (Context("team-a/gtsrb", 4, 1), Context("team-a/gtsrb", 3, 2),
                              Context("team-b/gtsrb", 3, 1))]
    others.append(ClientKeys.derive(master("alpha"), CONTEXT, "bravo"))

    assert first.advertisement() == again.advertisement() and first.self_seed == again.self_seed
    for other in others:
        ours, theirs = first.advertisement(), other.advertisement()
        assert ours.encryption_key != theirs.encryption_key and ours.masking_key != theirs.masking_key
        assert ours.seed_commitment != theirs.seed_commitment and first.self_seed != other.self_seed
    assert "self_seed" not in repr(first)


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_derive_needs_a_32_byte_master(size: int) -> None:
    with pytest.raises(BadInputError, match=f"32-byte master secret, got {size} bytes"):
        ClientKeys.derive(bytes(size), CONTEXT, "alpha")


def test_labels_are_unambiguous_and_bound_to_the_context() -> None:
    assert CONTEXT.label("ab", "c") != CONTEXT.label("a", "bc")
    assert Context("a", 12, 1).label() != Context("a1", 2, 1).label()
    assert CONTEXT.label("x") != Context("team-a/gtsrb", 3, 2).label("x")


@pytest.mark.parametrize(("training", "round_", "attempt"), [("", 1, 1), ("t", 0, 1), ("t", 1, 0)])
def test_a_context_needs_a_training_a_round_and_an_attempt(training: str, round_: int, attempt: int) -> None:
    with pytest.raises(BadInputError):
        Context(training, round_, attempt)


# --- masking ------------------------------------------------------------------------------------------


def test_a_masked_vector_neither_equals_nor_correlates_with_the_update_and_looks_uniform() -> None:
    party = shared(clients=("alpha", "bravo", "carol", "delta"))
    plan = QuantisationPlan.for_model({"w": np.zeros(99_999, np.float32)}, clip_norm=1.0, max_clients=4)
    ramp = np.linspace(-1.0, 1.0, 99_999) / np.sqrt(99_999 / 3)  # norm ~1, strongly structured
    vector = plan.quantise({"w": ramp}, 1.0)

    masked = mask(vector, party.keys["alpha"], party.ads)

    assert masked.shape == vector.shape and np.mean(masked == vector) < 1e-3
    assert abs(np.corrcoef(vector.astype(np.float64), masked.astype(np.float64))[0, 1]) < 0.01
    assert abs(np.corrcoef(ramp, masked[:-1].astype(np.float64))[0, 1]) < 0.01
    counts = np.bincount(masked >> 28, minlength=16)
    assert np.all(np.abs(counts - masked.size / 16) < 0.05 * masked.size / 16)


def test_pairwise_masks_cancel_and_the_self_masks_stay() -> None:
    party = shared()
    zero = np.zeros(1000, np.uint32)

    total = sum((mask(zero, party.keys[c], party.ads).astype(np.uint64) for c in party.keys), np.zeros(1000, np.uint64))

    assert np.any(total % 2**32 != 0)  # self masks remain until the seeds are revealed
    unmasked = unmask({c: mask(zero, party.keys[c], party.ads) for c in party.keys},
                      {c: reveal(party.keys[c], {s: open_share(party.keys[c], party.ads[s], party.messages[s])
                                                 for s in party.keys}, list(party.keys), []) for c in party.keys},
                      party.ads, share_sets(list(party.keys), 2, "s"), list(party.keys), 2, CONTEXT)
    np.testing.assert_array_equal(unmasked, zero)


def test_mask_refuses_anything_but_a_uint32_vector() -> None:
    party = shared()

    with pytest.raises(BadInputError, match="uint32"):
        mask(np.zeros(10, np.int64), party.keys["alpha"], party.ads)


# --- quantisation -------------------------------------------------------------------------------------


def test_quantisation_round_trips_negative_values_and_the_weight() -> None:
    plan = QuantisationPlan.for_model(TEMPLATE, clip_norm=2.0, max_clients=3)
    delta = {n: np.full(t.shape, -1.5, t.dtype) if t.dtype.kind == "f" else np.array(-7, np.int64)
             for n, t in TEMPLATE.items()}

    sums, weight = plan.dequantise(plan.quantise(delta, 0.5))

    assert plan.length == sum(t.size for t in TEMPLATE.values()) + 1 and weight == pytest.approx(0.5)
    bounds = plan.error_bound(1.0)
    for name, value in delta.items():
        np.testing.assert_allclose(sums[name], 0.5 * value.astype(np.float64), rtol=0, atol=bounds[name])


def test_the_sum_of_max_clients_values_at_the_bound_never_wraps() -> None:
    plan = QuantisationPlan.for_model(TEMPLATE, clip_norm=0.3, max_clients=7)
    for sign in (1.0, -1.0):
        delta = {n: np.full(t.shape, sign * (0.3 if t.dtype.kind == "f" else 2.0**16)) for n, t in TEMPLATE.items()}
        vectors = [plan.quantise(delta, 1.0) for _ in range(7)]
        total = np.zeros(plan.length, np.uint32)
        for vector in vectors:
            total += vector

        sums, weight = plan.dequantise(total)

        assert weight == pytest.approx(7.0)
        for name, value in delta.items():
            np.testing.assert_allclose(sums[name], 7 * value, rtol=1e-6)


@pytest.mark.parametrize(("name", "value", "reason"), [
    ("classifier.bias", 1.5, "weighted value 1.5 at flat index 2 is outside the quantisation range ±1.0"),
    ("classifier.bias", np.nan, "weighted value nan"),
    ("features.1.running_var", -np.inf, "weighted value -inf"),
    ("features.1.num_batches_tracked", 70_000, "±65536.0, set by the integer range"),
])
def test_quantise_refuses_values_outside_the_range_naming_the_tensor(name: str, value: float, reason: str) -> None:
    plan = QuantisationPlan.for_model(TEMPLATE, clip_norm=1.0, max_clients=3)
    delta = {n: np.zeros(t.shape, t.dtype) for n, t in TEMPLATE.items()}
    delta[name] = np.asarray(delta[name], np.float64)
    delta[name].reshape(-1)[2 if delta[name].ndim else 0] = value

    with pytest.raises(QuantisationRangeError, match=f"tensor {name}") as refused:
        plan.quantise(delta, 1.0)
    assert reason in str(refused.value)
    if TEMPLATE[name].dtype.kind == "f":
        assert "clip norm (privacy.clipNorm)" in str(refused.value)


@pytest.mark.parametrize("weight", [0.0, -0.1, 1.5, float("nan")])
def test_quantise_refuses_a_weight_outside_0_1(weight: float) -> None:
    plan = QuantisationPlan.for_model(TEMPLATE, clip_norm=1.0, max_clients=3)

    with pytest.raises(QuantisationRangeError, match="weight"):
        plan.quantise({n: np.zeros(t.shape, t.dtype) for n, t in TEMPLATE.items()}, weight)


@pytest.mark.parametrize(("change", "reason"), [("missing", "missing \\['classifier.bias'\\]"),
                                                ("extra", "unknown \\['other'\\]"), ("shape", "has shape \\(6,\\)")])
def test_quantise_refuses_a_delta_of_another_model(change: str, reason: str) -> None:
    plan = QuantisationPlan.for_model(TEMPLATE, clip_norm=1.0, max_clients=3)
    delta: dict[str, NDArray[np.generic]] = {n: np.zeros(t.shape, t.dtype) for n, t in TEMPLATE.items()}
    if change == "missing":
        del delta["classifier.bias"]
    elif change == "extra":
        delta["other"] = np.zeros(1)
    else:
        delta["classifier.bias"] = np.zeros(6, np.float32)

    with pytest.raises(BadDataError, match=reason):
        plan.quantise(delta, 1.0)


def test_scales_follow_from_clip_norm_and_clients() -> None:
    plan = QuantisationPlan.for_model(TEMPLATE, clip_norm=2.0, max_clients=10)

    scales = dict(zip(plan.names, plan.scales, strict=True))

    assert plan.names == tuple(sorted(TEMPLATE))
    assert scales["classifier.bias"] == (2**31 - 1) // 10 // 2 and scales["features.1.num_batches_tracked"] == 3276
    assert plan.weight_scale == (2**31 - 1) // 10


@pytest.mark.parametrize(("template", "clip", "clients"), [
    ({"mask": np.zeros(3, bool)}, 1.0, 3), ({}, 1.0, 3), (TEMPLATE, 0.0, 3), (TEMPLATE, float("inf"), 3),
    (TEMPLATE, 1.0, 0), (TEMPLATE, 1e9, 10),
])
def test_for_model_refuses_what_it_cannot_quantise(template: Mapping[str, NDArray[np.generic]], clip: float,
                                                  clients: int) -> None:
    with pytest.raises(BadInputError):
        QuantisationPlan.for_model(template, clip, clients)


def test_dequantise_refuses_a_vector_of_another_plan() -> None:
    plan = QuantisationPlan.for_model(TEMPLATE, clip_norm=1.0, max_clients=3)

    with pytest.raises(BadDataError, match="uint32"):
        plan.dequantise(np.zeros(plan.length + 1, np.uint32))


def test_share_repr_hides_the_secret_halves() -> None:
    share = Share("alpha", 1, (b"m" * 16, b"m" * 16), (b"s" * 16, b"s" * 16))

    assert "mmmm" not in repr(share) and "ssss" not in repr(share)
