"""A deleted training's finalizer: tell its sites, delete its Jobs and Secrets in client namespaces, remove weights.

Jobs and Secrets in the training's namespace go with it (owner references); those in client
namespaces have none, and weights kept with ``reclaimPolicy: Delete`` are removed by a cleanup Job
of their own.
Called again every few seconds until it says it is done, so each step finds where the last stopped.
"""

from __future__ import annotations

from typing import Any

from fedtrain.engine.status import Event, Reason
from fedtrain.operator.jobs import (
    CLEANUP_TASK,
    LABEL_TASK,
    Owner,
    claim_name,
    cleanup_job_manifest,
    job_name,
    observe,
    training_selector,
)
from fedtrain.operator.kube import ApiError, Paths
from fedtrain.operator.secure_secrets import delete_foreign_secrets
from fedtrain.operator.site_relays import SiteRelays
from fedtrain.operator.status import read_status
from fedtrain.operator.training_api import TrainingApi
from fedtrain.spec import API_VERSION, KIND, SpecError, parse_spec


async def release_storage(api: TrainingApi, relays: SiteRelays, namespace: str, name: str, uid: str,
                          raw_spec: dict[str, Any], raw_status: dict[str, Any]) -> bool:
    """On deletion: remove Jobs and Secrets in client namespaces; with ``reclaimPolicy: Delete`` also the weights.

    True when done. Jobs in the training's namespace go with it (owner references); those in
    client namespaces have none, so they are deleted here by label, and secure aggregation's
    Secrets there by name. The weights are where the training kept them: its spec with the
    defaults its status holds.
    """
    kube = api.kube
    try:
        status = read_status({"status": raw_status})
        spec = parse_spec(await api.effective_spec(namespace, name, raw_spec, status), f"{namespace}/{name}")
    except SpecError:
        return True  # it never ran, so there is nothing to remove
    owner = Owner(name, namespace, uid)
    resource = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace,
                                                                      "uid": uid}}
    await relays.tell_deleted(resource, spec, owner)
    remove_weights = spec.storage.reclaim_policy == "Delete" and (spec.storage.persistent_volume_claim is not None
                                                                  or spec.storage.s3 is not None)
    if not remove_weights and not spec.clients.namespaces():
        return True  # Retain; or a claim the operator created, which the garbage collector deletes
    jobs, pods = await api.worker_objects(spec, owner)
    for job in jobs:
        if job["metadata"]["namespace"] != namespace and not job["metadata"].get("deletionTimestamp"):
            await kube.delete(Paths.jobs(job["metadata"]["namespace"], job["metadata"]["name"]))
    await delete_foreign_secrets(kube, spec, owner)
    if not remove_weights:
        return True
    for job in await kube.list(Paths.jobs(namespace), training_selector(owner)):
        meta = job["metadata"]
        if meta["labels"].get(LABEL_TASK) != CLEANUP_TASK and not meta.get("deletionTimestamp"):
            await kube.delete(Paths.jobs(namespace, job["metadata"]["name"]))
    if any(p["metadata"]["labels"].get(LABEL_TASK) != CLEANUP_TASK and p.get("status", {}).get("phase") in
           ("Pending", "Running") for p in pods):
        return False  # a worker may still write into the directory
    cleanup = job_name(name, CLEANUP_TASK)
    try:
        job = await kube.get(Paths.jobs(namespace, cleanup))
    except ApiError as error:
        if error.status != 404:
            raise
        await kube.create(Paths.jobs(namespace), cleanup_job_manifest(spec, owner, claim_name(spec, name)))
        return False
    if (job["metadata"].get("annotations") or {}).get("fedtrain.io/training-uid") != uid:
        await kube.delete(Paths.jobs(namespace, cleanup))  # left by an earlier training of that name
        return False
    seen = observe(job, [p for p in pods if p["metadata"]["labels"].get(LABEL_TASK) == CLEANUP_TASK])
    if seen.state == "running":
        return False
    if seen.state == "failed":
        await api.post(resource, Event(Reason.STORAGE_NOT_RELEASED, f"the training's directory was not removed: "
                                                                    f"{seen.reason}", warning=True))
    await kube.delete(Paths.jobs(namespace, cleanup))
    return True
