"""Secure aggregation's worker side: each client's stages and the aggregation of the masked sum, over the store.

The protocol's mathematics and messages are in `fedtrain.worker.secagg`; this module moves them
through a training's store (`Layout.secure_message`) and ties them to the round: a client's
master secret (never in the store), the roster the engine fixed for each stage (``advertised``,
``shared``, ``survivors``), the model's delta and weight, the strategy that takes the mean.

Every stage is idempotent: keys are derived from the master secret and the round's context, so a
task run again writes the same advertisement; a client whose masked update is already in the store
does not mask a second update with the same masks (the difference of two would show).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from fedtrain.contract.errors import BadDataError, BadInputError, SecureRoundError
from fedtrain.contract.secmessages import round_share_sets
from fedtrain.contract.secrets import MASTER_SECRET_BYTES
from fedtrain.contract.sitetask import SUM_STRATEGIES
from fedtrain.contract.storage import Store
from fedtrain.contract.tensorfile import MASKED_HEADER_LIMIT, MASKED_TENSOR
from fedtrain.worker.secagg import (
    ADVERTISEMENT_LIMIT,
    REVEAL_LIMIT,
    SHARES_LIMIT,
    Advertisement,
    ClientKeys,
    Context,
    QuantisationPlan,
    Reveal,
    SecAggRefused,
    Share,
    SharesMessage,
    make_shares,
    mask,
    open_share,
    reveal,
    unmask,
)
from fedtrain.worker.strategies.arrays import cast_like
from fedtrain.worker.strategies.protocol import Aggregate, Strategy
from fedtrain.worker.weights import Weights, write_json


@dataclass(frozen=True)
class SecureRound:
    """One attempt of a secure round as the engine fixed it: who advertised, who shared, whose update counts."""

    training: str
    round: int
    attempt: int
    threshold: int
    neighbours: int | None
    clip_norm: float
    seed: int = 0
    weight_unit: int = 1  # examples per unit of weight: a client's weight is its examples / weight_unit (DP: 1)
    advertised: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()
    survivors: tuple[str, ...] = ()
    revealed: tuple[str, ...] = ()  # whose reveals the aggregation reads (empty: every client that shared)

    @property
    def context(self) -> Context:
        """What every key and message of this round attempt is bound to."""
        return Context(self.training, self.round, self.attempt)

    def share_set(self, client: str) -> tuple[str, ...]:
        """The clients ``client`` shares its secrets with and masks against (itself included)."""
        return self.sets().get(client, ())

    def sets(self) -> dict[str, tuple[str, ...]]:
        """Every advertised client's share set: SecAgg+'s graph over the clients that advertised keys."""
        return round_share_sets(self.advertised, self.neighbours, self.seed, self.round, self.attempt)


def master_secret(path: Path, create: bool = True) -> bytes:
    """A client's 32-byte master secret at ``path``, made once (mode 0600) by whichever task needs it first.

    It never enters the store: every round's keys derive from it, so whoever reads it can unmask
    that client's updates. ``create=False``: someone else made it (on Kubernetes, a key of the
    training's Secret mounted read-only), so it is only read, and a missing one is bad input.
    """
    if not create:
        try:
            return _checked_secret(path, path.read_bytes())
        except FileNotFoundError:
            raise BadInputError(f"--secret-file {path} does not exist: with --secret-provided the client's secret is "
                                "given (a mounted Secret's key), never made here") from None
    if not path.parent.is_dir():
        raise BadInputError(f"--secret-file {path}: its folder does not exist")
    # Written whole beside it, then linked into place, which fails if a secret is there already: a task
    # killed mid-write, or a second task of the client at the same moment, never leaves a short secret.
    secret = os.urandom(MASTER_SECRET_BYTES)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as out:
            out.write(secret)
            out.flush()
            os.fsync(out.fileno())
        os.link(draft, path)
    except FileExistsError:
        return _checked_secret(path, path.read_bytes())
    finally:
        draft.unlink(missing_ok=True)
    return secret


def _checked_secret(path: Path, secret: bytes) -> bytes:
    if len(secret) != MASTER_SECRET_BYTES:
        raise BadInputError(f"{path}: a secure-aggregation secret is {MASTER_SECRET_BYTES} bytes, this one "
                            f"{len(secret)}; remove it only if no round of this training is in flight")
    return secret


class Messages:
    """The round's messages in a store: each read bounded and parsed against the round's context."""

    def __init__(self, store: Store, layout: Any, secure: SecureRound) -> None:
        self.store, self.layout, self.secure = store, layout, secure

    def key(self, client: str, name: str) -> str:
        """Where ``client`` keeps message ``name`` of this round attempt."""
        return str(self.layout.secure_message(self.secure.round, self.secure.attempt, client, name))

    def write(self, client: str, name: str, data: bytes) -> str:
        """Write ``client``'s message ``name``; its key."""
        key = self.key(client, name)
        self.store.write_bytes(key, data)
        return key

    def advertisement(self, client: str) -> Advertisement:
        """``client``'s public keys for the round attempt."""
        return Advertisement.parse(self.store.read_bounded(self.key(client, "keys.json"), ADVERTISEMENT_LIMIT),
                                   self.secure.context, client)

    def advertisements(self, clients: tuple[str, ...]) -> dict[str, Advertisement]:
        """The advertisements of ``clients``, each of which the engine saw arrive (one missing is bad data)."""
        return {client: self.advertisement(client) for client in clients}

    def shares(self, sender: str) -> SharesMessage:
        """The encrypted shares ``sender`` sent to its share set."""
        return SharesMessage.parse(self.store.read_bounded(self.key(sender, "shares.json"), SHARES_LIMIT),
                                   self.secure.context, sender)

    def reveal(self, client: str) -> Reveal:
        """The shares ``client`` revealed for the unmasking."""
        return Reveal.parse(self.store.read_bounded(self.key(client, "reveal.json"), REVEAL_LIMIT),
                            self.secure.context, client)


def advertise(messages: Messages, client: str, master: bytes) -> dict[str, Any]:
    """Stage 1: publish this round attempt's public keys (the same bytes however often it runs)."""
    keys = ClientKeys.derive(master, messages.secure.context, client)
    key = messages.write(client, "keys.json", keys.advertisement().to_bytes())
    return {"client": client, "advertised": key}


def share(messages: Messages, client: str, master: bytes) -> dict[str, Any]:
    """Stage 2: encrypted Shamir shares of this client's mask secrets, one for each member of its share set."""
    secure = messages.secure
    if client not in secure.advertised:
        raise BadInputError(f"{client} is not among the clients that advertised keys (--advertised)")
    keys = own_keys(messages, client, master)
    key = messages.key(client, "shares.json")
    if messages.store.exists(key):  # written once: Shamir's coefficients are random, and two versions of one
        message = messages.shares(client)  # secret's shares must never be out at once
        return {"client": client, "shares": key, "recipients": len(message.ciphertexts), "already_shared": True}
    members = secure.share_set(client)
    message = make_shares(keys, messages.advertisements(members), members, secure.threshold)
    messages.write(client, "shares.json", message.to_bytes())
    return {"client": client, "shares": key, "recipients": len(message.ciphertexts)}


def plan_for(template: Weights, secure: SecureRound) -> QuantisationPlan:
    """The fixed-point plan every client and the aggregator derive alike: from the model, the clip norm, the roster."""
    return QuantisationPlan.for_model(template, secure.clip_norm, max(len(secure.shared), 1))


def masked_key_exists(messages: Messages, client: str) -> bool:
    """Whether this client already uploaded its masked update for the round attempt (then it must not again)."""
    return messages.store.exists(messages.key(client, "masked.safetensors"))


# What a masked update's sidecar keeps of a training's sidecar: nothing that tells its example count (a count,
# a split's size, seconds times images per second) or its update (the norm before clipping). Means only.
PUBLIC_FIELDS = ("client", "round", "base_sha256", "train_config", "metrics")
PUBLIC_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def uploader(messages: Messages, client: str, master: bytes, equal_weights: bool
             ) -> Callable[[Weights, Weights, int, dict[str, Any]], dict[str, Any]]:
    """The training's upload step for a secure round: weigh, mask and write instead of writing the update."""
    unit = messages.secure.weight_unit

    def upload(base: Weights, trained: Weights, examples: int, sidecar: dict[str, Any]) -> dict[str, Any]:
        if not equal_weights and not 1 <= examples <= unit:
            raise BadDataError(f"{client} trained on {examples} examples; a secure round weighs at most {unit} "
                               "(clients.maxExamples, or the client's clients.list[].maxExamples)")
        weight = 1.0 if equal_weights else examples / unit
        kept = {k: v for k, v in sidecar.items() if k in PUBLIC_FIELDS}
        kept["metrics"] = {k: v for k, v in sidecar.get("metrics", {}).items() if k in PUBLIC_METRICS}
        return upload_masked(messages, client, master, base, trained, weight, kept)

    return upload


def own_keys(messages: Messages, client: str, master: bytes) -> ClientKeys:
    """A client's keys for the round attempt, checked against the advertisement it published.

    A secret made again after the keys stage (a lost file) would mask with keys nobody else knows and
    leave a sum no share can unmask: the task fails instead, and the round goes on without it.
    """
    keys = ClientKeys.derive(master, messages.secure.context, client)
    if messages.advertisement(client) != keys.advertisement():
        raise BadInputError(f"{client}'s secret does not derive the keys it advertised for round "
                            f"{messages.secure.round} (attempt {messages.secure.attempt}): it changed since; "
                            "restore it, or let the client drop out of this round")
    return keys


def upload_masked(messages: Messages, client: str, master: bytes, base: Weights, trained: Weights,
                  weight: float, sidecar: dict[str, Any]) -> dict[str, Any]:
    """Stage 3: the clipped delta, weighted and quantised, masked against the clients that shared, uploaded.

    The example count travels inside the masked vector (its last element), so the coordinator only
    ever learns the round's total.
    """
    secure = messages.secure
    if client not in secure.shared:
        raise BadInputError(f"{client} is not among the clients that shared their secrets (--peers)")
    keys = own_keys(messages, client, master)
    delta = clipped_delta(base, trained, secure.clip_norm)
    plan = plan_for(base, secure)
    vector = plan.quantise(delta, weight)
    members = [c for c in secure.share_set(client) if c in secure.shared]
    masked = mask(vector, keys, messages.advertisements(tuple(members)))
    key = messages.write(client, "masked.safetensors", save_safetensors({MASKED_TENSOR: masked}))
    write_json(messages.store, key.removesuffix(".safetensors") + ".json", sidecar)
    return {**sidecar, "masked": key, "length": int(masked.size)}


def clipped_delta(base: Weights, trained: Weights, clip_norm: float) -> dict[str, NDArray[np.float64]]:
    """Trained minus base for every tensor (integers too), the float tensors scaled to L2 norm at most ``clip_norm``."""
    delta = {name: np.asarray(trained[name], np.float64) - np.asarray(base[name], np.float64) for name in base}
    norm = math.sqrt(sum(float(np.sum(np.square(d))) for name, d in delta.items() if base[name].dtype.kind == "f"))
    if not math.isfinite(norm):
        raise BadDataError("the trained model's update has NaN or Inf: it is not masked nor sent")
    if norm > clip_norm:
        scale = clip_norm / norm
        delta = {name: d * scale if base[name].dtype.kind == "f" else d for name, d in delta.items()}
    return delta


def reveal_shares(messages: Messages, client: str, master: bytes) -> dict[str, Any]:
    """Stage 4: open the shares sent to this client; reveal seeds of survivors, masking keys of the dropped.

    A share that fails authentication (forged, or replayed from another round or training) is left
    out and named: the others' shares may still reach the threshold. Written once per round attempt:
    a task run again, even with another roster, reveals nothing more (a second reveal under other
    survivors would hand out the other share of a sender and unmask its update).
    """
    secure = messages.secure
    if messages.store.exists(messages.key(client, "reveal.json")):
        earlier = messages.reveal(client)
        return {"client": client, "reveal": messages.key(client, "reveal.json"),
                "opened": sorted({*earlier.seeds, *earlier.masking_keys}), "refused": {}, "already_revealed": True}
    keys = own_keys(messages, client, master)
    members = [c for c in secure.share_set(client) if c in secure.shared]
    opened: dict[str, Share] = {}
    refused: dict[str, str] = {}
    for sender in members:
        try:
            opened[sender] = open_share(keys, messages.advertisement(sender), messages.shares(sender))
        except SecAggRefused as error:
            refused[sender] = str(error)[:300]
    dropped = [c for c in secure.shared if c not in secure.survivors]
    key = messages.write(client, "reveal.json", reveal(keys, opened, secure.survivors, dropped).to_bytes())
    return {"client": client, "reveal": key, "opened": sorted(opened), "refused": refused}


def read_masked(messages: Messages, client: str, length: int) -> NDArray[np.uint32]:
    """A survivor's masked vector: read with the bound its length sets, exactly one uint32 tensor of that length."""
    key = messages.key(client, "masked.safetensors")
    data = messages.store.read_bounded(key, 4 * length + MASKED_HEADER_LIMIT)
    try:
        tensors = load_safetensors(data)
    except Exception as error:  # the parser's errors are not one type: any failure is this file's
        raise BadDataError(f"{messages.store.describe(key)}: not a safetensors file ({error})") from error
    vector = tensors.get(MASKED_TENSOR)
    if set(tensors) != {MASKED_TENSOR} or vector is None or vector.dtype != np.uint32 or vector.shape != (length,):
        raise BadDataError(f"{messages.store.describe(key)}: holds {sorted(tensors)[:3]}, not one uint32 tensor "
                           f"{MASKED_TENSOR!r} of {length} elements")
    return vector


@dataclass(frozen=True)
class SecureMean:
    """The unmasked round: the example-weighted (or equal-weighted) mean of the survivors' updates, and its error."""

    current: Weights
    mean_delta: dict[str, NDArray[np.float64]]
    weight_sum: float
    error_bound: float

    def weighted_mean(self) -> Weights:
        """The new global model as FedAvg gives it: the current one plus the mean delta."""
        return cast_like({name: np.asarray(self.current[name], np.float64) + self.mean_delta[name]
                          for name in self.current}, self.current)


def secure_mean(messages: Messages, current: Weights) -> tuple[SecureMean, dict[str, Any]]:
    """Read the survivors' masked vectors and everyone's reveals, remove the masks, and divide the sum.

    Anything that keeps the sum from being recovered (fewer shares than the threshold, a share that
    does not reconstruct its owner's advertised key, a vector of the wrong size) fails the round
    with `SecureRoundError`, naming it; a single unreadable reveal is left out first.
    """
    secure = messages.secure
    plan = plan_for(current, secure)
    try:
        masked = {c: read_masked(messages, c, plan.length) for c in secure.survivors}
        reveals: dict[str, Reveal] = {}
        skipped: dict[str, str] = {}
        for client in secure.revealed or secure.shared:  # a client whose unmask task failed may have written one
            try:
                reveals[client] = messages.reveal(client)
            except (BadDataError, FileNotFoundError) as error:
                skipped[client] = str(error)[:300]
        total = unmask(masked, reveals, messages.advertisements(secure.shared), secure.sets(), secure.shared,
                       secure.threshold, secure.context)
        summed, weight_sum = plan.dequantise(total)
    except BadDataError as error:
        raise SecureRoundError(f"round {secure.round}: {error}") from error
    if not weight_sum > 0:
        raise SecureRoundError(f"round {secure.round}: the unmasked weights sum to {weight_sum:.6g}, not a positive "
                               "number: a masked vector or a share is wrong")
    bounds = plan.error_bound(weight_sum)
    mean = SecureMean(current, {name: values / weight_sum for name, values in summed.items()}, weight_sum,
                      max(bounds.values(), default=0.0))
    check_sum(mean, secure, current)
    details = {"secure_aggregation": {"survivors": list(secure.survivors), "shared": list(secure.shared),
                                      "reveals": sorted(reveals), "reveals_left_out": skipped,
                                      "weight_sum": weight_sum, "quantisation_error_bound": mean.error_bound}}
    return mean, details


def check_sum(mean: SecureMean, secure: SecureRound, current: Weights) -> None:
    """Refuse a sum no honest round can give: weights over one a client, or a mean past the clip norm.

    Each survivor's weight is at most 1 and its clipped delta's norm at most ``clipNorm``, so the
    weight sum is at most the number of survivors and the mean's norm at most ``clipNorm`` (up to
    the quantisation error). A wrapped sum, a mask that did not cancel or a hostile vector lands far
    outside: the round fails naming it instead of moving the model.
    """
    survivors = len(secure.survivors)
    if mean.weight_sum > survivors * (1 + 1e-6) + 1e-6:
        raise SecureRoundError(f"round {secure.round}: the unmasked weights sum to {mean.weight_sum:.6g}, more than "
                               f"the {survivors} survivors can (at most 1 each): a masked vector or a share is wrong")
    floats = [name for name in current if current[name].dtype.kind == "f"]
    norm = math.sqrt(sum(float(np.sum(np.square(mean.mean_delta[name]))) for name in floats))
    slack = mean.error_bound * math.sqrt(sum(mean.mean_delta[name].size for name in floats))
    if not norm <= secure.clip_norm + slack + 1e-9:
        raise SecureRoundError(f"round {secure.round}: the unmasked mean update's norm is {norm:.6g}, past the "
                               f"{secure.clip_norm:g} every client clips to (privacy.clipNorm): a masked vector or a "
                               "share is wrong")


def add_noise(new: Weights, clip_norm: float, survivors: int, noise_multiplier: float,
              rng: np.random.Generator) -> Weights:
    """Central DP on the unmasked mean of equally weighted clipped updates: N(0, (z·C/m)²) on each float tensor."""
    std = noise_multiplier * clip_norm / survivors
    return {name: (value.astype(np.float64) + rng.normal(0.0, std, value.shape)).astype(value.dtype)
            if value.dtype.kind == "f" else value for name, value in new.items()}


def secure_aggregate(messages: Messages, current: Weights, strategy: Strategy, state: Weights) -> Aggregate:
    """The round's new model from the masked sum alone: FedAvg, FedProx or a server optimiser acts on its mean."""
    if strategy.name not in SUM_STRATEGIES:
        raise BadInputError(f"--strategy {strategy.name} reads each update; secure aggregation shows only their sum "
                            f"(use {', '.join(SUM_STRATEGIES)})")
    mean, details = secure_mean(messages, current)
    outcome = strategy.aggregate(current, mean, state)  # type: ignore[arg-type,unused-ignore]  # weighted_mean() only
    outcome.details.update(details)
    return outcome


# --- command line ---------------------------------------------------------------------------------


def add_secure_options(parser: argparse.ArgumentParser, client: bool = True) -> None:
    """The options a secure round's task takes (`fedtrain.tasks.secure_arguments` writes them)."""
    group = parser.add_argument_group("secure aggregation (privacy.secureAggregation)")
    group.add_argument("--training-id", default=None, help="the training's identity every key is bound to; "
                       "setting it makes the task a secure round's")
    group.add_argument("--round-attempt", type=int, default=1, help="the attempt of the round (new keys each)")
    group.add_argument("--threshold", type=int, default=2)
    group.add_argument("--neighbours", type=int, default=None, help="SecAgg+ neighbours (default: every client)")
    group.add_argument("--secure-clip-norm", type=float, default=None,
                       help="L2 bound of each update (privacy.clipNorm)")
    group.add_argument("--secure-seed", type=int, default=0, help="seed of the share graph (spec.seed)")
    group.add_argument("--weight-unit", type=int, default=1, help="examples per unit of weight")
    group.add_argument("--equal-weights", action="store_true", help="weigh each update 1 (central DP)")
    group.add_argument("--advertised", default="", help="clients that advertised keys (comma-separated)")
    group.add_argument("--peers", default="", help="clients that shared their secrets (comma-separated)")
    group.add_argument("--survivors", default="", help="clients whose masked updates count (comma-separated)")
    group.add_argument("--revealed", default="", help="clients whose reveals the aggregation reads: those whose "
                       "unmask task succeeded (comma-separated; default: every client that shared)")
    if client:
        group.add_argument("--secret-file", type=Path, default=None, help="this client's master secret (made once)")
        group.add_argument("--secret-provided", action="store_true",
                           help="the secret file is given (a mounted Secret's key): read it, never make it")


def _listed(text: str) -> tuple[str, ...]:
    return tuple(name for name in text.split(",") if name)


def secure_round_of(args: argparse.Namespace, round_number: int) -> SecureRound | None:
    """The secure round the options describe, or None for a plain task (no --training-id)."""
    if args.training_id is None:
        return None
    if args.secure_clip_norm is None or not args.secure_clip_norm > 0:
        raise BadInputError("--secure-clip-norm must be given and > 0 (privacy.clipNorm) for a secure round")
    if args.threshold < 2:
        raise BadInputError(f"--threshold must be >= 2, got {args.threshold}")
    if args.weight_unit < 1:
        raise BadInputError(f"--weight-unit must be >= 1, got {args.weight_unit}")
    return SecureRound(args.training_id, round_number, args.round_attempt, args.threshold, args.neighbours,
                       args.secure_clip_norm, args.secure_seed, args.weight_unit, _listed(args.advertised),
                       _listed(args.peers), _listed(args.survivors), _listed(args.revealed))


def secret_of(args: argparse.Namespace) -> bytes:
    """The client's master secret (--secret-file), made on first use unless it is provided (--secret-provided)."""
    if args.secret_file is None:
        raise BadInputError("--secret-file is required: a client's secure-aggregation secret lives outside the store")
    return master_secret(args.secret_file, create=not args.secret_provided)


def run_stage(args: argparse.Namespace, store: Store, layout: Any) -> dict[str, Any]:
    """``fedtrain-worker secure keys|shares|unmask``: one client's stage of a secure round."""
    secure = secure_round_of(args, args.round)
    if secure is None:
        raise BadInputError("secure stages need --training-id and the round's settings")
    messages = Messages(store, layout, secure)
    stage = {"keys": advertise, "shares": share, "unmask": reveal_shares}[args.stage]
    return stage(messages, args.client, secret_of(args))
