"""Clients in their own namespaces through the operator: weights through a real S3 server, data stays home.

The training lives in ``team-signs``; client ``munich`` runs in ``city-munich`` on its own claim, and
client ``hq`` on a share of the synthetic set in ``team-signs``. Only weights cross, through moto.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest

from fedtrain.contract.layout import Layout, sidecar_of
from fedtrain.contract.storage import open_store
from fedtrain.operator.jobs import ANNOTATION_ACCEPT, LABEL_TRAINING_NAMESPACE
from fedtrain.worker.data.synth import SynthConfig, generate
from tests.conftest import S3Server
from tests.operator.conftest import NAMESPACE, Cluster, condition, tiny_training

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]
CLIENT_NAMESPACE = "city-munich"


async def make_namespace(cluster: Cluster, name: str, accept: str | None) -> None:
    annotations = {ANNOTATION_ACCEPT: accept} if accept else {}
    made = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "annotations": annotations}}
    cluster.server.add_namespace(made)  # kmock 0.8 cannot parse POST /api/v1/namespaces: the fixture stores it
    assert (await cluster.request("GET", f"/api/v1/namespaces/{name}")) == made


async def make_secret(cluster: Cluster, namespace: str, s3: S3Server, secret: str | None = None) -> None:
    data = {"AWS_ACCESS_KEY_ID": s3.access_key_id, "AWS_SECRET_ACCESS_KEY": secret or s3.secret_access_key}
    await cluster.request("POST", f"/api/v1/namespaces/{namespace}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fedtrain-s3", "namespace": namespace},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})


def federated(s3: S3Server, mlflow: str, client_namespace: str = CLIENT_NAMESPACE) -> dict[str, Any]:
    manifest = tiny_training(
        "signs-fed", clients={"list": [
            {"name": "munich", "namespace": client_namespace, "data": {"claimName": "signs", "path": "gtsrb"}},
            {"name": "hq"}]},
        mlflow={"experiment": "operator-federation", "trackingUri": mlflow})
    manifest["spec"]["storage"] = {"s3": {"endpoint": s3.endpoint, "bucket": s3.bucket, "prefix": "operator",
                                          "region": "us-east-1", "credentialsSecret": {"name": "fedtrain-s3"}}}
    return manifest


async def test_a_client_in_its_own_namespace_trains_on_its_own_data(
        cluster: Cluster, s3_server: S3Server, mlflow_server: str) -> None:
    await make_namespace(cluster, CLIENT_NAMESPACE, accept=f"{NAMESPACE}, other-team/*")
    for namespace in (NAMESPACE, CLIENT_NAMESPACE):
        await make_secret(cluster, namespace, s3_server)
    home = cluster.runner.claim_dir(CLIENT_NAMESPACE, "signs") / "gtsrb"
    generate(home, SynthConfig(per_class=4, test_per_class=1, frames_per_track=2, seed=9, max_size=48))
    await cluster.start_operator()
    await cluster.apply(federated(s3_server, mlflow_server))
    done = await cluster.wait_for("signs-fed", lambda r: r.get("status", {}).get("phase") in ("Succeeded", "Failed"),
                                  timeout=300)
    assert done["status"]["phase"] == "Succeeded", (done["status"].get("reason"), done["status"].get("message"))
    uid = done["metadata"]["uid"]

    foreign = await cluster.list(f"/apis/batch/v1/namespaces/{CLIENT_NAMESPACE}/jobs")
    assert sorted(j["metadata"]["labels"]["fedtrain.io/client"] for j in foreign) == ["munich", "munich"]
    for job in foreign:
        meta, pod = job["metadata"], job["spec"]["template"]["spec"]
        assert "ownerReferences" not in meta and meta["labels"][LABEL_TRAINING_NAMESPACE] == NAMESPACE
        assert meta["labels"]["fedtrain.io/training-uid"] == uid and meta["name"].startswith(f"{NAMESPACE}-signs-fed")
        assert pod["serviceAccountName"] == "fedtrain-worker" and "store" not in {v["name"] for v in pod["volumes"]}
        data = next(v for v in pod["volumes"] if v["name"] == "client-data")
        assert data["persistentVolumeClaim"] == {"claimName": "signs", "readOnly": True}
        secret_refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in pod["containers"][0]["env"] if "valueFrom" in e]
        assert secret_refs == ["fedtrain-s3", "fedtrain-s3"]
        args = pod["containers"][0]["args"]
        assert args[args.index("--data") + 1] == "/client-data/gtsrb" and "--own-data" in args
    assert await cluster.request("GET", f"/api/v1/namespaces/{CLIENT_NAMESPACE}/serviceaccounts/fedtrain-worker")

    store = open_store(f"s3://{s3_server.bucket}/operator/{NAMESPACE}/signs-fed-{uid[:8]}", s3_server.environment())
    munich = json.loads(store.read_bytes(sidecar_of(Layout().client_update(2, "munich"))))
    assert munich["client"] == "munich"
    assert munich["num_examples"] == len(list((home / "Final_Training" / "Images").rglob("*.ppm"))) - \
        munich["metrics"]["val_examples"]  # its whole own data set (less validation), not a share
    assert "round-0002/global.safetensors" in store.list("round-0002")
    assert not (cluster.runner.store / NAMESPACE).exists()  # nothing on a shared claim

    await cluster.request("DELETE", f"/apis/fedtrain.io/v1alpha1/namespaces/{NAMESPACE}/federatedtrainings/"
                                    "signs-fed")

    async def cleaned() -> bool:
        gone = not (await cluster.list(f"/apis/batch/v1/namespaces/{CLIENT_NAMESPACE}/jobs"))
        return gone and not (await cluster.training("signs-fed")).get("metadata")

    for _ in range(200):
        if await cleaned():
            break
        await asyncio.sleep(0.1)
    assert await cleaned(), "the client namespace's Jobs were not deleted with the training"


async def test_a_secure_client_in_its_own_namespace_runs_every_stage_there_on_its_own_key(
        cluster: Cluster, s3_server: S3Server, mlflow_server: str) -> None:
    await make_namespace(cluster, CLIENT_NAMESPACE, accept=NAMESPACE)
    for namespace in (NAMESPACE, CLIENT_NAMESPACE):
        await make_secret(cluster, namespace, s3_server)
    generate(cluster.runner.claim_dir(CLIENT_NAMESPACE, "signs") / "gtsrb",
             SynthConfig(per_class=4, test_per_class=1, frames_per_track=2, seed=9, max_size=48))
    manifest = federated(s3_server, mlflow_server)
    manifest["spec"]["rounds"] = 1
    manifest["spec"]["privacy"] = {"clipNorm": 20.0, "secureAggregation": {"threshold": 2}}
    await cluster.start_operator()
    await cluster.apply(manifest)
    done = await cluster.wait_for("signs-fed", lambda r: r.get("status", {}).get("phase") in ("Succeeded", "Failed"),
                                  timeout=300)
    assert done["status"]["phase"] == "Succeeded", (done["status"].get("reason"), done["status"].get("message"))
    uid = done["metadata"]["uid"]

    there = f"/api/v1/namespaces/{CLIENT_NAMESPACE}/secrets/{NAMESPACE}-signs-fed-secure"
    secret = await cluster.request("GET", there)
    assert sorted(secret["data"]) == ["munich.key"] and "ownerReferences" not in secret["metadata"]
    assert secret["metadata"]["labels"]["fedtrain.io/training-uid"] == uid
    here = await cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/signs-fed-secure")
    assert sorted(here["data"]) == ["hq.key"]
    foreign = await cluster.list(f"/apis/batch/v1/namespaces/{CLIENT_NAMESPACE}/jobs")
    assert sorted(j["metadata"]["labels"]["fedtrain.io/task"] for j in foreign) == ["keys", "shares", "train",
                                                                                    "unmask"]
    for job in foreign:
        volumes = [v["secret"] for v in job["spec"]["template"]["spec"]["volumes"] if "secret" in v]
        assert volumes == [{"secretName": f"{NAMESPACE}-signs-fed-secure", "defaultMode": 0o440,
                            "items": [{"key": "munich.key", "path": "munich.key"}]}]
    store = open_store(f"s3://{s3_server.bucket}/operator/{NAMESPACE}/signs-fed-{uid[:8]}", s3_server.environment())
    assert store.list("round-0001/clients") == [] and "round-0001/global.safetensors" in store.list("round-0001")
    assert len([k for k in store.list("round-0001") if k.endswith("masked.safetensors")]) == 2

    await cluster.request("DELETE", f"/apis/fedtrain.io/v1alpha1/namespaces/{NAMESPACE}/federatedtrainings/"
                                    "signs-fed")
    for _ in range(200):  # the finalizer deletes the Secret its owner reference cannot reach
        if (await cluster.request("GET", there)).get("code") == 404:
            break
        await asyncio.sleep(0.1)
    assert (await cluster.request("GET", there)).get("code") == 404


async def test_a_namespace_that_has_not_opted_in_is_refused(cluster: Cluster, s3_server: S3Server,
                                                            mlflow_server: str) -> None:
    await make_namespace(cluster, "city-berlin", accept="some-other-team")
    await cluster.start_operator()
    await cluster.apply(federated(s3_server, mlflow_server, client_namespace="city-berlin"))
    failed = await cluster.wait_for("signs-fed", lambda r: r.get("status", {}).get("phase") == "Failed", timeout=60)
    assert failed["status"]["reason"] == "ClientNamespaceNotAllowed"
    message = failed["status"]["message"]
    assert "namespace city-berlin has not opted in to training team-signs/signs-fed" in message
    assert f"{ANNOTATION_ACCEPT}=team-signs" in message and "'some-other-team'" in message
    assert condition(failed, "Failed")["status"] == "True"
    assert not await cluster.list("/apis/batch/v1/namespaces/city-berlin/jobs")
    assert not await cluster.jobs()  # not even init ran


async def test_wrong_credentials_fail_the_training_naming_the_secret(cluster: Cluster, s3_server: S3Server,
                                                                     mlflow_server: str) -> None:
    await make_namespace(cluster, CLIENT_NAMESPACE, accept=NAMESPACE)
    await make_secret(cluster, NAMESPACE, s3_server, secret="not-the-secret")
    await cluster.start_operator()
    await cluster.apply(federated(s3_server, mlflow_server))
    failed = await cluster.wait_for("signs-fed", lambda r: r.get("status", {}).get("phase") == "Failed")
    assert "Secret team-signs/fedtrain-s3" in failed["status"]["message"], failed["status"]
