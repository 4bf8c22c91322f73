"""``fedtrain run``: a FederatedTraining on one machine, through the same engine and worker commands.

The runner is a loop: observe the processes, ask the engine, launch what it says, save the status.
Everything durable is in the work directory (``status.json``, ``tasks.jsonl``, the storage layout),
so the same command continues an interrupted or crashed training from where it stopped.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedtrain.contract.errors import TemporaryStorageError
from fedtrain.contract.storage import S3_ENV, open_store
from fedtrain.engine import decide
from fedtrain.engine.status import Cancel, Event, Launch, Observation, TrainingStatus
from fedtrain.local.executor import LocalExecutor
from fedtrain.local.lock import workdir_lock
from fedtrain.sites.pace import LOCAL_FASTEST
from fedtrain.sites.relay import SiteRelay
from fedtrain.spec import FederatedTraining, SpecError
from fedtrain.tasks import (
    Placement,
    aggregation_clients,
    remote,
    secure_identity,
    storage_environment,
    storage_location,
    training_dir,
    training_id,
    worker_arguments,
)
from fedtrain.worker.data.decoded import CACHE_ENV

STATUS_FILE = "status.json"
PASS_SECONDS = 0.5  # the longest wait between two passes when no local task ends sooner
SPEC_FILE = "spec.json"
UID_FILE = "uid"


@dataclass
class RunOptions:
    """Where to run and where to track; None means: from the spec, else the defaults."""

    workdir: Path | None = None
    tracking_uri: str | None = None
    parallelism: int | None = None
    fork_server: bool = True  # False: a fresh Python process per task (slower start, nothing shared)


@dataclass
class RunResult:
    """How a run ended, and what the executor measured (for the summary and the overhead benchmark)."""

    status: TrainingStatus
    workdir: Path
    durations: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    round_walls: dict[int, float] = field(default_factory=dict)


def default_workdir(manifest: FederatedTraining) -> Path:
    """``spec.storage.local``, else ``runs/<name>`` in the current directory."""
    if manifest.spec.storage.local:
        return Path(manifest.spec.storage.local)
    return Path("runs") / manifest.metadata.name


def check_before_creating(manifest: FederatedTraining, workdir: Path) -> None:
    """Refuse what cannot run before anything is written."""
    path = manifest.spec.dataset.path
    if path is not None and not Path(path).is_dir():
        raise SpecError([f"spec.dataset.path: {path} does not exist or is not a directory; point it at a GTSRB "
                         "tree, or remove it to train on generated synthetic data"])
    for index, entry in enumerate(manifest.spec.clients.entries or ()):
        if entry.data is not None:
            raise SpecError([f"spec.clients.list[{index}].data names a claim ({entry.data.claim_name}), and `fedtrain "
                             "run` has no claims; run this training on Kubernetes, or remove data (and namespace) "
                             "to give the client a share of spec.dataset"])
    weights = manifest.spec.model.pretrained_weights
    if weights is not None and not Path(weights).is_file():
        raise SpecError([f"spec.model.pretrainedWeights: {weights} does not exist; give a local .safetensors or "
                         ".pth file"])
    recorded = workdir / SPEC_FILE
    if recorded.exists():
        before = json.loads(recorded.read_text())
        now = manifest.model_dump(mode="json", by_alias=True)
        for key in ("rounds", "model", "dataset", "partition", "clients", "strategy", "seed"):
            if before["spec"].get(key) != now["spec"].get(key):
                raise SpecError([f"spec.{key} differs from the training already in {workdir}; use another "
                                 "--workdir to start a new training (nothing was changed)"])


def local_uid(workdir: Path) -> str:
    """The training identity of a work directory (Kubernetes has the resource's uid), kept in ``uid``.

    It names the training's prefix in an object store, so two local runs of one spec never share one.
    """
    path = workdir / UID_FILE
    if not path.exists():
        path.write_text(uuid.uuid4().hex + "\n")
    return path.read_text().strip()


def load_status(workdir: Path) -> TrainingStatus:
    """The saved status, or a fresh one."""
    path = workdir / STATUS_FILE
    return TrainingStatus.model_validate(json.loads(path.read_text())) if path.exists() else TrainingStatus()


def save_status(workdir: Path, status: TrainingStatus) -> None:
    """Atomically replace ``status.json``."""
    temporary = workdir / (STATUS_FILE + ".tmp")
    temporary.write_text(json.dumps(status.to_json(), indent=2))
    os.replace(temporary, workdir / STATUS_FILE)


def observe_sites(relay: SiteRelay | None, status: TrainingStatus, on_event: Callable[[Event], None]
                  ) -> dict[str, Observation]:
    """The sites' answers; a store that is down for a moment costs a pass, not the training."""
    if relay is None:
        return {}
    try:
        return relay.observe(status)
    except TemporaryStorageError as error:
        on_event(Event("StoreUnavailable", f"sites not observed this pass: {error}", warning=True))
        return {}


def run_training(manifest: FederatedTraining, options: RunOptions,
                 on_event: Callable[[Event], None] = lambda e: None,
                 on_status: Callable[[TrainingStatus], None] = lambda s: None) -> RunResult:
    """Run (or continue) a training until it succeeds, fails or is suspended.

    The work directory is locked while it runs: a second run of it fails at once (`WorkdirBusy`).
    """
    workdir = (options.workdir or default_workdir(manifest)).resolve()
    check_before_creating(manifest, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(workdir):
        return _run_locked(manifest, options, workdir, on_event, on_status)


def _run_locked(manifest: FederatedTraining, options: RunOptions, workdir: Path, on_event: Callable[[Event], None],
                on_status: Callable[[TrainingStatus], None]) -> RunResult:
    """`run_training`'s loop, in a work directory this process holds."""
    spec = manifest.spec
    (workdir / SPEC_FILE).write_text(json.dumps(manifest.model_dump(mode="json", by_alias=True), indent=2))
    tracking_uri = options.tracking_uri or spec.mlflow.tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    data_path = spec.dataset.path or str(workdir / "data")
    uid = local_uid(workdir)
    namespace, name = manifest.metadata.namespace, manifest.metadata.name
    store = storage_location(spec, namespace, training_dir(name, uid))
    secrets = workdir / "secrets"  # secure aggregation's client secrets: beside the store, never in it
    secrets.mkdir(mode=0o700, exist_ok=True)
    where = Placement(store or str(workdir), data_path, manifest.metadata.name, manifest.metadata.namespace,
                      uid=uid, tracking_uri=tracking_uri, secrets_dir=str(secrets))
    preload = ["torchvision.models"] if spec.model.architecture.startswith("mobilenet") else []
    environment = {CACHE_ENV: str(workdir / "cache"), **os.environ, **storage_environment(spec)}
    if spec.storage.s3 is not None:
        environment[S3_ENV["credentials_from"]] = "the environment of `fedtrain run` (AWS_ACCESS_KEY_ID, " \
                                                  "AWS_SECRET_ACCESS_KEY)"
    executor = LocalExecutor(workdir / "executor", options.parallelism or spec.worker.parallelism,
                             fork_server=options.fork_server, preload=preload, environment=environment,
                             prepare=("finalize",),  # its imports beside the rounds, not after the last
                             trains=len(spec.clients.sites()) < len(spec.clients.names()))  # not all sites
    relay = None
    if spec.clients.sites():
        relay = SiteRelay(open_store(where.workdir, environment), spec,
                          f"{manifest.metadata.namespace}/{manifest.metadata.name}", secure_identity(where))
    status = load_status(workdir)
    if spec.storage.s3 is not None and status.training_id is None:
        status.training_id = training_id(namespace, name, uid)
    result = RunResult(status, workdir)
    round_started: dict[int, float] = {}
    try:
        while True:
            observations = {**executor.poll(), **observe_sites(relay, status, on_event)}
            decision = decide(spec, status, observations, time.time())
            for event in decision.events:
                on_event(event)
            if decision.status != status:
                save_status(workdir, decision.status)
                on_status(decision.status)
            if relay is not None:  # after the status is saved: a posting never runs ahead of it
                publish_sites(relay, decision.status, on_event)
            for action in decision.actions:  # last, as the operator acts: finalize finds the rounds' records
                if isinstance(action, Launch) and remote(action.task, spec):
                    continue  # posted to its site by the relay above
                if isinstance(action, Launch):
                    clients = aggregation_clients(decision.status, action.task.round)
                    executor.launch(action.task.id, worker_arguments(action.task, spec, where, clients))
                    if action.task.kind == "train":
                        round_started.setdefault(action.task.round, time.monotonic())
                elif isinstance(action, Cancel):
                    executor.cancel(action.task_id)
            for number in list(round_started):
                record = decision.status.round(number)
                if record is not None and record.finished_at is not None and number not in result.round_walls:
                    result.round_walls[number] = time.monotonic() - round_started[number]
            status = decision.status
            if status.phase in ("Succeeded", "Failed", "Suspended") and executor.idle:
                break
            executor.wait(pass_seconds(relay, status))
    finally:
        executor.shutdown()
    result.status = status
    result.durations = executor.durations
    result.cpu_seconds = executor.cpu_seconds
    return result


def pass_seconds(relay: SiteRelay | None, status: TrainingStatus) -> float:
    """The wait before the next pass unless a local task ends first.

    A local task's end wakes the loop at once; a site's answer does not (it is a file in the store),
    so while sites answer through a store whose reads are local, the loop looks every
    `LOCAL_FASTEST` seconds (a stat per awaited answer) instead of every `PASS_SECONDS`.
    """
    if relay is not None and relay.store.reads_are_local and relay.awaits_answers(status):
        return LOCAL_FASTEST
    return PASS_SECONDS


def publish_sites(relay: SiteRelay, status: TrainingStatus, on_event: Callable[[Event], None]) -> None:
    """Post the sites' tasks; a store that is down for a moment is tried again on the next pass."""
    try:
        relay.publish(status)
    except TemporaryStorageError as error:
        on_event(Event("StoreUnavailable", f"site tasks not posted this pass: {error}", warning=True))
