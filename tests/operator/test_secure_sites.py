"""Secure aggregation with remote sites on two clusters: each site operator keeps its key in a Secret of its own.

The coordinator's training (operator in the test's event loop) has an in-cluster client, hq, and
two sites whose operators run in their own cluster; they meet only in the moto S3 server, each site
with the key its bucket policy grants. Each site operator makes its master secret once, as an
immutable Secret owned by its participation, and mounts it only into the Jobs of a secure round's
tasks. The round's updates reach the store only masked.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from fedtrain.contract.errors import BadInputError
from fedtrain.contract.storage import open_store
from fedtrain.operator.kube import Kube
from fedtrain.operator.site_secrets import SiteSecrets
from fedtrain.operator.sites import site_job_manifest
from fedtrain.sites import agent
from fedtrain.sites.participation import parse_participation_spec
from tests.conftest import S3Server
from tests.operator.conftest import NAMESPACE, PARTICIPATIONS, Cluster, SiteCluster
from tests.operator.test_sites import (
    PREFIX,
    SITES,
    coordinated,
    finished,
    join,
    operator_calls,
    start_training,
)
from tests.sites.documents import secure, site_task

pytestmark = pytest.mark.timeout(420)
SECURE = {"clipNorm": 20.0, "secureAggregation": {"threshold": 2}}


def mounts_key(job: dict[str, Any]) -> bool:
    """Whether a Job's Pod mounts the site's key Secret."""
    volumes = job["spec"]["template"]["spec"]["volumes"]
    return any((v.get("secret") or {}).get("secretName") == "signs-site-secure" for v in volumes)


@pytest.mark.asyncio
@pytest.mark.slow  # about 2 min on two busy cores
async def test_sites_on_their_own_clusters_take_part_in_secure_aggregation_with_keys_they_keep(
        cluster: Cluster, site_cluster: SiteCluster, s3_server: S3Server, mlflow_server: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTRAIN_SITE_POLL_SECONDS", "1")
    manifest = coordinated("signs-secure", s3_server, mlflow_server, list(SITES), rounds=1, privacy=SECURE)
    manifest["spec"]["clients"].update({"maxExamples": 400, "minSuccessful": 2})
    training_id = await start_training(cluster, manifest, s3_server)
    await site_cluster.start_operator()
    for seed, site in enumerate(SITES, start=31):
        await join(site_cluster, site, training_id, s3_server, seed)

    done = await cluster.wait_for("signs-secure", finished, timeout=400)
    status = done["status"]
    assert status["phase"] == "Succeeded", (status.get("reason"), status.get("message"))

    for site, namespace in SITES.items():
        participation = await site_cluster.participation(namespace, "signs")
        secret = await site_cluster.request("GET", f"/api/v1/namespaces/{namespace}/secrets/signs-site-secure")
        assert secret["immutable"] is True
        assert [r["uid"] for r in secret["metadata"]["ownerReferences"]] == [participation["metadata"]["uid"]]
        assert len(base64.b64decode(secret["data"][f"{site}.key"])) == 32 and len(secret["data"]) == 1
        jobs = await site_cluster.list(f"/apis/batch/v1/namespaces/{namespace}/jobs")
        secure = {j["metadata"]["name"] for j in jobs if mounts_key(j)}
        assert secure == {f"signs-{letter}0001-{site}-a1" for letter in "ksru"}, sorted(secure)
        for job in jobs:
            mounts = job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
            key = [m for m in mounts if m["name"] == "site-secret"]
            assert key == ([{"name": "site-secret", "mountPath": "/var/run/fedtrain/secure", "readOnly": True}]
                           if mounts_key(job) else []), job["metadata"]["name"]
    assert ("secrets", "create") in operator_calls(site_cluster.server)

    store = open_store(f"s3://{s3_server.bucket}/{PREFIX}/{training_id}", s3_server.environment())
    keys = store.list("")
    assert not [k for k in keys if "/update-a" in k or "/clients/" in k], "an update in the clear"
    result = json.loads(store.read_bytes("round-0001/result.json"))
    assert sorted(result["secure_aggregation"]["survivors"]) == ["hamburg", "hq", "munich"]
    for site in SITES:
        assert f"sites/{site}/round-0001/secure-a1/masked.safetensors" in keys
        assert not [k for k in keys if k.endswith(f"{site}.key")]


SECRETS = f"/api/v1/namespaces/{NAMESPACE}/secrets"
OWN = f"{SECRETS}/signs-site-secure"


def site_participation() -> dict[str, Any]:
    return {"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedParticipation",
            "metadata": {"name": "signs", "namespace": NAMESPACE},
            "spec": {"site": "munich", "training": {"id": "team/signs-1a2b3c4d"},
                     "store": {"s3": {"bucket": "weights", "credentialsSecret": {"name": "site-s3"}}},
                     "data": {"claimName": "signs-data"}}}


@pytest.mark.asyncio
async def test_a_site_operator_makes_its_key_once_keeps_it_and_refuses_a_secret_not_its_own(cluster: Cluster) -> None:
    path = PARTICIPATIONS.format(namespace=NAMESPACE)
    participation = await cluster.request("POST", path, site_participation(), status=200)
    earlier = {"app.kubernetes.io/managed-by": "fedtrain-operator", "fedtrain.io/participation": "signs"}
    await cluster.request("POST", SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "signs-site-secure", "labels": earlier}, "data": {}}, status=200)
    kube = Kube.from_environment()
    try:
        await SiteSecrets(kube).ensure(participation, "munich")  # an earlier participation's: replaced
        made = await cluster.request("GET", OWN)
        assert made["immutable"] is True and sorted(made["data"]) == ["munich.key"]
        assert len(base64.b64decode(made["data"]["munich.key"])) == 32
        assert [r["uid"] for r in made["metadata"]["ownerReferences"]] == [participation["metadata"]["uid"]]
        await SiteSecrets(kube).ensure(participation, "munich")  # a restarted operator: 409, read, kept
        assert (await cluster.request("GET", OWN))["data"] == made["data"]

        await cluster.request("DELETE", OWN)
        await cluster.request("POST", SECRETS, {"apiVersion": "v1", "kind": "Secret",
                                                "metadata": {"name": "signs-site-secure"}, "data": {}}, status=200)
        with pytest.raises(BadInputError, match="signs-site-secure exists and is not this participation's"):
            await SiteSecrets(kube).ensure(participation, "munich")
        assert (await cluster.request("GET", OWN))["data"] == {}  # someone else's: never changed

        owner = {"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedParticipation", "name": "signs",
                 "uid": participation["metadata"]["uid"]}
        await cluster.request("DELETE", OWN)
        await cluster.request("POST", SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": "signs-site-secure", "ownerReferences": [owner]}, "data": {"munich.key": "AAAA"}}, status=200)
        with pytest.raises(BadInputError, match=r"must hold a 32-byte key munich\.key and holds 3 bytes"):
            await SiteSecrets(kube).ensure(participation, "munich")
    finally:
        kube.close()


def test_only_a_secure_tasks_job_mounts_the_key_and_is_told_it_is_given() -> None:
    participation = {**site_participation(), "metadata": {"name": "signs", "namespace": NAMESPACE, "uid": "u-1"}}
    spec = parse_participation_spec(participation["spec"])
    keys = site_task(id="k0003-munich-a1", kind="keys", train=None, secure=secure())
    arguments = agent.worker_arguments(keys, spec, "s3://weights/x", "/site-data",
                                       agent.SecretFile("/var/run/fedtrain/secure/munich.key", provided=True))
    job = site_job_manifest(keys, spec, participation, arguments, now=0.0)["spec"]["template"]["spec"]
    assert {"name": "site-secret", "secret": {"secretName": "signs-site-secure", "defaultMode": 0o440,
                                              "items": [{"key": "munich.key", "path": "munich.key"}]}} in job["volumes"]
    assert job["containers"][0]["args"][-3:] == ["--secret-file", "/var/run/fedtrain/secure/munich.key",
                                                 "--secret-provided"]
    plain = site_job_manifest(site_task(), spec, participation, [], now=0.0)["spec"]["template"]["spec"]
    assert not [v for v in plain["volumes"] if "secret" in v and v["name"] == "site-secret"]
