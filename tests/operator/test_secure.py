"""Secure aggregation through the operator: the clients' keys in a Secret, each client's Jobs mounting only its own.

The training's Jobs run as local processes that see their secret volumes as a kubelet writes them
(`tests.operator.secret_volumes`): only the selected key, root-owned with the Pod's fsGroup, read-only.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from fedtrain.engine.status import Reason
from fedtrain.operator.jobs import Owner
from fedtrain.operator.kube import Kube
from fedtrain.operator.secure_secrets import SecureSecrets, delete_foreign_secrets
from fedtrain.operator.training_api import Refusal
from fedtrain.spec import parse_spec
from tests.operator.conftest import NAMESPACE, Cluster, condition, tiny_training

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(400)]
SECURE = {"clipNorm": 20.0, "secureAggregation": {"threshold": 3}}
CLIENTS = ["client-00", "client-01", "client-02", "client-03"]
SECRETS = f"/api/v1/namespaces/{NAMESPACE}/secrets"


def ended(resource: dict[str, Any]) -> bool:
    """``kubectl wait --for=condition=Succeeded`` (or Failed, to fail at once)."""
    return "True" in (condition(resource, "Succeeded").get("status"), condition(resource, "Failed").get("status"))


def secret_volumes_of(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [v["secret"] for v in job["spec"]["template"]["spec"]["volumes"] if "secret" in v]


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


async def test_a_secure_training_runs_each_client_on_its_own_mounted_key_and_stores_no_update(
        cluster: Cluster) -> None:
    manifest = tiny_training("guarded", clients={"count": 4, "minSuccessful": 3, "maxExamples": 200},
                             privacy=SECURE)
    await cluster.start_operator()
    await cluster.apply(manifest)
    done = await cluster.wait_for("guarded", ended, timeout=360)
    assert condition(done, "Succeeded")["status"] == "True", done["status"]
    uid = done["metadata"]["uid"]
    assert [r.get("accepted") for r in done["status"]["rounds"]] == [CLIENTS, CLIENTS]

    secret = await cluster.request("GET", f"{SECRETS}/guarded-secure")
    assert secret["immutable"] is True and secret["type"] == "Opaque"
    assert [(o["kind"], o["uid"]) for o in secret["metadata"]["ownerReferences"]] == [("FederatedTraining", uid)]
    assert secret["metadata"]["labels"]["fedtrain.io/training"] == "guarded"
    keys = {name: base64.b64decode(value) for name, value in secret["data"].items()}
    assert sorted(keys) == [f"{c}.key" for c in CLIENTS]
    assert all(len(k) == 32 for k in keys.values()) and len(set(keys.values())) == 4

    jobs = await cluster.jobs()
    by_task: dict[str, list[str]] = {}
    for job in jobs:
        labels = job["metadata"]["labels"]
        by_task.setdefault(labels["fedtrain.io/task"], []).append(job["metadata"]["name"])
        client = labels.get("fedtrain.io/client")
        if client is None:  # init, the aggregations, finalize: no client's key
            assert secret_volumes_of(job) == [], job["metadata"]["name"]
            continue
        assert secret_volumes_of(job) == [{"secretName": "guarded-secure", "defaultMode": 0o440,
                                           "items": [{"key": f"{client}.key", "path": f"{client}.key"}]}]
    assert {kind: len(names) for kind, names in by_task.items()} == {
        "init": 1, "keys": 8, "shares": 8, "train": 8, "unmask": 8, "aggregate": 2, "finalize": 1}
    assert len(cluster.runner.ran) == len(set(cluster.runner.ran)) == len(jobs)  # each ran once, none failed

    workdir = cluster.runner.store / NAMESPACE / f"guarded-{uid[:8]}"
    for round_number in (1, 2):
        folder = workdir / f"round-{round_number:04d}"
        assert not (folder / "clients").exists() or not list((folder / "clients").glob("*.safetensors")), \
            "an update in the clear"
        assert sorted(p.parent.name for p in folder.glob("secure-a1/*/masked.safetensors")) == CLIENTS
    stored = [path.read_bytes() for path in files(workdir)]
    assert not any(key in content for key in keys.values() for content in stored), "a client's key in the store"
    assert not (cluster.runner.root / "volumes").exists() or not files(cluster.runner.root / "volumes")


async def test_the_secrets_are_made_once_kept_by_a_restarted_operator_and_refused_when_not_the_trainings(
        cluster: Cluster) -> None:
    manifest = tiny_training("guarded", privacy={**SECURE, "secureAggregation": {"threshold": 2}},
                             mlflow={"trackingUri": "http://mlflow"})
    manifest["spec"]["clients"] = {"list": [{"name": "near"}, {"name": "far", "namespace": "opted",
                                                               "data": {"claimName": "signs"}}]}
    manifest["spec"]["storage"] = {"s3": {"bucket": "weights", "credentialsSecret": {"name": "s3"}}}
    owner = Owner("guarded", NAMESPACE, (await cluster.apply(manifest))["metadata"]["uid"])  # no operator runs
    spec = parse_spec(manifest["spec"])
    own, foreign = f"{SECRETS}/guarded-secure", "/api/v1/namespaces/opted/secrets"
    earlier = {"fedtrain.io/training": "guarded", "app.kubernetes.io/managed-by": "fedtrain-operator",
               "fedtrain.io/training-namespace": NAMESPACE, "fedtrain.io/training-uid": "an-earlier-uid"}
    await cluster.request("POST", foreign, {"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "team-signs-guarded-secure", "labels": earlier}, "data": {}}, status=200)
    kube = Kube.from_environment()
    try:
        await SecureSecrets(kube).ensure(spec, owner)
        made = await cluster.request("GET", own)
        assert sorted(made["data"]) == ["near.key"] and made["metadata"]["ownerReferences"][0]["uid"] == owner.uid
        there = await cluster.request("GET", f"{foreign}/team-signs-guarded-secure")  # the earlier one replaced
        assert sorted(there["data"]) == ["far.key"] and "ownerReferences" not in there["metadata"]
        assert there["metadata"]["labels"] == {**earlier, "fedtrain.io/training-uid": owner.uid}

        await SecureSecrets(kube).ensure(spec, owner)  # another process: 409, read, kept as it is
        assert (await cluster.request("GET", own))["data"] == made["data"]
        await delete_foreign_secrets(kube, spec, owner)  # the finalizer: the one in the client's namespace
        assert (await cluster.request("GET", f"{foreign}/team-signs-guarded-secure"))["code"] == 404

        await cluster.request("DELETE", own)
        await cluster.request("POST", SECRETS, {"apiVersion": "v1", "kind": "Secret",
                                                "metadata": {"name": "guarded-secure"}, "data": {}}, status=200)
        with pytest.raises(Refusal) as refused:  # someone else's: never deleted or changed
            await SecureSecrets(kube).ensure(spec, owner)
        assert refused.value.reason == Reason.SECURE_SECRET
        assert "Secret team-signs/guarded-secure exists and is not this training's" in refused.value.message
        assert (await cluster.request("GET", own))["data"] == {}

        await cluster.request("DELETE", own)
        await cluster.request("POST", SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": "guarded-secure", "labels": {"fedtrain.io/training-uid": owner.uid}},
            "data": {"near.key": "AAAA"}}, status=200)
        with pytest.raises(Refusal) as refused:
            await SecureSecrets(kube).ensure(spec, owner)
        assert "must hold a 32-byte key near.key for client near and holds 3 bytes" in refused.value.message
    finally:
        kube.close()
