"""Kubeflow profiles: what a profile namespace needs to run trainings, as pure data.

A Kubeflow ``Profile`` (cluster-scoped, ``kubeflow.org/v1``) owns a namespace of the same name. For
each profile the operator keeps three objects in that namespace:

- the ``fedtrain-worker`` ServiceAccount that worker Pods run as (no bindings, no token);
- optionally, when the profile is annotated ``fedtrain.io/storage-size``, a claim ``fedtrain-store``
  that trainings without a ``storage`` section use;
- the ConfigMap ``fedtrain-defaults`` naming those defaults (default claim, MLflow experiment
  ``<profile>/<training>`` when annotated ``fedtrain.io/mlflow-experiments: per-training``, and a
  tracking URI from ``fedtrain.io/mlflow-tracking-uri``). The controller fills a training's missing
  fields from it; a ConfigMap written by hand works the same in a namespace without Kubeflow.

Every object carries an owner reference to the Profile, so the garbage collector removes it with
the profile even if the operator is down at the time.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from fedtrain.operator.jobs import LABEL_MANAGED_BY, MANAGER, worker_account_manifest
from fedtrain.spec import STORAGE_KINDS

PROFILE_GROUP, PROFILE_VERSION, PROFILE_PLURAL = "kubeflow.org", "v1", "profiles"
LABEL_PROFILE = "fedtrain.io/profile"
DEFAULTS_CONFIGMAP = "fedtrain-defaults"
DEFAULT_CLAIM = "fedtrain-store"
ANNOTATION_STORAGE_SIZE = "fedtrain.io/storage-size"
ANNOTATION_STORAGE_CLASS = "fedtrain.io/storage-class"
ANNOTATION_STORAGE_ACCESS = "fedtrain.io/storage-access-mode"
ANNOTATION_EXPERIMENTS = "fedtrain.io/mlflow-experiments"
ANNOTATION_TRACKING_URI = "fedtrain.io/mlflow-tracking-uri"
WORKER_IMAGE_DEFAULT = "workerImage"  # a defaults key: the image of trainings that name none
SIZE = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
ACCESS_MODES = ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod")


@dataclass(frozen=True)
class Provision:
    """The objects a profile's namespace should hold, and the annotation values that were ignored (with why)."""

    namespace: str
    objects: list[dict[str, Any]]
    problems: list[str]


def _profile_reference(profile: dict[str, Any]) -> dict[str, Any]:
    """Not a controller reference and not blocking: Kubeflow's profile controller owns the namespace."""
    meta = profile["metadata"]
    return {"apiVersion": f"{PROFILE_GROUP}/{PROFILE_VERSION}", "kind": "Profile", "name": meta["name"],
            "uid": meta["uid"], "controller": False, "blockOwnerDeletion": False}


def _mark(manifest: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    marked = copy.deepcopy(manifest)
    meta = marked["metadata"]
    meta["labels"] = {**meta.get("labels", {}), LABEL_MANAGED_BY: MANAGER, LABEL_PROFILE: profile["metadata"]["name"]}
    meta["ownerReferences"] = [_profile_reference(profile)]
    return marked


def _claim(namespace: str, annotations: dict[str, str], problems: list[str]) -> dict[str, Any] | None:
    size = annotations.get(ANNOTATION_STORAGE_SIZE)
    if size is None:
        return None
    if not SIZE.match(size):
        problems.append(f"{ANNOTATION_STORAGE_SIZE}: {size!r} is not a quantity such as 20Gi; no claim was created")
        return None
    access = annotations.get(ANNOTATION_STORAGE_ACCESS, "ReadWriteOnce")
    if access not in ACCESS_MODES:
        problems.append(f"{ANNOTATION_STORAGE_ACCESS}: {access!r} is not one of {', '.join(ACCESS_MODES)}; "
                        "using ReadWriteOnce")
        access = "ReadWriteOnce"
    spec: dict[str, Any] = {"accessModes": [access], "resources": {"requests": {"storage": size}}}
    if annotations.get(ANNOTATION_STORAGE_CLASS):
        spec["storageClassName"] = annotations[ANNOTATION_STORAGE_CLASS]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": DEFAULT_CLAIM, "namespace": namespace}, "spec": spec}


def _defaults(namespace: str, profile: str, annotations: dict[str, str], has_claim: bool,
              problems: list[str]) -> dict[str, Any]:
    data: dict[str, str] = {}
    if has_claim:
        data["storageClaim"] = DEFAULT_CLAIM
    experiments = annotations.get(ANNOTATION_EXPERIMENTS)
    if experiments == "per-training":
        data["mlflowExperiment"] = f"{profile}/{{training}}"
    elif experiments is not None:
        problems.append(f"{ANNOTATION_EXPERIMENTS}: {experiments!r} is not 'per-training'; trainings keep their own "
                        "experiment")
    if annotations.get(ANNOTATION_TRACKING_URI):
        data["mlflowTrackingUri"] = annotations[ANNOTATION_TRACKING_URI]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": DEFAULTS_CONFIGMAP, "namespace": namespace},
            "data": data}


def provision(profile: dict[str, Any]) -> Provision:
    """What the profile's namespace should hold, from the profile's name and annotations."""
    meta = profile["metadata"]
    namespace = meta["name"]  # Kubeflow names a profile's namespace after the profile
    annotations = meta.get("annotations") or {}
    problems: list[str] = []
    claim = _claim(namespace, annotations, problems)
    wanted = [worker_account_manifest(namespace), *([claim] if claim else []),
              _defaults(namespace, meta["name"], annotations, claim is not None, problems)]
    return Provision(namespace, [_mark(m, profile) for m in wanted], problems)


def apply_defaults(raw_spec: dict[str, Any], defaults: dict[str, str], training: str) -> dict[str, Any]:
    """The spec with what it leaves out taken from a namespace's ``fedtrain-defaults`` data (never overriding)."""
    spec = copy.deepcopy(raw_spec)
    storage = spec.get("storage") or {}
    if defaults.get("storageClaim") and not any(k in storage for k in STORAGE_KINDS):
        spec["storage"] = {**storage, "persistentVolumeClaim": {"claimName": defaults["storageClaim"]}}
    mlflow = dict(spec.get("mlflow") or {})
    if defaults.get("mlflowExperiment") and "experiment" not in mlflow:
        mlflow["experiment"] = defaults["mlflowExperiment"].replace("{training}", training)
    if defaults.get("mlflowTrackingUri") and "trackingUri" not in mlflow:
        mlflow["trackingUri"] = defaults["mlflowTrackingUri"]
    if mlflow:
        spec["mlflow"] = mlflow
    worker = spec.get("worker") or {}
    if defaults.get(WORKER_IMAGE_DEFAULT) and worker.get("image") is None:
        spec["worker"] = {**worker, "image": defaults[WORKER_IMAGE_DEFAULT]}
    return spec
