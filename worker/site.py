"""A site's side of a task: train on, or evaluate with, the site's own data, and answer in the store.

The coordinator posts a `SiteTask`; the site's runner (its operator or ``fedtrain site run``) has
already checked it against the site's policy, and starts ``fedtrain-worker site-task``. This module
runs it: it checks the global model against the sha256 and architecture the task vouches for,
trains or evaluates on the site's own data, writes the update or the evaluation under
``sites/<site>/``, and then the `SiteResult` that tells the coordinator the task is done.

The site reads nothing of the coordinator but the task and the global models: no manifest, no
partition (a per-site bucket policy grants nothing else, see `layout.site_grants`). The model
comes from the global model's sidecar, the seed and image settings from the task, the data and
its splits from the site's own settings.

Held-out tracks: the site's validation tracks are drawn once per (training seed, site), not per
round, so that an evaluation on ``validation`` scores tracks that no round ever trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtrain.contract.errors import BadDataError, BadInputError
from fedtrain.contract.layout import Layout
from fedtrain.contract.sitetask import (
    SECURE_STAGES,
    SiteResult,
    SiteTask,
    TrainSettings,
    encode,
    parse_result,
    parse_task,
)
from fedtrain.contract.storage import Store
from fedtrain.worker.data.gtsrb import GtsrbTree, Sample, load_tree, split_by_track
from fedtrain.worker.data.partition import Partition
from fedtrain.worker.jobs import (
    DataConfig,
    LocalRound,
    Stopwatch,
    Workspace,
    client_samples,
    client_seed,
    train_update,
)
from fedtrain.worker.models import ModelConfig, build_model
from fedtrain.worker.site_secure import SiteSecret as SiteSecret
from fedtrain.worker.site_secure import masked_output, masked_upload, run_stage, uploaded
from fedtrain.worker.training import Evaluation, TrainConfig, evaluate, load_numpy_state
from fedtrain.worker.weights import Weights, read_weights, write_json

EVALUATION_SPLITS = ("test", "validation")
HELD_OUT_ROUND = 0  # the round number in the seed of the site's fixed held-out tracks


@dataclass(frozen=True)
class SiteData:
    """The site's own data and how the site splits it (its settings, never the coordinator's)."""

    path: str
    validation_fraction: float = 0.1
    evaluation_split: str = "test"  # test: the tree's test split when it has one; validation: held-out tracks

    def check(self) -> None:
        """Name the option that is out of range."""
        if not 0 <= self.validation_fraction < 1:
            raise BadInputError(f"--validation-fraction must be in [0, 1), got {self.validation_fraction}")
        if self.evaluation_split not in EVALUATION_SPLITS:
            raise BadInputError(f"--evaluation-split {self.evaluation_split!r} is unknown; use one of "
                                f"{', '.join(EVALUATION_SPLITS)}")


def read_task(text: str) -> SiteTask:
    """The task given on the command line (``--task-json``), its version and digest checked."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise BadDataError(f"--task-json: not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise BadDataError("--task-json: expected a JSON object (the task of a task.json posting)")
    return parse_task(value, "--task-json")


def run_task(store: Store, task: SiteTask, data: SiteData, device: torch.device,
             secret: SiteSecret | None = None) -> dict[str, Any]:
    """Run one task and answer it; return the answer's output.

    A task already answered successfully is not run again (a runner restarted mid-task must not
    upload twice): its recorded output is returned as it is. A secure round's task reads the
    site's master secret (``secret``) first, so that a site without a usable one fails at once.
    """
    data.check()
    layout = Layout(sites=frozenset({task.site}))
    answered = _answered(store, layout, task)
    if answered is not None:
        return answered
    master = _master(task, secret)
    if task.kind in SECURE_STAGES:
        output = run_stage(store, task, master or b"")
    else:
        output = _run_with_model(store, task, data, device, master)
    result = SiteResult(task=task.id, site=task.site, state="succeeded", exit_code=0, output=output)
    store.write_bytes(layout.site_result(task.site, task.id), encode(result))
    return output


def _master(task: SiteTask, secret: SiteSecret | None) -> bytes | None:
    """The site's master secret for a secure round's task (bad input without one); None for a plain task."""
    if task.secure is None:
        return None
    if secret is None:
        raise BadInputError(f"task {task.id} is a secure round's: --secret-file must name the site's master secret")
    return secret.read()


def _run_with_model(store: Store, task: SiteTask, data: SiteData, device: torch.device,
                    master: bytes | None) -> dict[str, Any]:
    """Train from, or evaluate, the global model the task vouches for."""
    clock = Stopwatch()
    base = global_model(store, task)
    clock.lap("read_weights")
    workspace = site_workspace(store, task, data, base[1])
    if task.kind == "train":
        scored = _evaluate(workspace, task, data, base[0], device, task.round - 1) if task.evaluate_base else None
        clock.lap("evaluate_base")
        output = _train(workspace, task, base, device, clock, master)
        return {**output, "evaluation": scored} if scored is not None else output
    return _evaluate(workspace, task, data, base[0], device, task.round)


def _answered(store: Store, layout: Layout, task: SiteTask) -> dict[str, Any] | None:
    """The output of this task's earlier success, or None when it has none (not run, or failed)."""
    key = layout.site_result(task.site, task.id)
    if not store.exists(key):
        return None
    result = parse_result(store.read_bytes(key), store.describe(key))
    return result.output if result.state == "succeeded" else None


def expected_global_key(task: SiteTask) -> str:
    """The only model a task may name: the previous round's global model to train from, this round's to evaluate.

    A secure round's stages name the model the round trains from, though they do not read it.
    """
    return Layout().global_weights(task.round if task.kind == "evaluate" else task.round - 1)


def global_model(store: Store, task: SiteTask) -> tuple[Weights, dict[str, Any]]:
    """The task's global model, refused unless it is exactly the one the coordinator vouched for."""
    if task.kind == "train" and task.round < 1:
        raise BadDataError(f"task {task.id}: a train task's round must be >= 1, got {task.round}")
    if task.global_key != expected_global_key(task):
        raise BadDataError(f"task {task.id}: global_key {task.global_key!r} is not the global model this task "
                           f"needs ({expected_global_key(task)!r}); refusing it")
    weights, meta = read_weights(store, task.global_key)  # the bytes match the sidecar's sha256
    if meta.get("sha256") != task.global_sha256:
        raise BadDataError(f"task {task.id}: the global model's sha256 differs from the one the coordinator "
                           "posted; refusing it")
    architecture = (meta.get("model") or {}).get("architecture")
    if architecture != task.architecture:
        raise BadDataError(f"task {task.id}: the global model's architecture is {architecture!r}, but the task "
                           f"says {task.architecture!r}; refusing it")
    return weights, meta


def site_workspace(store: Store, task: SiteTask, data: SiteData, meta: dict[str, Any]) -> Workspace:
    """A workspace for the site: the model from the global model's sidecar, the data the site's own."""
    model = ModelConfig.from_json({**meta["model"], "pretrained_weights": None})  # its weights are the global's
    partition = Partition("none", 0.0, 0, model.num_classes)  # no shares: the site trains on all of its data
    return Workspace(store, model, DataConfig(data.path, task.roi_crop, data.validation_fraction), partition,
                     task.seed, sites=frozenset({task.site}))


def train_config(settings: TrainSettings) -> TrainConfig:
    """The worker's training settings from the task's (the seed is set per round and site by `train_update`)."""
    config = TrainConfig(settings.epochs, settings.batch_size, settings.optimizer, settings.learning_rate,
                         settings.momentum, settings.weight_decay, settings.scheduler, settings.restart_epochs,
                         settings.mu)
    config.check()
    if settings.clip_norm is not None and not settings.clip_norm > 0:
        raise BadInputError(f"task train.clip_norm must be > 0, got {settings.clip_norm}")
    return config


def _own_split(workspace: Workspace, task: SiteTask) -> LocalRound:
    """The site's whole training split, decoded, with its fixed held-out tracks."""
    shard = workspace.shard(f"own:{task.site}", lambda: client_samples(workspace, task.site, None, own_data=True))
    seed = client_seed(task.seed, HELD_OUT_ROUND, task.site)
    train_part, held_out = split_by_track(shard.samples, workspace.data.validation_fraction, seed)
    return LocalRound(task.round, task.site, shard, train_part, held_out, task.attempt)


def _train(workspace: Workspace, task: SiteTask, base: tuple[Weights, dict[str, Any]], device: torch.device,
           clock: Stopwatch, master: bytes | None = None) -> dict[str, Any]:
    """Train on the site's own data from the global model; the update goes to the site's folder.

    In a secure round the update never leaves in the clear: it is clipped, weighed and masked
    (`masked_upload`), and the answer says no example count.
    """
    if task.train is None:
        raise BadDataError(f"task {task.id}: a train task without its 'train' settings")
    config = train_config(task.train)
    upload = None
    if master is not None:
        done = uploaded(workspace.store, task, base[0])
        if done is not None:
            return done
        upload = masked_upload(workspace.store, task, master)
    local = _own_split(workspace, task)
    clock.lap("decode")
    sidecar = train_update(workspace, local, base, config, device, task.train.clip_norm, clock, upload)
    if upload is not None:
        return masked_output(sidecar)
    return {"num_examples": sidecar["num_examples"], "metrics": sidecar["metrics"], "sha256": sidecar["sha256"]}


def _evaluate(workspace: Workspace, task: SiteTask, data: SiteData, weights: Weights, device: torch.device,
              round_number: int) -> dict[str, Any]:
    """Score round ``round_number``'s global model on the site's evaluation split; write the figures (metrics only).

    An evaluation task scores its round's model; a training task with ``evaluate_base`` the model it
    trains from, the previous round's, before training on it.
    """
    split, images, labels = _evaluation_arrays(workspace, task, data)
    model = build_model(workspace.model)
    load_numpy_state(model, weights)
    scores = evaluate(model, images, labels, workspace.model.num_classes, device=device)
    figures = {"round": round_number, "split": split, **evaluation_figures(scores)}
    write_json(workspace.store, workspace.layout.site_evaluation(task.site, round_number), figures)
    return {"examples": scores.num_examples, "accuracy": scores.accuracy, "loss": scores.loss}


def _evaluation_arrays(workspace: Workspace, task: SiteTask, data: SiteData) -> tuple[str, Any, Any]:
    """Which split is scored ("test" or "validation") and its decoded images and labels."""
    root = Path(data.path)
    if data.evaluation_split == "test" and has_test_images(root):

        def locate() -> tuple[GtsrbTree, list[Sample]]:  # indexing the tree (a stat per image) only on a miss
            tree = load_tree(root, workspace.model.num_classes, need_test=True)
            return tree, list(tree.test)

        shard = workspace.shard(f"site-test:{task.site}", locate)
        if len(shard.labels):  # a test folder without images: the held-out tracks, as with none
            return "test", shard.images, shard.labels
    local = _own_split(workspace, task)
    if not local.validation:
        raise BadInputError(f"--validation-fraction {data.validation_fraction} holds out no tracks, and the site "
                            "has no test images to evaluate on; raise --validation-fraction or add a test split")
    images, labels = local.shard.arrays(local.validation)
    return "validation", images, labels


def has_test_images(root: Path) -> bool:
    """Whether a GTSRB tree has a test folder (official or torchvision layout): its labels are then required."""
    return (root / "Final_Test" / "Images").is_dir() or (root / "GTSRB" / "Final_Test" / "Images").is_dir()


def evaluation_figures(scores: Evaluation) -> dict[str, Any]:
    """Counts and means only: what a site's evaluation may tell the coordinator about its data."""
    correct = [row[c] for c, row in enumerate(scores.confusion)]
    total = [sum(row) for row in scores.confusion]
    return {"examples": scores.num_examples, "accuracy": scores.accuracy, "loss": scores.loss,
            "per_class_correct": correct, "per_class_total": total}
