"""Kubernetes Jobs for engine tasks, and engine observations from Jobs: pure functions, no API calls.

The operator's executor builds each task's Job here and reads finished Jobs (and their Pods) back
into `Observation`s. Kept free of kopf, the Kubernetes client and torch, so that it is tested as
plain data and the operator image stays small.

- Names are deterministic (``<training>-<task id>``), so a restarted operator that creates the
  same Job gets 409 AlreadyExists and moves on. Over 63 characters, the name is cut and ends in a
  hash of the whole.
- ``backoffLimit: 0``: Kubernetes does not retry; the engine does, as a new attempt with a new
  name, so every failure is seen and counted once.
- The owner reference makes the API server's garbage collector delete the Jobs with the training.
- Pods run as non-root with a read-only root filesystem; ``/tmp`` is an emptyDir. The storage
  claim is mounted at ``/store``, and the worker service account has no API rights (no token).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from fedtrain.engine.status import Observation, Task
from fedtrain.spec import FederatedTrainingSpec

MAX_NAME = 63
STORE_MOUNT = "/store"
TERMINATION_LOG = "/dev/termination-log"
WORKER_SERVICE_ACCOUNT = "fedtrain-worker"
LABEL_TRAINING = "fedtrain.io/training"
LABEL_TASK = "fedtrain.io/task"
# Waiting reasons that will not resolve by waiting: the task fails now, with the reason.
STUCK_WAITING = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError")


@dataclass(frozen=True)
class Owner:
    """The FederatedTraining a Job belongs to."""

    name: str
    namespace: str
    uid: str
    api_version: str = "fedtrain.io/v1alpha1"
    kind: str = "FederatedTraining"


def job_name(training: str, task_id: str) -> str:
    """``<training>-<task id>``, cut to 63 characters with a hash suffix when longer (still unique)."""
    name = f"{training}-{task_id}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:MAX_NAME - 9].rstrip('-')}-{digest}"


def labels(owner: Owner, task: Task) -> dict[str, str]:
    """Labels linking a Job (and its Pod) to its training, round, client and task."""
    found = {"app.kubernetes.io/name": "fedtrain-worker", "app.kubernetes.io/managed-by": "fedtrain-operator",
             LABEL_TRAINING: owner.name, LABEL_TASK: task.kind, "fedtrain.io/round": str(task.round),
             "fedtrain.io/attempt": str(task.attempt)}
    if task.client:
        found["fedtrain.io/client"] = task.client
    return found


def job_manifest(task: Task, spec: FederatedTrainingSpec, owner: Owner, arguments: list[str], claim: str,
                 workdir: str) -> dict[str, Any]:
    """The Job that runs ``fedtrain-worker <arguments>`` for ``task``."""
    worker = spec.worker
    entry = spec.clients.entry(task.client) if task.client else None
    resources = (entry.resources if entry and entry.resources else worker.resources) or {}
    node_selector = (entry.node_selector if entry and entry.node_selector else worker.node_selector) or {}
    tolerations = (entry.tolerations if entry and entry.tolerations else worker.tolerations) or []
    task_labels = labels(owner, task)
    container: dict[str, Any] = {
        "name": "worker", "image": worker.image, "imagePullPolicy": worker.image_pull_policy,
        "command": ["fedtrain-worker"], "args": arguments, "workingDir": workdir,
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
                {"name": "PYTHONUNBUFFERED", "value": "1"}],
        "resources": resources,
        "volumeMounts": [{"name": "store", "mountPath": STORE_MOUNT}, {"name": "tmp", "mountPath": "/tmp"}],
        "terminationMessagePath": TERMINATION_LOG, "terminationMessagePolicy": "File",
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never", "serviceAccountName": WORKER_SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "store", "persistentVolumeClaim": {"claimName": claim}},
                    {"name": "tmp", "emptyDir": {}}],
    }
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    job_spec: dict[str, Any] = {"backoffLimit": 0, "template": {"metadata": {"labels": task_labels},
                                                                 "spec": pod_spec}}
    if task.kind == "train":
        job_spec["activeDeadlineSeconds"] = spec.round_deadline_seconds
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {
            "name": job_name(owner.name, task.id), "namespace": owner.namespace, "labels": task_labels,
            "annotations": {"fedtrain.io/task-id": task.id},  # names may be cut; the id is kept whole
            "ownerReferences": [{"apiVersion": owner.api_version, "kind": owner.kind, "name": owner.name,
                                 "uid": owner.uid, "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": job_spec,
    }


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return dict(condition)
    return None


def _container_state(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    worker = next((s for s in statuses if s.get("name") == "worker"), statuses[0] if statuses else {})
    return dict(worker.get("state") or {})


def _unschedulable(pod: dict[str, Any]) -> str | None:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"{condition.get('reason', 'Unschedulable')}: {condition.get('message', '')}".strip(": ")
    return None


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
