"""Kubeflow profiles through the operator: provisioning, repair, defaults for trainings, cleanup."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from fedtrain.spec import DEFAULT_WORKER_IMAGE, WORKER_IMAGE_ENV
from tests.operator.conftest import NAMESPACE, Cluster, tiny_training

PROFILES = "/apis/kubeflow.org/v1/profiles"
CORE = f"/api/v1/namespaces/{NAMESPACE}"
pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]


def profile(**annotations: str) -> dict[str, Any]:
    """A Kubeflow profile whose namespace is the test namespace."""
    return {"apiVersion": "kubeflow.org/v1", "kind": "Profile",
            "metadata": {"name": NAMESPACE, "annotations": annotations},
            "spec": {"owner": {"kind": "User", "name": "ana@example.com"}}}


async def eventually(probe: Callable[[], Any], timeout: float = 20) -> Any:
    """Poll ``probe`` (a coroutine function) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out; last value {value!r}")
        await asyncio.sleep(0.1)


async def present(cluster: Cluster, plural: str, name: str) -> dict[str, Any] | None:
    found = await cluster.request("GET", f"{CORE}/{plural}/{name}")
    return found if found.get("metadata") else None


async def provisioned(cluster: Cluster, plural: str, name: str) -> dict[str, Any] | None:
    """The object, once it is the profile's (a worker account made for an earlier training is taken over)."""
    found = await present(cluster, plural, name)
    return found if found and "fedtrain.io/profile" in found["metadata"].get("labels", {}) else None


async def exercise_profile(cluster: Cluster) -> None:
    """Create a profile, break and change what it owns, then delete it: what every profile test relies on."""
    created = await cluster.request("POST", PROFILES, profile(**{
        "fedtrain.io/storage-size": "2Gi", "fedtrain.io/storage-class": "nfs",
        "fedtrain.io/mlflow-experiments": "per-training"}), status=200)
    account = await eventually(lambda: provisioned(cluster, "serviceaccounts", "fedtrain-worker"))
    claim = await eventually(lambda: provisioned(cluster, "persistentvolumeclaims", "fedtrain-store"))
    defaults = await eventually(lambda: provisioned(cluster, "configmaps", "fedtrain-defaults"))
    assert account["automountServiceAccountToken"] is False
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}},
                             "storageClassName": "nfs"}
    assert defaults["data"] == {"storageClaim": "fedtrain-store", "mlflowExperiment": f"{NAMESPACE}/{{training}}"}
    for item in (account, claim, defaults):
        reference = item["metadata"]["ownerReferences"][0]
        assert (reference["kind"], reference["uid"]) == ("Profile", created["metadata"]["uid"])
        assert item["metadata"]["labels"]["fedtrain.io/profile"] == NAMESPACE

    # Someone deletes what the profile needs: it comes back.
    for plural, name in (("serviceaccounts", "fedtrain-worker"), ("configmaps", "fedtrain-defaults")):
        await cluster.request("DELETE", f"{CORE}/{plural}/{name}")
        await eventually(lambda plural=plural, name=name: present(cluster, plural, name))

    # The profile's annotations change: the defaults follow; the claim (data) stays.
    await cluster.request("PATCH", f"{PROFILES}/{NAMESPACE}", {"metadata": {"annotations": {
        "fedtrain.io/mlflow-experiments": None, "fedtrain.io/mlflow-tracking-uri": "http://mlflow.kubeflow:5000"}}})

    async def updated() -> bool:
        found = await present(cluster, "configmaps", "fedtrain-defaults")
        return bool(found) and found["data"] == {"storageClaim": "fedtrain-store",
                                                 "mlflowTrackingUri": "http://mlflow.kubeflow:5000"}
    await eventually(updated)


async def delete_profile(cluster: Cluster) -> None:
    await cluster.request("DELETE", f"{PROFILES}/{NAMESPACE}")

    async def gone() -> bool:
        return not any([await present(cluster, "serviceaccounts", "fedtrain-worker"),
                        await present(cluster, "persistentvolumeclaims", "fedtrain-store"),
                        await present(cluster, "configmaps", "fedtrain-defaults")])
    await eventually(gone)


def operator_calls(cluster: Cluster, method: str, path: str, since: int) -> list[Any]:
    """The operator's requests (kopf's and its own client's) of ``method`` on ``path`` after request ``since``."""
    return [r for r in cluster.server._requests[since:]
            if str(r.method.value) == method and r.url.path == path
            and r.headers.get("User-Agent", "").startswith(("kopf/", "OpenAPI-Generator"))]


async def test_profile_namespace_is_provisioned_repaired_and_cleaned_up(cluster: Cluster) -> None:
    await cluster.start_operator()
    await exercise_profile(cluster)
    since = len(cluster.server._requests)
    await delete_profile(cluster)

    # The deletions of the account, the claim and the defaults each make the operator look the profile up
    # before it repairs anything: once it has done so three times (and been told 404), it has handled them.
    async def handled() -> bool:
        return len(operator_calls(cluster, "GET", f"{PROFILES}/{NAMESPACE}", since)) >= 3
    await eventually(handled)
    assert await present(cluster, "serviceaccounts", "fedtrain-worker") is None  # nothing is put back
    for plural in ("serviceaccounts", "persistentvolumeclaims", "configmaps"):
        assert operator_calls(cluster, "POST", f"{CORE}/{plural}", since) == []


async def test_profile_provisioned_before_the_operator_started(cluster: Cluster) -> None:
    await cluster.request("POST", PROFILES, profile(), status=200)
    await cluster.start_operator()
    await eventually(lambda: present(cluster, "serviceaccounts", "fedtrain-worker"))
    defaults = await eventually(lambda: present(cluster, "configmaps", "fedtrain-defaults"))
    assert defaults["data"] == {}
    assert await present(cluster, "persistentvolumeclaims", "fedtrain-store") is None


async def test_a_bad_annotation_creates_no_claim(cluster: Cluster) -> None:
    await cluster.request("POST", PROFILES, profile(**{"fedtrain.io/storage-size": "lots"}), status=200)
    await cluster.start_operator()
    await eventually(lambda: present(cluster, "configmaps", "fedtrain-defaults"))
    assert await present(cluster, "persistentvolumeclaims", "fedtrain-store") is None


async def test_training_that_leaves_storage_and_experiment_out_uses_the_profile_defaults(cluster: Cluster) -> None:
    await cluster.request("POST", PROFILES, profile(**{"fedtrain.io/storage-size": "2Gi",
                                                       "fedtrain.io/mlflow-experiments": "per-training"}), status=200)
    await cluster.start_operator()
    await eventually(lambda: present(cluster, "configmaps", "fedtrain-defaults"))
    manifest = tiny_training(rounds=1)
    del manifest["spec"]["storage"], manifest["spec"]["mlflow"]
    await cluster.apply(manifest)
    done = await cluster.wait_for("signs", lambda r: r.get("status", {}).get("phase") in ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert "storage" not in done["spec"]  # the defaults are applied, not written into the user's spec
    jobs = await cluster.jobs()
    claims = {v["persistentVolumeClaim"]["claimName"] for j in jobs for v in j["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {"fedtrain-store"}
    finalize = next(j for j in jobs if j["metadata"]["labels"]["fedtrain.io/task"] == "finalize")
    args = finalize["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--experiment") + 1] == f"{NAMESPACE}/signs"


async def test_a_training_keeps_the_defaults_it_started_with(cluster: Cluster) -> None:
    """Defaults written just before a training reach it; an edit while it runs moves nothing (read once, kept)."""
    defaults = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fedtrain-defaults"},
                "data": {"mlflowExperiment": "team/{training}"}}
    await cluster.request("POST", f"{CORE}/configmaps", defaults, status=200)
    await cluster.start_operator()
    manifest = tiny_training(rounds=1)
    del manifest["spec"]["mlflow"]
    cluster.runner.paused = True  # the training waits in its first stage while the defaults change
    try:
        await cluster.apply(manifest)
        started = await cluster.wait_for("signs", lambda r: r.get("status", {}).get("namespaceDefaults"))
        assert started["status"]["namespaceDefaults"] == {"mlflowExperiment": "team/{training}",
                                                          "workerImage": DEFAULT_WORKER_IMAGE}
        await cluster.request("PATCH", f"{CORE}/configmaps/fedtrain-defaults",
                              {"data": {"mlflowExperiment": "moved/{training}"}}, status=200)
    finally:
        cluster.runner.paused = False
    done = await cluster.wait_for("signs", lambda r: r.get("status", {}).get("phase") in ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", done["status"]
    finalize = next(j for j in await cluster.jobs() if j["metadata"]["labels"]["fedtrain.io/task"] == "finalize")
    args = finalize["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--experiment") + 1] == "team/signs"


def images(jobs: list[dict[str, Any]]) -> set[str]:
    return {j["spec"]["template"]["spec"]["containers"][0]["image"] for j in jobs}


async def test_a_training_naming_no_image_runs_the_operators_and_keeps_it_through_a_rollout(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKER_IMAGE_ENV, "registry.example/fedtrain/worker:1")
    await cluster.start_operator()
    manifest = tiny_training(rounds=1)
    del manifest["spec"]["worker"]["image"]
    cluster.runner.paused = True
    try:
        await cluster.apply(manifest)
        started = await cluster.wait_for("signs", lambda r: r.get("status", {}).get("namespaceDefaults"))
        assert started["status"]["namespaceDefaults"] == {"workerImage": "registry.example/fedtrain/worker:1"}
        monkeypatch.setenv(WORKER_IMAGE_ENV, "registry.example/fedtrain/worker:2")  # the setting changes
    finally:
        cluster.runner.paused = False
    done = await cluster.wait_for("signs", lambda r: r.get("status", {}).get("phase") in ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert "image" not in done["spec"]["worker"]  # applied, not written into the user's spec
    assert images(await cluster.jobs()) == {"registry.example/fedtrain/worker:1"}


async def test_a_namespaces_image_beats_the_operators_and_a_specs_beats_both(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKER_IMAGE_ENV, "registry.example/fedtrain/worker:1")
    defaults = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fedtrain-defaults"},
                "data": {"workerImage": "team.example/worker:7"}}
    await cluster.request("POST", f"{CORE}/configmaps", defaults, status=200)
    await cluster.start_operator()
    silent = tiny_training("silent", rounds=1)
    del silent["spec"]["worker"]["image"]
    await cluster.apply(silent)
    await cluster.apply(tiny_training("named", rounds=1))
    for name in ("silent", "named"):
        done = await cluster.wait_for(name, lambda r: r.get("status", {}).get("phase") in ("Succeeded", "Failed"))
        assert done["status"]["phase"] == "Succeeded", done["status"]
    jobs = await cluster.jobs()
    assert images([j for j in jobs if j["metadata"]["name"].startswith("silent-")]) == {"team.example/worker:7"}
    assert images([j for j in jobs if j["metadata"]["name"].startswith("named-")]) == {"fedtrain/worker:test"}


async def test_secret_from_another_namespace_is_refused(cluster: Cluster) -> None:
    await cluster.start_operator()
    await cluster.apply(tiny_training(worker={"env": [{"name": "MLFLOW_TRACKING_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "mlflow", "key": "token", "namespace": "kubeflow"}}}]}))
    done = await cluster.wait_for("signs", lambda r: r.get("status", {}).get("phase") == "Failed", timeout=30)
    assert done["status"]["reason"] == "InvalidSpec"
    assert "worker.env[0].valueFrom.secretKeyRef.namespace" in done["status"]["message"]
    assert await cluster.jobs() == []
