"""Kubernetes Jobs for engine tasks, and engine observations from Jobs: pure functions, no API calls.

The operator's executor builds each task's Job here and reads finished Jobs (and their Pods) back
into `Observation`s. Kept free of kopf, the Kubernetes client and torch, so that it is tested as
plain data and the operator image stays small.

- Names are deterministic (``<training>-<task id>``), so a restarted operator that creates the
  same Job gets 409 AlreadyExists and moves on. Over 63 characters, a name or label value is cut
  and ends in a hash of the whole (`fit`).
- ``backoffLimit: 0``: Kubernetes does not retry; the engine does, as a new attempt with a new
  name, so every failure is seen and counted once.
- The owner reference makes the API server's garbage collector delete the Jobs with the training.
  A client in another namespace (``clients.list[].namespace``) gets Jobs there with no owner
  reference (owners cannot cross namespaces): labels name the training's namespace and uid, and the
  finalizer deletes them by label.
- Pods run as non-root with a read-only root filesystem; ``/tmp`` is an emptyDir. The storage
  claim is mounted at ``/store``, and the worker service account has no API rights (no token).
- Secure aggregation: each namespace where a training's clients run holds one Secret with a
  32-byte master secret per client (`secure_secret_manifest`); each client's own Jobs mount only
  its own key, read-only, at `SECRETS_MOUNT` (`secure_secret_volume`); no other Job mounts one.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedtrain.contract.secrets import secret_file
from fedtrain.contract.storage import S3_ENV
from fedtrain.engine.status import Observation, Task
from fedtrain.spec import API_VERSION, DEFAULT_WORKER_IMAGE, KIND, WORKER_IMAGE_ENV, FederatedTrainingSpec, S3Spec
from fedtrain.tasks import (
    SECRETS_DIR,
    SECURE_STAGES,
    Placement,
    s3_environment,
    storage_location,
    training_dir,
    training_id,
)

MAX_NAME = 63
STORE_MOUNT = "/store"
TERMINATION_LOG = "/dev/termination-log"
WORKER_SERVICE_ACCOUNT = "fedtrain-worker"
LABEL_TRAINING = "fedtrain.io/training"
LABEL_TRAINING_NAMESPACE = "fedtrain.io/training-namespace"  # on Jobs outside the training's namespace
LABEL_TRAINING_UID = "fedtrain.io/training-uid"
CLIENT_DATA_MOUNT = "/client-data"
S3_CA_MOUNT = "/etc/fedtrain/s3-ca"
ANNOTATION_ACCEPT = "fedtrain.io/accept-trainings"  # on a client namespace: which trainings may run there
LABEL_TASK = "fedtrain.io/task"
LABEL_PARTICIPATION = "fedtrain.io/participation"  # a site's Jobs and its secure-aggregation Secret
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "fedtrain-operator"
ANNOTATION_TASK_ID = "fedtrain.io/task-id"
ANNOTATION_TRAINING = "fedtrain.io/training"  # the whole name, where the label may be cut
CLEANUP_TASK = "cleanup"
CLIENT_TASKS = ("train", *SECURE_STAGES)  # a client's own tasks: they run where the client runs
SECRETS_MOUNT = SECRETS_DIR  # where a secure client's Job finds its key (`Placement.secrets_dir`)
SECURE_SECRET = "secure"  # the Secret's name: <training>-secure (see `secure_secret_name`)
SECURE_VOLUME = "secure-secret"
# The key file: root-owned, group fsGroup (the worker's gid 1000), read-only for them and nobody else. The kubelet
# gives a secret volume's files to the Pod's fsGroup and ORs 0440 into their mode; 0440 says so here too.
SECRET_MODE = 0o440
# Kubeflow profile namespaces inject an Istio sidecar into every Pod; a sidecar never exits, so a Job whose
# Pod has one never completes. Worker Pods opt out (as Kubeflow Pipelines' own Pods do).
POD_ANNOTATIONS = {"sidecar.istio.io/inject": "false"}
# Waiting reasons that will not resolve by waiting: the task fails now, with the reason.
STUCK_WAITING = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError")


@dataclass(frozen=True)
class Owner:
    """The FederatedTraining a Job belongs to."""

    name: str
    namespace: str
    uid: str
    api_version: str = API_VERSION
    kind: str = KIND


def operator_worker_image() -> str:
    """The image of Jobs whose spec names none: the Deployment's ``FEDTRAIN_WORKER_IMAGE``, else the release's.

    Set in one place (deploy/kustomization.yaml) so that pointing every training at another registry
    edits no sample; a training records the image it started with (see `namespace defaults`), so a
    rollout that changes it does not move a running training to another image.
    """
    return os.environ.get(WORKER_IMAGE_ENV, "").strip() or DEFAULT_WORKER_IMAGE


def workdir(owner: Owner) -> str:
    """The training's directory on the claim: ``/store/<namespace>/<training>-<uid8>`` (a new uid, a new one)."""
    return f"{STORE_MOUNT}/{training_id(owner.namespace, owner.name, owner.uid)}"


def claim_name(spec: FederatedTrainingSpec, training: str) -> str | None:
    """The claim the Jobs mount: the given one, or ``<training>-store`` when the operator creates it."""
    if spec.storage.persistent_volume_claim is not None:
        return spec.storage.persistent_volume_claim.claim_name
    if spec.storage.create is not None:
        return fit(f"{training}-store")
    return None


def placement(spec: FederatedTrainingSpec, owner: Owner) -> Placement:
    """Paths and identity as a worker Pod sees them; MLflow defaults to sqlite in the training's directory.

    With an object store there is no shared directory: a synthetic data set is generated again in
    each Pod's scratch space, and MLflow needs ``spec.mlflow.trackingUri`` (see `kubernetes_problems`).
    """
    root = storage_location(spec, owner.namespace, training_dir(owner.name, owner.uid))
    if root is not None:
        return Placement(root, spec.dataset.path or "/tmp/data", owner.name, owner.namespace, owner.uid,
                         tracking_uri=spec.mlflow.tracking_uri, termination_log=TERMINATION_LOG,
                         client_data_root=CLIENT_DATA_MOUNT, secrets_dir=SECRETS_MOUNT, secrets_provided=True)
    root = workdir(owner)
    tracking = spec.mlflow.tracking_uri or f"sqlite:///{root}/mlflow.db"
    return Placement(root, spec.dataset.path or f"{root}/data", owner.name, owner.namespace, owner.uid,
                     tracking_uri=tracking, termination_log=TERMINATION_LOG, client_data_root=CLIENT_DATA_MOUNT,
                     secrets_dir=SECRETS_MOUNT, secrets_provided=True)


def kubernetes_problems(spec: FederatedTrainingSpec) -> list[str]:
    """What a spec lacks to run on a cluster, one line per field (beyond what the spec validates)."""
    problems = []
    storage = spec.storage
    if storage.persistent_volume_claim is None and storage.create is None and storage.s3 is None:
        problems.append("spec.storage: a training on Kubernetes needs storage.persistentVolumeClaim.claimName (an "
                        "existing ReadWriteMany claim), storage.create (a claim the operator creates) or storage.s3 "
                        "(an object store); storage.local is for `fedtrain run`")
    if spec.storage.s3 is not None and spec.mlflow.tracking_uri is None:
        problems.append("spec.mlflow.trackingUri: with storage.s3 there is no shared directory for MLflow's sqlite "
                        "store; give the tracking server's URI")
    if spec.storage.s3 is not None and spec.storage.s3.credentials_secret is None:
        problems.append("spec.storage.s3.credentialsSecret: name the Secret (in the training's namespace and in "
                        "every client namespace) that holds the access key and secret")
    if spec.clients.sites() and spec.storage.s3 is None:
        problems.append("spec.storage.s3: remote sites (clients.list[].site) reach the training only through an "
                        "object store; a claim cannot cross clusters")
    return problems


def job_namespace(spec: FederatedTrainingSpec, owner: Owner, task: Task) -> str:
    """Where a task's Job runs: a client's own task in the client's namespace, everything else in the training's."""
    return spec.clients.namespaces().get(task.client or "", owner.namespace) if task.kind in CLIENT_TASKS \
        else owner.namespace


def secure_clients(spec: FederatedTrainingSpec, owner: Owner) -> dict[str, list[str]]:
    """Namespace -> the in-cluster clients whose Jobs run there, for a secure training ({} for a plain one).

    Remote sites hold their own secrets: their tasks run in their clusters, not here.
    """
    privacy = spec.privacy
    if privacy is None or privacy.secure_aggregation is None:
        return {}
    sites, homes = set(spec.clients.sites()), spec.clients.namespaces()
    found: dict[str, list[str]] = {}
    for client in spec.clients.names():
        if client not in sites:
            found.setdefault(homes.get(client, owner.namespace), []).append(client)
    return found


def secure_secret_name(owner: Owner, namespace: str) -> str:
    """``<training>-secure``; in a client's namespace ``<training namespace>-<training>-secure`` (as Jobs there)."""
    return task_job_name(owner, SECURE_SECRET, namespace)


def secure_secret_manifest(owner: Owner, namespace: str, keys: Mapping[str, bytes]) -> dict[str, Any]:
    """The Secret holding each client's master secret (``keys``: client -> 32 random bytes) in ``namespace``.

    Immutable: its keys are never changed, since a key changed while a round is in flight breaks
    that round's unmasking. Owned by the training in its own namespace (the garbage collector
    deletes it); in a client's namespace, labelled as the Jobs there are, and deleted by the finalizer.
    """
    foreign = namespace != owner.namespace
    secret_labels = {**training_selector(owner), LABEL_MANAGED_BY: MANAGER, LABEL_TRAINING_UID: owner.uid}
    if foreign:
        secret_labels[LABEL_TRAINING_NAMESPACE] = owner.namespace
    metadata: dict[str, Any] = {"name": secure_secret_name(owner, namespace), "namespace": namespace,
                                "labels": secret_labels, "annotations": {ANNOTATION_TRAINING: owner.name}}
    if not foreign:
        metadata["ownerReferences"] = [owner_reference(owner)]
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": True, "metadata": metadata,
            "data": {secret_file(client): base64.b64encode(key).decode() for client, key in sorted(keys.items())}}


def needs_secret(task: Task, spec: FederatedTrainingSpec) -> bool:
    """Whether the task is a secure training's in-cluster client task (train, keys, shares, unmask)."""
    privacy = spec.privacy
    return privacy is not None and privacy.secure_aggregation is not None and task.kind in CLIENT_TASKS \
        and task.client is not None and task.client not in spec.clients.sites()


def secure_secret_volume(owner: Owner, namespace: str, client: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volume and mount that give a client's Job its own key, and no other client's, read-only."""
    volume = {"name": SECURE_VOLUME, "secret": {
        "secretName": secure_secret_name(owner, namespace), "defaultMode": SECRET_MODE,
        "items": [{"key": secret_file(client), "path": secret_file(client)}]}}
    return volume, {"name": SECURE_VOLUME, "mountPath": SECRETS_MOUNT, "readOnly": True}


def accepts(annotation: str | None, owner: Owner) -> bool:
    """Whether a client namespace's ``fedtrain.io/accept-trainings`` lets this training run Jobs there.

    The annotation lists patterns, comma-separated: ``team-a`` (any training of namespace team-a),
    ``team-a/signs`` (one training), globs such as ``team-*/signs-*``, or ``*``.
    """
    wanted = f"{owner.namespace}/{owner.name}"
    for pattern in (p.strip() for p in (annotation or "").split(",")):
        if pattern and fnmatch.fnmatchcase(wanted, pattern if "/" in pattern else f"{pattern}/*"):
            return True
    return False


def owner_reference(owner: Owner) -> dict[str, Any]:
    """Makes the garbage collector delete the object with its training."""
    return {"apiVersion": owner.api_version, "kind": owner.kind, "name": owner.name, "uid": owner.uid,
            "controller": True, "blockOwnerDeletion": True}


def claim_manifest(spec: FederatedTrainingSpec, owner: Owner) -> dict[str, Any]:
    """The claim ``storage.create`` asks for, owned by the training (deleted with it)."""
    assert spec.storage.create is not None
    create = spec.storage.create
    claim_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": create.size}}}
    if create.storage_class_name:
        claim_spec["storageClassName"] = create.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim_name(spec, owner.name), "namespace": owner.namespace,
                         "labels": {**training_selector(owner), LABEL_MANAGED_BY: MANAGER},
                         "ownerReferences": [owner_reference(owner)]},
            "spec": claim_spec}


def worker_account_manifest(namespace: str) -> dict[str, Any]:
    """The ServiceAccount worker Pods run as: nothing is bound to it, and it mounts no token."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
            "metadata": {"name": WORKER_SERVICE_ACCOUNT, "namespace": namespace,
                         "labels": {LABEL_MANAGED_BY: MANAGER, "app.kubernetes.io/name": "fedtrain-worker"}}}


def fit(value: str) -> str:
    """``value`` if it has at most 63 characters, else cut and ending in a hash of the whole (still unique).

    Every name and label value the operator derives from user input goes through here: Kubernetes
    refuses label values (and Job names, which the Job controller copies into a label) over 63.
    """
    if len(value) <= MAX_NAME:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{value[:MAX_NAME - 9].rstrip('-._')}-{digest}"


def job_name(training: str, task_id: str) -> str:
    """``<training>-<task id>``, fitted to 63 characters (see `fit`)."""
    return fit(f"{training}-{task_id}")


def training_selector(owner: Owner) -> dict[str, str]:
    """The label selector of a training's Jobs and Pods."""
    return {LABEL_TRAINING: fit(owner.name)}


def _worker_labels(training: str, kind: str) -> dict[str, str]:
    """What every worker Job (and Pod) carries: the operator finds a training's Jobs by these."""
    return {"app.kubernetes.io/name": "fedtrain-worker", LABEL_MANAGED_BY: MANAGER, LABEL_TRAINING: fit(training),
            LABEL_TASK: kind}


def labels(owner: Owner, task: Task) -> dict[str, str]:
    """Labels linking a Job (and its Pod) to its training, round, client and task."""
    found = {**_worker_labels(owner.name, task.kind), "fedtrain.io/round": str(task.round),
             "fedtrain.io/attempt": str(task.attempt)}
    if task.client:
        found["fedtrain.io/client"] = task.client
    return found


def task_job_name(owner: Owner, task_id: str, namespace: str) -> str:
    """``<training>-<task id>``; in a client's namespace ``<training namespace>-<training>-<task id>``.

    A client namespace may serve trainings of the same name from several namespaces.
    """
    return job_name(owner.name if namespace == owner.namespace else f"{owner.namespace}-{owner.name}", task_id)


def job_manifest(task: Task, spec: FederatedTrainingSpec, owner: Owner, arguments: list[str],
                 claim: str | None) -> dict[str, Any]:
    """The Job that runs ``fedtrain-worker <arguments>`` for ``task``."""
    entry = spec.clients.entry(task.client) if task.client else None
    namespace = job_namespace(spec, owner, task)
    job_labels = {**labels(owner, task), LABEL_TRAINING_UID: owner.uid}
    foreign = namespace != owner.namespace
    if foreign:
        job_labels[LABEL_TRAINING_NAMESPACE] = owner.namespace
    data = entry.data.claim_name if entry is not None and entry.data is not None and task.kind == "train" else None
    job = _worker_job(task_job_name(owner, task.id, namespace), namespace, job_labels, spec, arguments,
                      claim if not foreign else None, entry.resources if entry else None,
                      entry.node_selector if entry else None, entry.tolerations if entry else None,
                      client_data=data, foreign=foreign)
    # Names and labels may be cut (see `fit`): annotations keep the task id and training name whole.
    job["metadata"]["annotations"] = {ANNOTATION_TASK_ID: task.id, ANNOTATION_TRAINING: owner.name}
    if not foreign:
        job["metadata"]["ownerReferences"] = [owner_reference(owner)]
    if task.kind == "train":
        job["spec"]["activeDeadlineSeconds"] = spec.round_deadline_seconds
    if task.client is not None and needs_secret(task, spec):
        volume, mount = secure_secret_volume(owner, namespace, task.client)
        pod = job["spec"]["template"]["spec"]
        pod["volumes"].append(volume)
        pod["containers"][0]["volumeMounts"].append(mount)
    return job


def cleanup_job_manifest(spec: FederatedTrainingSpec, owner: Owner, claim: str | None) -> dict[str, Any]:
    """The Job that deletes the training's directory (reclaim policy Delete).

    It has no owner reference on purpose: it runs while its training is being deleted, and a
    foreground deletion would have the garbage collector remove it before it finished. The
    finalizer deletes it once it is done.
    """
    job = _worker_job(job_name(owner.name, CLEANUP_TASK), owner.namespace, _worker_labels(owner.name, CLEANUP_TASK),
                      spec, ["remove", "--workdir", placement(spec, owner).workdir], claim)
    job["metadata"]["annotations"] = {ANNOTATION_TASK_ID: CLEANUP_TASK, ANNOTATION_TRAINING: owner.name,
                                      "fedtrain.io/training-uid": owner.uid}
    job["spec"]["activeDeadlineSeconds"] = 600
    return job


def _worker_job(name: str, namespace: str, job_labels: dict[str, str], spec: FederatedTrainingSpec,
                arguments: list[str], claim: str | None, resources: dict[str, Any] | None = None,
                node_selector: dict[str, str] | None = None, tolerations: list[dict[str, Any]] | None = None,
                client_data: str | None = None, foreign: bool = False) -> dict[str, Any]:
    """A one-Pod, never-retried Job running the worker image: per-client settings win over ``spec.worker``.

    A Job in a client's namespace gets none of ``worker.volumes``, ``volumeMounts`` and ``env``:
    they name objects of the training's namespace. It mounts the client's own claim read-only.
    """
    worker = spec.worker
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if claim is not None:
        volumes.insert(0, {"name": "store", "persistentVolumeClaim": {"claimName": claim}})
        mounts.insert(0, {"name": "store", "mountPath": STORE_MOUNT})
    if client_data is not None:
        volumes.append({"name": "client-data", "persistentVolumeClaim": {"claimName": client_data, "readOnly": True}})
        mounts.append({"name": "client-data", "mountPath": CLIENT_DATA_MOUNT, "readOnly": True})
    s3_env, s3_volumes, s3_mounts = _object_store(spec, namespace)
    if not foreign:
        volumes += worker.volumes or []
        mounts += worker.volume_mounts or []
    container: dict[str, Any] = {
        "name": "worker", "image": worker.image or operator_worker_image(), "imagePullPolicy": worker.image_pull_policy,
        "command": ["fedtrain-worker"], "args": arguments, "workingDir": "/tmp",
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
                {"name": "PYTHONUNBUFFERED", "value": "1"}, *s3_env, *([] if foreign else worker.env or [])],
        "resources": resources or worker.resources or {},
        "volumeMounts": [*mounts, *s3_mounts],
        # A worker that fails writes nothing there: the last lines of its log become the message.
        "terminationMessagePath": TERMINATION_LOG, "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never", "serviceAccountName": WORKER_SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [*volumes, *s3_volumes],
    }
    if node_selector or worker.node_selector:
        pod_spec["nodeSelector"] = node_selector or worker.node_selector
    if tolerations or worker.tolerations:
        pod_spec["tolerations"] = tolerations or worker.tolerations
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": job_labels},
        "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": job_labels, "annotations": POD_ANNOTATIONS},
                                                 "spec": pod_spec}},
    }


def _object_store(spec: FederatedTrainingSpec, namespace: str
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Env, volumes and mounts that give a training's worker its object store (none with a claim)."""
    if spec.storage.s3 is None:
        return [], [], []
    return object_store_access(spec.storage.s3, namespace)


def object_store_access(s3: S3Spec, namespace: str
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Env, volumes and mounts that give a worker an object store: settings, the Secret's keys, the CA bundle.

    The keys go by reference (their values never enter a Job). A coordinator's workers and a site's
    use it alike.
    """
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in s3_environment(s3).items()]
    secret = s3.credentials_secret
    if secret is not None:
        env += [{"name": S3_ENV["access_key_id"],
                 "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.access_key_id_key}}},
                {"name": S3_ENV["secret_access_key"],
                 "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.secret_access_key_key}}},
                {"name": S3_ENV["credentials_from"], "value": f"Secret {namespace}/{secret.name} (keys "
                                                              f"{secret.access_key_id_key}, "
                                                              f"{secret.secret_access_key_key})"}]
    ca = s3.tls.ca_config_map
    if ca is None:
        return env, [], []
    env.append({"name": S3_ENV["ca_bundle"], "value": f"{S3_CA_MOUNT}/{ca.key}"})
    volume = {"name": "s3-ca", "configMap": {"name": ca.name, "items": [{"key": ca.key, "path": ca.key}]}}
    return env, [volume], [{"name": "s3-ca", "mountPath": S3_CA_MOUNT, "readOnly": True}]


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return dict(condition)
    return None


def finished(job: dict[str, Any]) -> bool:
    """Whether the Job controller has marked the Job Complete or Failed."""
    return bool(_condition(job, "Complete") or _condition(job, "Failed"))


def _container_state(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    worker = next((s for s in statuses if s.get("name") == "worker"), statuses[0] if statuses else {})
    return dict(worker.get("state") or {})


def _unschedulable(pod: dict[str, Any]) -> str | None:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"{condition.get('reason', 'Unschedulable')}: {condition.get('message', '')}".strip(": ")
    return None


def pod_view(pod: dict[str, Any]) -> dict[str, Any]:
    """What `observe` reads of a Pod (its names, labels, container states and conditions), for an index to keep.

    A Pod's spec (containers, environment, volumes) is most of its size and nothing a decision reads.
    """
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    return {"metadata": {k: meta[k] for k in ("name", "namespace", "labels", "creationTimestamp") if k in meta},
            "status": {k: status[k] for k in ("containerStatuses", "conditions") if k in status}}


def job_of(pod: dict[str, Any]) -> str | None:
    """The name of the Job that made the Pod (the label the Job controller sets, or its pre-1.27 spelling)."""
    pod_labels = pod["metadata"].get("labels") or {}
    return pod_labels.get("batch.kubernetes.io/job-name") or pod_labels.get("job-name")


def has_ended(pods: list[dict[str, Any]]) -> bool:
    """Whether the last of a Job's Pods (oldest first) shows its worker's end: the exit code and message are there."""
    return bool(pods) and "terminated" in _container_state(pods[-1])


def observe(job: dict[str, Any], pods: list[dict[str, Any]]) -> Observation:
    """What the engine should know of a task from its Job and the Job's Pod(s)."""
    pod = pods[-1] if pods else {}
    state = _container_state(pod)
    terminated = state.get("terminated") or {}
    if _condition(job, "Complete"):
        message = terminated.get("message") or ""
        try:
            output = json.loads(message) if message else None
        except ValueError:
            output = None
        return Observation("succeeded", 0, output if isinstance(output, dict) else None)
    failed = _condition(job, "Failed")
    if failed:
        code = terminated.get("exitCode")
        why = terminated.get("reason") or failed.get("reason") or "Failed"
        detail = (terminated.get("message") or failed.get("message") or "").strip()
        reason = f"{why}: {detail[:300]}" if detail and why != "Error" else (detail[:300] or why)
        return Observation("failed", int(code) if code is not None else None, None, reason)
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in STUCK_WAITING:  # the executor deletes such a Job: it would wait forever
        return Observation("failed", None, None, f"{waiting['reason']}: {waiting.get('message', '')}".strip(": "))
    return Observation("running", None, None, _unschedulable(pod))
