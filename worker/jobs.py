"""What each worker command does: init, train, aggregate, evaluate, predict.

Every command reads and writes only the training's store (see `layout` and `storage`: a
directory or an S3 prefix) and the data set, so a Kubernetes Job and a local subprocess run them
identically. Each one is idempotent: run again with
the same arguments, it rewrites the same files atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from fedtrain.contract.errors import BadDataError, BadInputError, NonFiniteModelError
from fedtrain.contract.layout import Layout, client_names
from fedtrain.contract.sitetask import DEFAULT_MAX_WEIGHT_OVER_MEDIAN, ExampleBounds
from fedtrain.contract.storage import Store, iterate_keys, open_store
from fedtrain.worker import secure as secure_rounds
from fedtrain.worker.data.decoded import DecodedShard, ShardKey, cache_directory, decoded_shard
from fedtrain.worker.data.gtsrb import GtsrbTree, Sample, load_tree, sign_names, split_by_track
from fedtrain.worker.data.images import load_image, load_samples
from fedtrain.worker.data.partition import Partition, PartitionConfig, partition_samples
from fedtrain.worker.data.synth import SynthConfig, generate
from fedtrain.worker.models import ModelConfig, build_model
from fedtrain.worker.strategies import UpdateFile, UpdateSet, make_strategy
from fedtrain.worker.strategies.privacy import clip, epsilon, private_mean
from fedtrain.worker.strategies.protocol import Aggregate, Strategy
from fedtrain.worker.strategies.validation import non_finite_tensor
from fedtrain.worker.training import (
    Evaluation,
    TrainConfig,
    evaluate,
    load_numpy_state,
    predict_proba,
    state_to_numpy,
    train_local,
)
from fedtrain.worker.weights import Weights, read_json, read_weights, read_weights_file, save_weights, write_json

TERMINATION_MESSAGE_LIMIT = 4096  # bytes Kubernetes keeps of /dev/termination-log


@dataclass(frozen=True)
class DataConfig:
    """Where the data set is and how its images are read."""

    path: str
    roi_crop: bool = True
    validation_fraction: float = 0.1


def pick_device(name: str) -> torch.device:
    """``auto`` takes a GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise BadInputError(f"--device {name!r} is not a torch device (use auto, cpu or cuda)") from error


# --- init -----------------------------------------------------------------------------------------


def init(store: Store, data: DataConfig | None, model: ModelConfig, partition: PartitionConfig,
         synth: SynthConfig | None, seed: int, names: tuple[str, ...] = (), own_data: tuple[str, ...] = ()
         ) -> dict[str, Any]:
    """Generate synthetic data if asked, partition the training split, write the round-0 model.

    ``names`` renames the clients (default ``client-00``...); their number must match. Clients in
    ``own_data`` bring their own data set, so the training split is dealt out among the others only.
    ``data`` None: the coordinator holds no data at all (every client is a site and nothing is
    scored centrally), so nothing is read and the partition is empty.
    """
    model.check()
    layout = Layout()
    if data is None and synth is not None:
        raise BadInputError("--no-data and --synthetic-per-class exclude each other: a synthetic set needs --data")
    shared = _shared_clients(partition, names, own_data, data is not None)
    settings = {"data": asdict(data) if data else None, "model": model.to_json(), "seed": seed,
                "client_names": list(names), "partition_config": asdict(partition),
                "synthetic": asdict(synth) if synth else None}
    if own_data:  # only then, so that trainings initialised before the option compare equal
        settings["own_data_clients"] = list(own_data)
    if store.exists(layout.manifest):  # checked before anything is generated or written
        existing = read_json(store, layout.manifest)
        if existing.get("settings") != settings:
            raise BadInputError(
                f"{store.location} is already initialised with other settings; use a new work directory "
                "(nothing was overwritten)"
            )
        if store.exists(layout.global_weights(0)):
            return existing
    manifest: dict[str, Any] = {"settings": settings, "layout": None, "num_train_samples": 0,
                                "partition": Partition(partition.scheme, partition.alpha, partition.seed,
                                                       model.num_classes).to_json()}
    if data is not None:
        manifest.update(_partition_data(data, model, partition, synth, shared))
    torch.manual_seed(seed)
    network = build_model(model)
    save_weights(store, layout.global_weights(0), state_to_numpy(network),
                 {"round": 0, "model": model.to_json(), "num_examples": 0})
    write_json(store, layout.manifest, manifest)
    return manifest


def _shared_clients(partition: PartitionConfig, names: tuple[str, ...], own_data: tuple[str, ...], has_data: bool
                    ) -> list[str]:
    """The clients that share the coordinator's data set (the partition's), after checking the names."""
    if names and len(names) != partition.num_clients:
        raise BadInputError(f"--client-names lists {len(names)} names for --clients {partition.num_clients}")
    every = names or tuple(client_names(partition.num_clients))
    unknown = sorted(set(own_data) - set(every))
    if unknown:
        raise BadInputError(f"--own-data-clients names {unknown[0]!r}, which is not a client")
    shared = [n for n in every if n not in own_data]
    if not has_data and shared:
        raise BadInputError(f"--no-data leaves client {shared[0]!r} without data: list every client in "
                            "--own-data-clients (sites bring their own), or give --data")
    return shared


def _partition_data(data: DataConfig, model: ModelConfig, partition: PartitionConfig, synth: SynthConfig | None,
                    shared: list[str]) -> dict[str, Any]:
    """Generate the synthetic set if asked, index the data set and deal its training split out among ``shared``."""
    if synth is not None:
        generate(Path(data.path), synth)
    tree = load_tree(Path(data.path), model.num_classes, need_test=False)
    result = Partition(partition.scheme, partition.alpha, partition.seed, model.num_classes)
    if shared:
        result = partition_samples(tree.train, replace(partition, num_clients=len(shared)), model.num_classes)
        result.clients = dict(zip(shared, result.clients.values(), strict=True))
        result.histograms = dict(zip(shared, result.histograms.values(), strict=True))
    return {"layout": tree.layout, "num_train_samples": len(tree.train), "partition": result.to_json()}


@dataclass(frozen=True)
class Workspace:
    """A work directory's manifest, read and typed."""

    store: Store
    model: ModelConfig
    data: DataConfig
    partition: Partition
    seed: int
    synthetic: SynthConfig | None = None
    sites: frozenset[str] = frozenset()  # clients that are other organisations' sites (updates in their folders)

    @classmethod
    def open(cls, location: str | Path, data_path: str | None = None) -> Workspace:
        """Read ``manifest.json``; ``data_path`` overrides where this process finds the data set."""
        store = open_store(str(location))
        if not store.exists(Layout().manifest):
            raise BadInputError(f"{store.describe(Layout().manifest)} does not exist; run 'fedtrain-worker init' "
                                "first")
        manifest = read_json(store, Layout().manifest)
        settings = manifest["settings"]
        data = DataConfig(**settings["data"]) if settings.get("data") else DataConfig("")  # init --no-data
        if data_path:
            data = DataConfig(data_path, data.roi_crop, data.validation_fraction)
        synthetic = SynthConfig(**settings["synthetic"]) if settings.get("synthetic") else None
        return cls(store, ModelConfig.from_json(settings["model"]), data,
                   Partition.from_json(manifest["partition"]), int(settings["seed"]), synthetic)

    @property
    def layout(self) -> Layout:
        """The keys of this training's files."""
        return Layout(self.sites)

    def tree(self, need_test: bool) -> GtsrbTree:
        """The data set as this process sees it.

        A synthetic data set missing here (a Job with an object store and no shared claim) is
        generated again from the manifest's settings: the generator is deterministic, so every
        process sees the same images, sample ids included.
        """
        if not self.data.path:
            raise BadInputError("this training was initialised with --no-data, so it has no data set here; pass "
                                "--data, or leave training and evaluation to the sites")
        path = Path(self.data.path)
        if self.synthetic is not None and not path.exists():
            generate(path, self.synthetic)
        return load_tree(path, self.model.num_classes, need_test=need_test)

    def load_global(self, round_number: int) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
        """The global weights after ``round_number``."""
        key = self.layout.global_weights(round_number)
        if not self.store.exists(key):
            raise BadInputError(f"{self.store.describe(key)} does not exist; round {round_number} has not been "
                                "aggregated")
        return read_weights(self.store, key)

    def arrays(self, tree: GtsrbTree, samples: list[Sample]) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        """Decoded images and labels at the model's input size."""
        return load_samples(tree, samples, self.model.image_size, self.data.roi_crop)

    def shard(self, name: str, locate: Callable[[], tuple[GtsrbTree, list[Sample]]],
              expected_ids: Sequence[str] | None = None) -> DecodedShard:
        """A shard's decoded images, from the local cache when one is configured and still valid."""
        key = ShardKey(name, Path(self.data.path), self.model.image_size, self.data.roi_crop)
        return decoded_shard(key, locate, expected_ids, cache_directory())


# --- train ----------------------------------------------------------------------------------------


class Stopwatch:
    """Seconds spent in each named step of a task, for the per-round breakdown of the benchmarks."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Charge the time since the previous lap to ``name``."""
        now = time.perf_counter()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self.last, 4)
        self.last = now


def client_seed(seed: int, round_number: int, client: str) -> int:
    """A distinct, reproducible seed for each (training, round, client)."""
    digest = hashlib.sha256(f"{seed}/{round_number}/{client}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def client_samples(workspace: Workspace, client: str, sample_ids: list[str] | None, own_data: bool
                    ) -> tuple[GtsrbTree, list[Sample]]:
    """Index the data set and pick the client's samples (all of them for its own data set)."""
    tree = load_tree(Path(workspace.data.path), workspace.model.num_classes, need_test=False) if own_data \
        else workspace.tree(need_test=False)
    by_id = {s.sample_id: s for s in tree.train}
    if sample_ids is None:
        sample_ids = sorted(by_id)
    missing = [i for i in sample_ids if i not in by_id]
    if missing:
        raise BadDataError(
            f"{workspace.data.path}: {len(missing)} sample(s) of {client} are missing, e.g. {missing[0]}"
        )
    return tree, [by_id[i] for i in sample_ids]


def train(workspace: Workspace, round_number: int, client: str, config: TrainConfig, device: torch.device,
          own_data: bool = False, clip_norm: float | None = None, attempt: int = 1, upload: Upload | None = None
          ) -> dict[str, Any]:
    """Train one client for one round from the previous global model; write its update.

    ``own_data``: the client trains on the whole training split at ``--data`` (its own data set).
    ``attempt``: the engine's attempt of this task, which names the update's key, so that a stale
    attempt still running never overwrites the current one's.
    """
    if round_number < 1:
        raise BadInputError(f"--round must be >= 1, got {round_number}")
    sample_ids = workspace.partition.clients.get(client)
    if sample_ids is None and not own_data:
        known = ", ".join(sorted(workspace.partition.clients))
        raise BadInputError(f"--client {client!r} is not in the partition (clients: {known}); a client with its "
                            "own data set needs --own-data")
    clock = Stopwatch()
    base = workspace.load_global(round_number - 1)
    clock.lap("read_weights")
    expected = None if own_data else sample_ids
    shard = workspace.shard(f"{'own' if own_data else 'client'}:{client}", lambda: client_samples(
        workspace, client, None if own_data else sample_ids, own_data), expected)
    clock.lap("decode")
    seed = client_seed(workspace.seed, round_number, client)
    train_part, validation_part = split_by_track(shard.samples, workspace.data.validation_fraction, seed)
    return train_update(workspace, LocalRound(round_number, client, shard, train_part, validation_part, attempt),
                        base, config, device, clip_norm, clock, upload)


@dataclass(frozen=True)
class LocalRound:
    """One client's round: who, which round, its decoded shard and how that shard splits into train/validation."""

    round: int
    client: str
    shard: DecodedShard
    train: list[Sample]
    validation: list[Sample]
    attempt: int = 1  # the training task's attempt: its update's key names it (`Layout.client_update`)


# Sends a trained model somewhere other than the client's update key (secure aggregation masks it):
# called with the base weights, the trained weights, the example count and the sidecar; returns the result.
Upload = Callable[[Weights, Weights, int, dict[str, Any]], dict[str, Any]]


def train_update(workspace: Workspace, local: LocalRound, base: tuple[Weights, dict[str, Any]],
                 config: TrainConfig, device: torch.device, clip_norm: float | None = None,
                 clock: Stopwatch | None = None, upload: Upload | None = None) -> dict[str, Any]:
    """Train from ``base`` (the global weights and their sidecar) on the round's data; write the update.

    Shared by partitioned clients, clients with their own data and remote sites, so that every
    update has the same sidecar and the same clipping whoever trained it. The update goes to
    ``workspace.layout.client_update``: a site's own folder when the workspace knows it as a site.
    """
    clock = clock or Stopwatch()
    weights, meta = base
    seed = client_seed(workspace.seed, local.round, local.client)
    model = build_model(workspace.model)
    load_numpy_state(model, weights)
    images, labels = local.shard.arrays(local.train)
    result = train_local(model, images, labels, TrainConfig(**{**asdict(config), "seed": seed}), device)
    clock.lap("train")
    metrics: dict[str, Any] = {"train_" + k: v for k, v in result.to_json().items() if k != "num_examples"}
    if local.validation:
        val_images, val_labels = local.shard.arrays(local.validation)
        scores = evaluate(model, val_images, val_labels, workspace.model.num_classes, device=device)
        metrics.update({"val_accuracy": scores.accuracy, "val_loss": scores.loss,
                        "val_examples": scores.num_examples})
    clock.lap("validate")
    sidecar = {"client": local.client, "round": local.round, "num_examples": result.num_examples,
               "metrics": metrics, "base_sha256": meta["sha256"], "train_config": asdict(config),
               "timings": clock.laps}
    trained = state_to_numpy(model.cpu())
    if clip_norm is not None:  # the update leaves this client bounded (privacy); the aggregator clips again
        delta, norm = clip({k: v.astype(np.float64) - weights[k] if v.dtype.kind == "f" else v
                            for k, v in trained.items()}, clip_norm)
        trained = {k: (weights[k] + delta[k]).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in trained.items()}
        sidecar["metrics"]["update_norm"] = norm
        sidecar["clip_norm"] = clip_norm
    if upload is not None:
        return upload(weights, trained, result.num_examples, sidecar)
    key = workspace.layout.client_update(local.round, local.client, local.attempt)
    sidecar["sha256"] = save_weights(workspace.store, key, trained, sidecar)
    return sidecar


# --- aggregate ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivacyConfig:
    """Central DP of a round (see `strategies.privacy`)."""

    clip_norm: float
    noise_multiplier: float = 1.0
    sampling_rate: float = 1.0
    delta: float = 1e-5
    seed: int = 0

    def check(self) -> None:
        """Name the option that is out of range."""
        if self.clip_norm <= 0:
            raise BadInputError(f"--dp-clip-norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise BadInputError(f"--dp-noise-multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.sampling_rate <= 1:
            raise BadInputError(f"--dp-sampling-rate must be in (0, 1], got {self.sampling_rate}")
        if not 0 < self.delta < 1:
            raise BadInputError(f"--dp-delta must be in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class AggregateConfig:
    """Which strategy, with which parameters, and how strict the round is."""

    strategy: str = "fedavg"
    parameters: tuple[tuple[str, Any], ...] = ()
    min_updates: int = 1
    max_norm_ratio: float = 10.0
    clients: tuple[str, ...] = ()  # empty: every update file present
    evaluate: bool = True
    privacy: PrivacyConfig | None = None
    examples: ExampleBounds = field(default_factory=ExampleBounds)  # what each update may claim (clients.maxExamples)
    max_weight_over_median: float = DEFAULT_MAX_WEIGHT_OVER_MEDIAN  # an update's weight vs the round's median count
    attempts: tuple[tuple[str, int], ...] = ()  # each client's task attempt whose update counts; else its latest
    secure: secure_rounds.SecureRound | None = None  # privacy.secureAggregation: the round's masked sum only


def aggregate(workspace: Workspace, round_number: int, config: AggregateConfig, device: torch.device
              ) -> dict[str, Any]:
    """Aggregate one round with the strategy, evaluate on the test split, write the new global model."""
    if round_number < 1:
        raise BadInputError(f"--round must be >= 1, got {round_number}")
    started = time.perf_counter()
    strategy = make_strategy(config.strategy, dict(config.parameters))
    current, current_meta = workspace.load_global(round_number - 1)
    layout, store = workspace.layout, workspace.store
    state: dict[str, NDArray[Any]] = {}
    if store.exists(layout.strategy_state(round_number - 1)):
        state, _ = read_weights(store, layout.strategy_state(round_number - 1))
    if config.secure is not None:
        outcome, counted = _secure_round(workspace, current, strategy, state, config, round_number)
    else:
        outcome, counted = _plain_round(workspace, current, current_meta, strategy, state, config, round_number)
    refuse_non_finite(outcome, round_number, strategy.name)
    aggregated_at = time.perf_counter()
    result: dict[str, Any] = {"round": round_number, "strategy": strategy.name, **counted,
                              "aggregation_seconds": aggregated_at - started, **outcome.details}
    if config.evaluate:
        scores = evaluate_weights(workspace, outcome.weights, device)
        result.update(scores.summary())
        result["per_class_accuracy"] = scores.per_class_accuracy
        result["confusion"] = scores.confusion
        result["evaluation_seconds"] = time.perf_counter() - aggregated_at
    if outcome.state:
        save_weights(store, layout.strategy_state(round_number), outcome.state,
                     {"round": round_number, "num_examples": 0})
    meta = {"round": round_number, "model": workspace.model.to_json(), "num_examples": result["num_examples"],
            "metrics": {k: result[k] for k in ("accuracy", "loss") if k in result}}
    result["sha256"] = save_weights(store, layout.global_weights(round_number), outcome.weights, meta)
    result["seconds"] = time.perf_counter() - started
    write_json(store, layout.result(round_number), result)
    return result


def _plain_round(workspace: Workspace, current: Weights, current_meta: dict[str, Any], strategy: Strategy,
                 state: Weights, config: AggregateConfig, round_number: int) -> tuple[Aggregate, dict[str, Any]]:
    """Read, check and aggregate the round's updates; the outcome, and who was accepted, rejected or capped."""
    layout, store = workspace.layout, workspace.store
    clients = config.clients or _updates_present(workspace, round_number)
    named = dict(config.attempts)  # the engine names each attempt; a tool that names none reads the latest
    attempts = {c: named.get(c) or _latest_attempt(workspace, round_number, c) or 1 for c in clients}
    files = [UpdateFile(c, store, layout.client_update(round_number, c, attempts[c])) for c in clients]
    updates = UpdateSet(current, files, config.max_norm_ratio, config.min_updates,
                        base_sha256=current_meta.get("sha256"), bounds=config.examples,
                        max_weight_over_median=config.max_weight_over_median)
    if config.privacy is not None:
        outcome = _private_round(current, updates, config.privacy, round_number)
    else:
        outcome = strategy.aggregate(current, updates, state)
    return outcome, {"accepted": updates.accepted, "rejected": updates.rejected, "capped": updates.capped,
                     "attempts": attempts,  # of each update read: finalize reads the accepted ones' sidecars
                     "num_examples": sum(updates.examples[c] for c in updates.accepted)}


def _secure_round(workspace: Workspace, current: Weights, strategy: Strategy, state: Weights,
                  config: AggregateConfig, round_number: int) -> tuple[Aggregate, dict[str, Any]]:
    """The masked sum of the survivors' updates, unmasked; noise on it under central DP; the strategy's step.

    No single update is ever read, so none is checked or rejected here: each client clipped its
    own update, and the quantisation range refuses values past the clip norm (docs/privacy.md).
    """
    secure = config.secure
    assert secure is not None
    messages = secure_rounds.Messages(workspace.store, workspace.layout, secure)
    outcome = secure_rounds.secure_aggregate(messages, current, strategy, state)
    details = outcome.details["secure_aggregation"]
    survivors = list(secure.survivors)
    if config.privacy is not None:
        privacy = config.privacy
        rng = np.random.default_rng([privacy.seed, round_number, 0xD1FF])
        outcome.weights = secure_rounds.add_noise(outcome.weights, privacy.clip_norm, len(survivors),
                                                  privacy.noise_multiplier, rng)
        spent = epsilon(privacy.sampling_rate, privacy.noise_multiplier, round_number, privacy.delta)
        outcome.details.update({"epsilon": spent if math.isfinite(spent) else None, "dp_delta": privacy.delta,
                                "dp_clip_norm": privacy.clip_norm, "dp_noise_multiplier": privacy.noise_multiplier})
        examples = 0  # equal weights: the count is not asked for
    else:
        examples = round(float(details["weight_sum"]) * secure.weight_unit)
    return outcome, {"accepted": survivors, "rejected": {}, "capped": {}, "num_examples": examples}


def refuse_non_finite(outcome: Aggregate, round_number: int, strategy: str) -> None:
    """Raise before anything is written if the new global model or the server state holds NaN or Inf.

    A written model with one Inf would be every client's next starting point and the champion's
    candidate; refusing it fails only this round, which the engine then treats like a missed quorum.
    """
    for what, weights in (("global model", outcome.weights), ("server state", outcome.state)):
        name = non_finite_tensor(weights)
        if name is not None:
            raise NonFiniteModelError(
                f"round {round_number}: the {strategy} aggregate's {what} has NaN or Inf in tensor {name}; "
                "it was not written (a server optimiser's strategy.eta too large can overflow float32)")


def _updates_present(workspace: Workspace, round_number: int) -> tuple[str, ...]:
    """Clients whose update of the round is in the store: in the round's folder, or in a site's own folder."""
    layout, store = workspace.layout, workspace.store
    present = layout.updating_clients(iterate_keys(store, layout.client_dir(round_number), ".safetensors"),
                                      round_number)
    present.update(s for s in workspace.sites if _latest_attempt(workspace, round_number, s, None) is not None)
    return tuple(sorted(present))


def _latest_attempt(workspace: Workspace, round_number: int, client: str, default: int | None = 1) -> int | None:
    """A client's last uploaded attempt of the round, for tools that name no attempt (the engine always does)."""
    layout = workspace.layout
    keys = workspace.store.list(layout.update_folder(round_number, client))
    found = layout.update_attempts(keys, client, round_number)
    return found[-1] if found else default


def _private_round(current: dict[str, NDArray[Any]], updates: UpdateSet, privacy: PrivacyConfig,
                   round_number: int) -> Aggregate:
    """Clip, average, add noise; report the budget spent after this round (one step per round)."""
    rng = np.random.default_rng([privacy.seed, round_number, 0xD1FF])
    weights, details = private_mean(current, updates, privacy.clip_norm, privacy.noise_multiplier, rng)
    spent = epsilon(privacy.sampling_rate, privacy.noise_multiplier, round_number, privacy.delta)
    details.update({"epsilon": spent if math.isfinite(spent) else None, "dp_delta": privacy.delta,
                    "dp_clip_norm": privacy.clip_norm, "dp_noise_multiplier": privacy.noise_multiplier})
    return Aggregate(weights, details=details)


def evaluate_weights(workspace: Workspace, weights: dict[str, NDArray[Any]], device: torch.device,
                     split: str = "test") -> Evaluation:
    """Score weights on the data set's test split (or its whole training split)."""
    def locate() -> tuple[GtsrbTree, list[Sample]]:
        tree = workspace.tree(need_test=split == "test")
        return tree, list(tree.test if split == "test" else tree.train)

    shard = workspace.shard(f"split:{split}", locate)
    model = build_model(workspace.model)
    load_numpy_state(model, weights)
    return evaluate(model, shard.images, shard.labels, workspace.model.num_classes, device=device)


def termination_message(result: dict[str, Any]) -> str:
    """The small JSON a Kubernetes Pod leaves in its termination message (at most 4 KiB).

    Reasons (``rejected``, and ``capped`` when an update was weighted below its claim) are shortened,
    then, with many clients, replaced by counts and as many reasons as fit.
    """
    keys = ("round", "strategy", "accuracy", "loss", "num_examples", "accepted", "sha256", "seconds", "epsilon",
            "dp_delta")
    short = {k: result[k] for k in keys if k in result}
    reasons = {"rejected": dict(result.get("rejected", {})), "capped": dict(result.get("capped") or {})}
    short.update((name, found) for name, found in reasons.items() if found or name == "rejected")
    text = json.dumps(short, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
        short.update((name, {c: r[:80] for c, r in short[name].items()}) for name in reasons if name in short)
        text = json.dumps(short, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
        text = _counted_message(short, reasons)
    return text


def _counted_message(short: dict[str, Any], reasons: dict[str, dict[str, str]]) -> str:
    """Many clients: counts instead of the accepted list, and as many (shortened) reasons as fit.

    Capped updates come first: they are in the model, and rarely more than a few.
    """
    short.update(accepted_count=len(short.pop("accepted", [])), rejected_count=len(reasons["rejected"]))
    short.update((name, {}) for name in reasons if name in short)
    for name in (n for n in ("capped", "rejected") if n in short):
        for client, reason in sorted(reasons[name].items()):
            if len(json.dumps(short, separators=(",", ":"))) + len(client) + 90 > TERMINATION_MESSAGE_LIMIT:
                break
            short[name][client] = reason[:80]
    return json.dumps(short, separators=(",", ":"))


# --- predict --------------------------------------------------------------------------------------


def load_model_from_weights(path: Path) -> tuple[torch.nn.Module, ModelConfig]:
    """A model ready for inference from a global weights file (its sidecar names the architecture)."""
    weights, meta = read_weights_file(path)
    if "model" not in meta:
        raise BadDataError(f"{path}: its sidecar has no 'model' entry; use a global or final model file")
    config = ModelConfig.from_json({**meta["model"], "pretrained_weights": None})
    model = build_model(config)
    load_numpy_state(model, weights)
    return model.eval(), config


def classify(model: torch.nn.Module, image_size: int, images: list[Path], device: torch.device, top: int = 1
             ) -> list[dict[str, Any]]:
    """Class id, sign name and probability (and the ``top`` best) for each image file."""
    names = sign_names()
    batch = np.stack([load_image(p, image_size) for p in images])
    probabilities = predict_proba(model, batch, device=device)
    rows = []
    for path, row in zip(images, probabilities, strict=True):
        best = np.argsort(row)[::-1][:top]
        rows.append({"image": str(path), "class_id": int(best[0]), "probability": float(row[best[0]]),
                     "sign_name": names[int(best[0])] if int(best[0]) < len(names) else str(int(best[0])),
                     "top": [{"class_id": int(c), "probability": float(row[c])} for c in best]})
    return rows


def predict(weights_path: Path, images: list[Path], device: torch.device, top: int = 1) -> list[dict[str, Any]]:
    """Classify image files with a global or final weights file."""
    model, config = load_model_from_weights(weights_path)
    return classify(model, config.image_size, images, device, top)
