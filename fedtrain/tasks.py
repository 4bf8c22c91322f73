"""The worker command line of each engine task: the one place both executors get their arguments from.

The operator puts these arguments into a Job's container; the local executor runs them as a
subprocess. Keeping one builder is what makes the local runner exercise the exact path Jobs take.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedtrain.contract.secrets import secret_file
from fedtrain.contract.sitetask import SECURE_STAGES as SECURE_STAGES  # secure aggregation's stages besides training
from fedtrain.contract.sitetask import client_mu
from fedtrain.contract.storage import S3_ENV, s3_location
from fedtrain.engine.status import Task, TrainingStatus
from fedtrain.spec import FederatedTrainingSpec, S3Spec, SyntheticSpec

WORKER_COMMAND = "fedtrain-worker"
SECRETS_DIR = "/var/run/fedtrain/secure"  # where a worker finds the clients' master secrets unless told otherwise


@dataclass(frozen=True)
class Placement:
    """Where this training's files are, as the task's process sees them, and who it is (for tracking)."""

    workdir: str
    data_path: str
    training: str
    namespace: str = "default"
    uid: str = "local"
    tracking_uri: str | None = None  # resolved by the caller: its option, else spec.mlflow.trackingUri
    termination_log: str | None = None  # Kubernetes: /dev/termination-log
    client_data_root: str = "/client-data"  # where a client's own claim is mounted (clients.list[].data)
    # Where each client's secure-aggregation master secret lives, as a file per client (never in the store).
    secrets_dir: str = SECRETS_DIR
    # Whether those files are given (a Kubernetes Secret's keys, mounted read-only): the worker only reads them.
    secrets_provided: bool = False


def s3_environment(s3: S3Spec | None) -> dict[str, str]:
    """A worker's object-store settings (`fedtrain.contract.storage.S3_ENV`) that are not secret.

    The coordinator's workers take them from spec.storage.s3, a site's from its spec.store.s3.
    """
    if s3 is None:
        return {}
    values = {"endpoint": s3.endpoint or "", "region": s3.region or "", "addressing_style": s3.addressing_style,
              "verify_tls": "false" if s3.tls.insecure_skip_verify else "true"}
    return {S3_ENV[key]: value for key, value in values.items() if value}


def storage_environment(spec: FederatedTrainingSpec) -> dict[str, str]:
    """The coordinator's workers' object-store settings that are not secret."""
    return s3_environment(spec.storage.s3)


def training_dir(name: str, uid: str) -> str:
    """``<name>-<uid8>``: a training's folder in its namespace's part of the store (a recreated one gets a new one)."""
    return f"{name}-{uid[:8]}"


def training_id(namespace: str, name: str, uid: str) -> str:
    """``<namespace>/<name>-<uid8>``: the training's folder under the store's prefix, by which sites join it."""
    return f"{namespace}/{training_dir(name, uid)}"


def storage_location(spec: FederatedTrainingSpec, namespace: str, training_dir: str) -> str | None:
    """``s3://bucket/prefix/<namespace>/<training dir>`` with an object store, else None (a directory)."""
    s3 = spec.storage.s3
    return s3_location(s3.bucket, s3.prefix, namespace, training_dir) if s3 is not None else None


def aggregation_clients(status: TrainingStatus, round_number: int) -> dict[str, int]:
    """The clients whose updates a round's aggregation uses (their training succeeded), by that attempt.

    Each update is read under the key of the attempt that succeeded, never a stale attempt's.
    """
    record = status.round(round_number)
    if record is None:
        return {}
    return {c: record.clients[c].attempt for c in record.selected if record.clients[c].state == "succeeded"}


def remote(task: Task, spec: FederatedTrainingSpec) -> bool:
    """Whether a task runs at a remote site (posted through the store by `fedtrain.sites.relay`, not run here).

    A site's training and, in a secure round, its key, share and unmask stages.
    """
    return task.kind == "evaluate" or (task.kind in ("train", *SECURE_STAGES) and task.client in spec.clients.sites())


def worker_arguments(task: Task, spec: FederatedTrainingSpec, where: Placement,
                     clients: Mapping[str, int] | None = None) -> list[str]:
    """Arguments after ``fedtrain-worker`` for a task; ``clients`` are the updates an aggregation uses, by attempt."""
    if remote(task, spec):
        raise ValueError(f"task {task.id} runs at a site: the relay posts it, no worker runs it here")
    if task.kind == "init":
        return _init(spec, where)
    if task.kind == "train":
        assert task.client is not None
        return _train(task, spec, where)
    if task.kind == "aggregate":
        return _aggregate(task, spec, where, clients or {}) + secure_arguments(task, spec, where)
    if task.kind in SECURE_STAGES:
        return ["secure", task.kind, "--workdir", where.workdir, "--round", str(task.round), "--client",
                str(task.client), *sites_argument(spec), *secure_arguments(task, spec, where)]
    return _finalize(task, spec, where)


def secure_arguments(task: Task, spec: FederatedTrainingSpec, where: Placement) -> list[str]:
    """What a secure round's task needs: the round attempt, the settings, the rosters the engine fixed, the secret.

    Nothing for a plain round, so that plain tasks keep their arguments.
    """
    privacy = spec.privacy
    secure = privacy.secure_aggregation if privacy is not None else None
    if secure is None or privacy is None:
        return []
    args = ["--training-id", secure_identity(where), "--round-attempt",
            str(task.round_attempt), "--threshold", str(secure.threshold), "--secure-clip-norm",
            repr(privacy.clip_norm), "--secure-seed", str(spec.seed), "--weight-unit", str(weight_unit(spec)),
            "--advertised", ",".join(task.advertised), "--peers", ",".join(task.peers),
            "--survivors", ",".join(task.survivors)]
    if task.revealed:
        args += ["--revealed", ",".join(task.revealed)]
    if secure.neighbours is not None:
        args += ["--neighbours", str(secure.neighbours)]
    if privacy.differential:
        args.append("--equal-weights")
    if task.client is not None:
        args += ["--secret-file", f"{where.secrets_dir}/{secret_file(task.client)}"]
        if where.secrets_provided:
            args.append("--secret-provided")
    return args


def secure_identity(where: Placement) -> str:
    """The training identity every secure-aggregation key and message is bound to (the relay posts it to sites)."""
    return f"{where.namespace}/{where.training}/{where.uid}"


def sites_argument(spec: FederatedTrainingSpec) -> list[str]:
    """``--sites a,b``: the clients whose files are in their own folders (their updates, their secure messages)."""
    return ["--sites", ",".join(spec.clients.sites())] if spec.clients.sites() else []


def weight_unit(spec: FederatedTrainingSpec) -> int:
    """Examples per unit of a secure update's weight: the most any client may claim, so every weight is in [0, 1]."""
    bounds = spec.clients.example_bounds()
    return max([bounds.default, *(bound for _, bound in bounds.clients)])


def _init(spec: FederatedTrainingSpec, where: Placement) -> list[str]:
    model, dataset, partition = spec.model, spec.dataset, spec.partition
    args = ["init", "--workdir", where.workdir, "--data", where.data_path,
            "--clients", str(spec.clients.total), "--client-names", ",".join(spec.clients.names()),
            "--partition", partition.scheme, "--alpha", repr(partition.alpha),
            "--partition-seed", str(partition.seed), "--seed", str(spec.seed),
            "--architecture", model.architecture, "--num-classes", str(model.num_classes),
            "--image-size", str(model.image_size), "--validation-fraction", repr(dataset.validation_fraction)]
    if spec.clients.own_data():
        args += ["--own-data-clients", ",".join(spec.clients.own_data())]
    if not spec.needs_data():
        args.append("--no-data")  # every client is a site and nothing is scored centrally
    elif dataset.path is None:
        synthetic = dataset.synthetic or SyntheticSpec()
        args += ["--synthetic-per-class", str(synthetic.images_per_class),
                 "--synthetic-test-per-class", str(synthetic.test_images_per_class),
                 "--synthetic-frames-per-track", str(synthetic.frames_per_track),
                 "--synthetic-seed", str(synthetic.seed)]
    if model.pretrained_weights:
        args += ["--pretrained", model.pretrained_weights]
    if not model.fine_tune:
        args.append("--head-only")
    if not dataset.roi_crop:
        args.append("--no-roi-crop")
    return args


def client_training(spec: FederatedTrainingSpec, client: str) -> tuple[int, int, float]:
    """A client's local epochs, batch size and learning rate: spec.training with its list entry's overrides."""
    training = spec.training
    entry = spec.clients.entry(client)
    override = entry.training if entry else None
    epochs = override.local_epochs if override and override.local_epochs else training.local_epochs
    batch = override.batch_size if override and override.batch_size else training.batch_size
    rate = override.learning_rate if override and override.learning_rate else training.learning_rate
    return epochs, batch, rate


def _train(task: Task, spec: FederatedTrainingSpec, where: Placement) -> list[str]:
    training = spec.training
    entry = spec.clients.entry(task.client or "")
    epochs, batch, rate = client_training(spec, task.client or "")
    args = ["train", "--workdir", where.workdir, "--round", str(task.round), "--client", str(task.client),
            "--attempt", str(task.attempt),
            "--device", spec.worker.device, "--epochs", str(epochs), "--batch-size", str(batch),
            "--optimizer", training.optimizer, "--lr", repr(rate), "--momentum", repr(training.momentum),
            "--weight-decay", repr(training.weight_decay), "--scheduler", training.scheduler,
            "--restart-epochs", str(training.restart_epochs)]
    if spec.privacy is not None and spec.privacy.secure_aggregation is None:
        args += ["--clip-norm", repr(spec.privacy.clip_norm)]
    secure = secure_arguments(task, spec, where)
    args += [*sites_argument(spec), *secure] if secure else []
    if spec.strategy.name == "fedprox":
        args += ["--mu", repr(client_mu(spec.strategy.name, spec.strategy.parameters))]
    if entry is not None and entry.data is not None:
        args += ["--own-data", "--data", "/".join(p for p in (where.client_data_root, entry.data.path.strip("/")) if p)]
    elif spec.dataset.path is not None and where.data_path != spec.dataset.path:
        args += ["--data", where.data_path]
    return args


def example_bounds(spec: FederatedTrainingSpec) -> list[str]:
    """``--max-examples N`` and a ``--client-max-examples NAME=N`` per client with a bound of its own."""
    bounds = spec.clients.example_bounds()
    args = ["--max-examples", str(bounds.default)]
    for client, bound in bounds.clients:
        args += ["--client-max-examples", f"{client}={bound}"]
    return args


def _aggregate(task: Task, spec: FederatedTrainingSpec, where: Placement, clients: Mapping[str, int]) -> list[str]:
    args = ["aggregate", "--workdir", where.workdir, "--round", str(task.round), "--strategy", spec.strategy.name,
            "--min-updates", str(spec.clients.quorum), "--max-norm-ratio", repr(spec.strategy.max_norm_ratio),
            "--clients", ",".join(clients), "--device", spec.worker.device, *example_bounds(spec),
            "--max-weight-over-median", repr(spec.clients.max_weight_over_median)]
    for key, value in sorted(spec.strategy.parameters.items()):
        args += ["--param", f"{key}={value!r}"]
    args += sites_argument(spec)
    for client, attempt in clients.items():
        args += ["--client-attempt", f"{client}={attempt}"]
    if not spec.evaluation.central:
        args.append("--no-evaluate")
    if spec.privacy is not None and spec.privacy.differential:
        rate = spec.clients.round_size / spec.clients.total
        args += ["--dp-clip-norm", repr(spec.privacy.clip_norm), "--dp-noise-multiplier",
                 repr(spec.privacy.noise), "--dp-sampling-rate", repr(rate),
                 "--dp-delta", repr(spec.privacy.delta), "--dp-seed", str(spec.seed)]
    if where.termination_log:
        args += ["--termination-log", where.termination_log]
    return args


def _finalize(task: Task, spec: FederatedTrainingSpec, where: Placement) -> list[str]:
    args = ["finalize", "--workdir", where.workdir, "--round", str(task.round), "--device", spec.worker.device,
            "--training", where.training, "--namespace", where.namespace, "--uid", where.uid,
            "--strategy", spec.strategy.name, "--spec-json", spec.model_dump_json(by_alias=True)]
    if where.tracking_uri:
        args += ["--tracking-uri", where.tracking_uri, "--experiment", spec.mlflow.experiment]
        if spec.mlflow.registered_model_name:
            args += ["--registered-model-name", spec.mlflow.registered_model_name]
        if spec.mlflow.log_clients:
            args.append("--log-clients")
        if not spec.mlflow.promote_champion:
            args.append("--no-promote")
    if spec.clients.evaluating_sites():
        args += ["--sites", ",".join(spec.clients.evaluating_sites()), *example_bounds(spec),
                 "--combine", spec.evaluation.combine, "--min-site-scores", str(spec.champion_sites())]
    if not spec.evaluation.central:
        args.append("--no-central")
    if where.termination_log:
        args += ["--termination-log", where.termination_log]
    return args
