"""The operator image against the test API server, and every Job it creates as a container of the worker image.

The operator's container is the Deployment of ``kubectl apply -k deploy/`` as kustomize renders it,
with three stand-ins for what a cluster provides: a kubeconfig for the API server (a Pod gets a
service account token instead), free host ports for its liveness and metrics endpoints (a Pod has
its own network), and the test images in the kustomization's one worker-image setting.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from fedtrain.spec import WORKER_IMAGE_ENV
from tests.conftest import S3Server, free_port
from tests.containers.conftest import Images
from tests.containers.kubelet import ContainerProcess, Kubelet, own_volume
from tests.operator.conftest import (  # noqa: F401  (fixtures)
    Cluster,
    SiteCluster,
    cluster,
    condition,
    kubeconfig,
    sabotage,
    site_cluster,
    tiny_training,
)
from tests.operator.test_deploy import kustomized
from tests.operator.test_sites import SITES, coordinated, finished, join, start_training

pytestmark = [pytest.mark.slow, pytest.mark.asyncio, pytest.mark.timeout(1800)]
POD = "fedtrain-operator-7d9f8b6c5-x2x4q"
KUBECONFIG = "/etc/fedtrain/kubeconfig"


@dataclass
class OperatorPod:
    """The operator's container and where to ask whether it is alive."""

    process: ContainerProcess
    liveness: str
    log: Path

    def alive(self) -> bool:
        try:
            with urllib.request.urlopen(self.liveness, timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False


def operator_container(image: str, worker_image: str, liveness_port: int, metrics_port: int
                       ) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """The Deployment's Pod spec and container with the test's stand-ins, and the environment a kubelet gives it."""
    applied = kustomized()
    deployment = next(d for d in applied if d["kind"] == "Deployment")
    pod_spec = copy.deepcopy(deployment["spec"]["template"]["spec"])
    container = pod_spec["containers"][0]
    container["image"] = image
    container["args"] = [a.replace(":8080/", f":{liveness_port}/") for a in container["args"]]
    container["volumeMounts"].append({"name": "kubeconfig", "mountPath": KUBECONFIG, "readOnly": True})
    settings = {d["metadata"]["name"]: d["data"] for d in applied if d["kind"] == "ConfigMap"}
    environment: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        environment.update(settings[source["configMapRef"]["name"]])
    for item in container["env"]:
        field = (item.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
        environment[item["name"]] = POD if field == "metadata.name" else str(item["value"])
    assert WORKER_IMAGE_ENV in environment, "the kustomization names no worker image"
    environment.update({WORKER_IMAGE_ENV: worker_image, "FEDTRAIN_METRICS_PORT": str(metrics_port),
                        "FEDTRAIN_TICK_SECONDS": "1", "KUBECONFIG": KUBECONFIG})
    return pod_spec, container, environment


async def started(kubelet: Kubelet, name: str, process: ContainerProcess) -> None:
    """Until the engine reports the container running (a stop sent before it exists would find nothing)."""
    while True:
        inspect = await asyncio.to_thread(subprocess.run, [kubelet.engine, "inspect", "--format",
                                                           "{{.State.Running}}", name], capture_output=True, text=True)
        if inspect.stdout.strip() == "true":
            return
        assert process.poll() is None, "the container ended before it was seen running"
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def operator_pod(cluster: Cluster, kubelet: Kubelet, images: Images,  # noqa: F811
                       tmp_path: Path) -> AsyncIterator[OperatorPod]:
    """The operator image running as its Deployment declares, against the test cluster; ready when it yields."""
    liveness_port = free_port()
    pod_spec, container, environment = operator_container(images.operator, images.worker, liveness_port, free_port())
    fs_group = (pod_spec.get("securityContext") or {}).get("fsGroup")
    volumes = {"tmp": tmp_path / "operator-tmp", "kubeconfig": kubeconfig(tmp_path / "kubeconfig", cluster.url)}
    own_volume(volumes["tmp"], fs_group)
    argv = kubelet.run_args(POD, pod_spec, container, volumes, environment, None)
    log = tmp_path / "operator.err"  # kopf logs to stderr
    pod = OperatorPod(kubelet.start(POD, argv, tmp_path / "operator.out", log), f"http://127.0.0.1:{liveness_port}/healthz",
                      log)
    try:
        deadline = asyncio.get_running_loop().time() + 120
        while not await asyncio.to_thread(pod.alive):
            assert pod.process.poll() is None, f"the operator container exited:\n{pod.log.read_text()[-4000:]}"
            assert asyncio.get_running_loop().time() < deadline, f"not ready:\n{pod.log.read_text()[-4000:]}"
            await asyncio.sleep(0.2)
        yield pod
    finally:
        pod.process.terminate()


async def test_the_operator_image_runs_a_training_whose_jobs_run_the_worker_image(
        cluster: Cluster, kubelet: Kubelet, images: Images, operator_pod: OperatorPod,  # noqa: F811
        mlflow_server: str) -> None:
    cluster.runner.kubelet = kubelet
    manifest = tiny_training(mlflow={"experiment": "containers", "trackingUri": mlflow_server,
                                     "registeredModelName": "containers-signs"})
    del manifest["spec"]["worker"]["image"]  # the operator's one setting decides
    await cluster.apply(manifest)
    done = await cluster.wait_for("signs", lambda r: r.get("status", {}).get("phase") in ("Succeeded", "Failed"),
                                  timeout=900)
    status = done["status"]
    assert status["phase"] == "Succeeded", (status, operator_pod.log.read_text()[-3000:])
    assert condition(done, "Succeeded")["status"] == "True" and status["modelVersion"] == "1"
    assert status["modelUri"].startswith("models:/containers-signs/")  # registered by the finalize container
    jobs = await cluster.jobs()
    assert {j["spec"]["template"]["spec"]["containers"][0]["image"] for j in jobs} == {images.worker}
    ran = cluster.runner.ran
    assert len(ran) == len(set(ran)) == 1 + 2 * (2 + 1) + 1  # init, 2 rounds of 2 clients and aggregate, finalize
    finalize = next(p for p in cluster.runner.logs.glob("*finalize*.err"))
    assert "Bad git executable" not in finalize.read_text()
    assert operator_pod.process.poll() is None and operator_pod.alive()


async def test_the_operator_container_stops_at_once_on_sigterm(kubelet: Kubelet, images: Images,
                                                               operator_pod: OperatorPod) -> None:
    """SIGTERM reaches the operator through tini (PID 1): it ends without waiting for the grace period's SIGKILL."""
    stop = await asyncio.to_thread(subprocess.run, [kubelet.engine, "stop", "--time", "60", operator_pod.process.name],
                                   capture_output=True, text=True)
    assert stop.returncode == 0, stop.stderr
    code = await asyncio.to_thread(operator_pod.process.wait)
    assert code != 137, f"the operator was killed, not stopped:\n{operator_pod.log.read_text()[-3000:]}"


async def test_a_sigterm_before_the_operator_is_up_still_stops_it(kubelet: Kubelet, images: Images,
                                                                  tmp_path: Path) -> None:
    """The signal a rollout sends at once: PID 1 without an init would ignore it until kopf had a handler."""
    pod_spec, container, environment = operator_container(images.operator, images.worker, free_port(), free_port())
    volumes = {"tmp": tmp_path / "tmp", "kubeconfig": kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")}
    own_volume(volumes["tmp"], (pod_spec.get("securityContext") or {}).get("fsGroup"))
    name = f"{POD}-early"
    argv = kubelet.run_args(name, pod_spec, container, volumes, environment, None)
    process = kubelet.start(name, argv, tmp_path / "out", tmp_path / "err")
    try:
        await started(kubelet, name, process)
        stop = await asyncio.to_thread(subprocess.run, [kubelet.engine, "stop", "--time", "60", name],
                                       capture_output=True, text=True)
        assert stop.returncode == 0, stop.stderr
        assert await asyncio.to_thread(process.wait) != 137, (tmp_path / "err").read_text()[-3000:]
    finally:
        process.terminate()


async def test_a_site_task_runs_in_the_worker_image(
        cluster: Cluster, site_cluster: SiteCluster, s3_server: S3Server, mlflow_server: str,  # noqa: F811
        kubelet: Kubelet, images: Images, monkeypatch: pytest.MonkeyPatch) -> None:
    """A coordinator and a site, every Job of both a container of the worker image, meeting in S3 only."""
    monkeypatch.setenv("FEDTRAIN_SITE_POLL_SECONDS", "1")
    monkeypatch.setenv(WORKER_IMAGE_ENV, images.worker)  # the site operator's own setting names the image
    cluster.runner.kubelet = site_cluster.runner.kubelet = kubelet
    manifest = coordinated("signs-site", s3_server, mlflow_server, ["munich"])
    manifest["spec"]["worker"]["image"] = images.worker
    training_id = await start_training(cluster, manifest, s3_server)
    await site_cluster.start_operator()
    await join(site_cluster, "munich", training_id, s3_server, 31, worker={"device": "cpu"})

    done = await cluster.wait_for("signs-site", finished, timeout=900)
    status = done["status"]
    assert status["phase"] == "Succeeded", (status.get("reason"), status.get("message"))
    assert all(r["clients"]["munich"]["state"] == "succeeded" and "munich" in r["siteScores"]
               for r in status["rounds"]), status["rounds"]
    jobs = await site_cluster.list(f"/apis/batch/v1/namespaces/{SITES['munich']}/jobs")
    # round 2's training also scores round 1's model; only the last round's model gets an evaluation of its own
    assert sorted(j["metadata"]["name"] for j in jobs) == [
        "signs-e0002-munich-a1", "signs-r0001-munich-a1", "signs-r0002-munich-a1"]
    assert {j["spec"]["template"]["spec"]["containers"][0]["image"] for j in jobs} == {images.worker}


def test_synth_gtsrb_writes_the_official_layout_from_the_worker_image(kubelet: Kubelet, images: Images,
                                                                      tmp_path: Path) -> None:
    """The data step (a Kubeflow pipeline's first) as a Pod runs it: uid 1000, read-only root, one volume."""
    data = tmp_path / "data"
    own_volume(data, 1000)
    pod_spec = {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
                "volumes": [{"name": "data", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]}
    arguments = ["synth-gtsrb", "--out", "/data/gtsrb", "--per-class", "2", "--test-per-class", "1", "--max-size", "32",
                 "--seed", "5"]
    container = {"image": images.worker, "args": arguments,
                 "workingDir": "/tmp", "volumeMounts": [{"name": "data", "mountPath": "/data"},
                                                        {"name": "tmp", "mountPath": "/tmp"}],
                 "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                     "capabilities": {"drop": ["ALL"]}}}
    scratch = tmp_path / "tmp"
    own_volume(scratch, 1000)
    argv = kubelet.run_args("synth-gtsrb", pod_spec, container, {"data": data, "tmp": scratch}, {}, None)
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    classes = sorted(p.name for p in (data / "gtsrb" / "Final_Training" / "Images").iterdir())
    assert classes == [f"{c:05d}" for c in range(43)]
    assert (data / "gtsrb" / "Final_Test" / "Images" / "GT-final_test.csv").exists()
