"""Fixtures: the test cluster (kmock API server + Job runner) and the kopf operator in the test's event loop."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest
import pytest_asyncio
import yaml

from tests.conftest import free_port
from tests.operator.cluster import ApiServer, JobRunner, Sabotage

ROOT = Path(__file__).parents[2]
NAMESPACE = "team-signs"
TRAININGS = f"/apis/fedtrain.io/v1alpha1/namespaces/{NAMESPACE}/federatedtrainings"


async def api_request(session: aiohttp.ClientSession, method: str, path: str, body: Any = None,
                      status: int | None = None) -> dict[str, Any]:
    """One call to a test API server, as kubectl makes it; ``status``: the answer expected.

    A PATCH is a JSON patch when ``body`` is a list of operations, else a merge patch.
    """
    patch = "application/json-patch+json" if isinstance(body, list) else "application/merge-patch+json"
    headers = {"Content-Type": patch} if method == "PATCH" else {}
    async with session.request(method, path, json=body, headers=headers) as response:
        answer = await response.json()
        assert status is None or response.status == status, (response.status, answer)
        return dict(answer)


@dataclass
class Cluster:
    """What a test drives: the API (over HTTP), the Job runner, and the operator it can stop and start."""

    url: str
    server: ApiServer
    runner: JobRunner
    session: aiohttp.ClientSession
    operator: asyncio.Task[None] | None = None
    stop_flag: asyncio.Event | None = None
    kopf_ignores: set[asyncio.Task[Any]] = field(default_factory=set)

    async def request(self, method: str, path: str, body: Any = None, status: int | None = None) -> dict[str, Any]:
        return await api_request(self.session, method, path, body, status)

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create as ``kubectl apply`` does: strict field validation, so a misspelt field fails the test."""
        return await self.request("POST", f"{TRAININGS}?fieldValidation=Strict", manifest, status=200)

    async def training(self, name: str) -> dict[str, Any]:
        return await self.request("GET", f"{TRAININGS}/{name}")

    async def list(self, path: str) -> list[dict[str, Any]]:
        return list((await self.request("GET", path)).get("items", []))

    async def jobs(self) -> builtins.list[dict[str, Any]]:
        return await self.list(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs")

    async def events(self) -> builtins.list[dict[str, Any]]:
        return await self.list(f"/api/v1/namespaces/{NAMESPACE}/events")

    async def wait_for(self, name: str, check: Callable[[dict[str, Any]], bool],
                       timeout: float = 240) -> dict[str, Any]:
        """Poll the training until ``check(resource)`` holds; fail with its status if it does not in time."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            resource = await self.training(name)
            if resource.get("metadata") and check(resource):
                return resource
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out; last status: {resource.get('status')}; "
                                     f"writes the API server refused: {self.server.refusals}")
            await asyncio.sleep(0.1)

    async def start_operator(self) -> None:
        import kopf

        import fedtrain.operator.handlers  # noqa: F401  (registers the handlers)

        self.stop_flag, ready = asyncio.Event(), asyncio.Event()
        # What kopf.operator does, but with the set of tasks it leaves alone kept here: a stopping kopf
        # waits 5 s for every task created after it started, and the fixture's own teardown is one of
        # them (it waits for kopf in turn), so every test's teardown paid 5 s. `stop_operator` adds
        # the task that stops kopf to the set.
        self.kopf_ignores = set(asyncio.all_tasks())
        tasks = await kopf.spawn_tasks(clusterwide=True, standalone=True, ready_flag=ready, stop_flag=self.stop_flag)
        self.operator = asyncio.create_task(kopf.run_tasks(tasks, ignored=self.kopf_ignores))
        await asyncio.wait_for(ready.wait(), 30)

    async def stop_operator(self, graceful: bool = True) -> None:
        """Stop kopf; ``graceful=False`` cancels it mid-flight, like a killed Pod."""
        assert self.operator is not None and self.stop_flag is not None
        if graceful:
            current = asyncio.current_task()
            if current is not None:
                self.kopf_ignores.add(current)
            self.stop_flag.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self.operator, 30)
        else:
            self.operator.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.operator
        self.operator = None


def kubeconfig(path: Path, url: str) -> Path:
    """A kubeconfig for the test server: what both kopf and the operator's own client read."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": url}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": NAMESPACE}}],
    }))
    return path


@pytest.fixture
def sabotage() -> dict[str, Sabotage]:
    """Job name fragment → what to do instead of running it (filled by a test before it applies)."""
    return {}


class ClusterThread(threading.Thread):
    """The API server and the Job runner on their own event loop.

    kopf, when it stops, cancels every task created on its loop after it started (it assumes it owns
    the loop): that would cut the server's connections in the middle of a restart test. The test
    cluster therefore runs in this thread, as a real cluster runs apart from its operator.
    """

    def __init__(self, root: Path, plan: Callable[[dict[str, Any]], Sabotage | None]) -> None:
        super().__init__(name="test-cluster", daemon=True)
        self.root, self.plan = root, plan
        self.started = threading.Event()
        self.url = ""
        self.server: ApiServer | None = None
        self.runner: JobRunner | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.loop, self.stopping = asyncio.get_running_loop(), asyncio.Event()
        async with ApiServer() as server, kmock.Server(server) as http:
            self.server, self.url = server, str(http.url).rstrip("/")
            self.runner = JobRunner(self.url, self.root, self.plan)
            runner_task = asyncio.create_task(self.runner.run())
            self.started.set()
            await self.stopping.wait()
            runner_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner_task

    def stop(self) -> None:
        assert self.loop is not None and self.stopping is not None
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.join(30)


@pytest_asyncio.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  sabotage: dict[str, Sabotage]) -> AsyncIterator[Cluster]:
    monkeypatch.setenv("FEDTRAIN_METRICS_PORT", "0")
    monkeypatch.setenv("FEDTRAIN_TICK_SECONDS", "1")

    def plan(job: dict[str, Any]) -> Sabotage | None:
        return next((p for fragment, p in sabotage.items() if fragment in job["metadata"]["name"]), None)

    thread = ClusterThread(tmp_path / "node", plan)
    thread.start()
    assert thread.started.wait(60), "the test cluster did not start"
    assert thread.server is not None and thread.runner is not None
    config = str(kubeconfig(tmp_path / "kubeconfig", thread.url))
    monkeypatch.setenv("KUBECONFIG", config)
    # The kubernetes client reads $KUBECONFIG once, at import: point its default at this test's server too.
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", config)
    async with aiohttp.ClientSession(base_url=thread.url) as session:
        found = Cluster(thread.url, thread.server, thread.runner, session)
        try:
            yield found
        finally:
            if found.operator is not None:
                await found.stop_operator()
            thread.stop()
    assert not thread.runner.errors, thread.runner.errors


def tiny_training(name: str = "signs", **spec: Any) -> dict[str, Any]:
    """A 2-client, 2-round training on tiny synthetic data that a laptop trains in seconds."""
    base: dict[str, Any] = {
        "rounds": 2,
        "model": {"architecture": "tiny_cnn", "numClasses": 43, "imageSize": 16},
        "dataset": {"synthetic": {"imagesPerClass": 6, "testImagesPerClass": 2, "framesPerTrack": 3, "seed": 2}},
        "clients": {"count": 2},
        "training": {"localEpochs": 1, "batchSize": 32},
        "storage": {"persistentVolumeClaim": {"claimName": "fl-store"}},
        "worker": {"image": "fedtrain/worker:test", "device": "cpu"},
        "mlflow": {"experiment": "operator-test"},
    }
    for key, value in spec.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return {"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedTraining",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": base}


def condition(resource: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in resource.get("status", {}).get("conditions", []) if c["type"] == kind), {})


PARTICIPATIONS = "/apis/fedtrain.io/v1alpha1/namespaces/{namespace}/federatedparticipations"


@dataclass
class SiteCluster:
    """Another organisation's cluster: its own API server and Job runner, and its own operator as a process.

    The operator runs as ``kopf run`` in a process of its own, pointed at this cluster's API server, so
    that it shares no registry, memory or store client with the coordinator's operator (which runs in
    the test's event loop); `stop_operator` ends it with SIGTERM or, as a killed Pod, SIGKILL.
    """

    url: str
    server: ApiServer
    runner: JobRunner
    session: aiohttp.ClientSession
    kubeconfig: Path
    log: Path
    sabotage: dict[str, Sabotage]  # Job name fragment -> what its Pod does instead of running
    process: subprocess.Popen[bytes] | None = None

    async def request(self, method: str, path: str, body: Any = None, status: int | None = None) -> dict[str, Any]:
        return await api_request(self.session, method, path, body, status)

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create a participation as ``kubectl apply`` does (strict field validation)."""
        path = PARTICIPATIONS.format(namespace=manifest["metadata"]["namespace"])
        return await self.request("POST", f"{path}?fieldValidation=Strict", manifest, status=200)

    async def participation(self, namespace: str, name: str) -> dict[str, Any]:
        return await self.request("GET", f"{PARTICIPATIONS.format(namespace=namespace)}/{name}")

    async def list(self, path: str) -> list[dict[str, Any]]:
        return list((await self.request("GET", path)).get("items", []))

    async def wait_for(self, namespace: str, name: str, check: Callable[[dict[str, Any]], bool],
                       timeout: float = 120) -> dict[str, Any]:
        """Poll the participation until ``check(resource)`` holds; fail with its status (and the log) if not."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            resource = await self.participation(namespace, name)
            if resource.get("metadata") and check(resource):
                return resource
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out; last status: {resource.get('status')}; operator log:\n"
                                     f"{self.log.read_text()[-3000:] if self.log.exists() else ''}")
            await asyncio.sleep(0.2)

    async def start_operator(self) -> None:
        """``kopf run`` against this cluster; returns once its liveness endpoint answers."""
        port = free_port()
        environment = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "FEDTRAIN_METRICS_PORT": "0",
                       "FEDTRAIN_TICK_SECONDS": "1"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces",
                 f"--liveness=http://127.0.0.1:{port}/healthz", "-m", "fedtrain.operator.handlers"],
                stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
        deadline = asyncio.get_running_loop().time() + 60
        while not await asyncio.to_thread(_answers, f"http://127.0.0.1:{port}/healthz"):
            if self.process.poll() is not None or asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the site operator did not start:\n{self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.2)

    async def stop_operator(self, graceful: bool = True) -> None:
        """SIGTERM (kopf stops its daemons and exits) or SIGKILL (a killed Pod: nothing runs to the end)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            await asyncio.to_thread(self.process.wait, 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, 10)
        self.process = None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


@pytest_asyncio.fixture
async def site_cluster(tmp_path: Path) -> AsyncIterator[SiteCluster]:
    """The site's cluster (see `SiteCluster`); its operator is started by the test."""
    sabotage: dict[str, Sabotage] = {}

    def plan(job: dict[str, Any]) -> Sabotage | None:
        return next((p for fragment, p in sabotage.items() if fragment in job["metadata"]["name"]), None)

    thread = ClusterThread(tmp_path / "site-node", plan)
    thread.start()
    assert thread.started.wait(60), "the site cluster did not start"
    assert thread.server is not None and thread.runner is not None
    config = kubeconfig(tmp_path / "site-kubeconfig", thread.url)
    async with aiohttp.ClientSession(base_url=thread.url) as session:
        found = SiteCluster(thread.url, thread.server, thread.runner, session, config, tmp_path / "site-operator.log",
                            sabotage)
        try:
            yield found
        finally:
            if found.process is not None:
                await found.stop_operator()
            thread.stop()
    assert not thread.runner.errors, thread.runner.errors
