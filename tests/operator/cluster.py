"""A test cluster: kmock's Kubernetes emulator made closer to a real API server, and a Job runner.

`ApiServer` fills in what kmock 0.8 leaves out and the operator relies on a real server for:
uid, resourceVersion and generation; ``generateName``; 409 on a stale ``resourceVersion`` in a
patch; the status subresource (a patch to ``/status`` changes only status, a patch to the object
never changes status); label selectors on lists; and the garbage collector (deleting an owner
deletes its dependents). It is as strict as a real API server where kmock accepts anything
(`tests.apiserver_rules`): every write of a FederatedTraining is admitted against the checked-in
CRD (unknown fields refused with ``fieldValidation=Strict``, else pruned; defaults; the OpenAPI
schema; CEL rules, transition rules against the stored object), and every object's name, labels
and annotations are validated, with the real server's 400/422 answers. These are fixture-side
workarounds: product code speaks plain Kubernetes.

`JobRunner` plays the job controller and the kubelet: for every Job it creates the Pod, runs the
container's command as a local process (through the same fork server as `fedtrain run`) with
``/store`` mapped to a directory, and reports Pod and Job status, termination message included,
back through the API as the real ones would. ``sabotage`` makes chosen Jobs fail or hang.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import jsonpatch
import kmock
from kmock._internal import dicts, enums, rendering

from fedtrain.local.executor import ForkServer
from tests.apiserver_rules import Refused, admit, load_crd, refuse_object

RESOURCES = {
    "fedtrain.io/v1alpha1/federatedtrainings": kmock.ResourceInfo(
        kind="FederatedTraining", singular="federatedtraining", namespaced=True, shortnames={"ft"},
        subresources={"status"}, verbs={"create", "delete", "get", "list", "patch", "update", "watch"}),
    "fedtrain.io/v1alpha1/federatedparticipations": kmock.ResourceInfo(
        kind="FederatedParticipation", singular="federatedparticipation", namespaced=True, shortnames={"fp"},
        subresources={"status"}, verbs={"create", "delete", "get", "list", "patch", "update", "watch"}),
    "batch/v1/jobs": kmock.ResourceInfo(kind="Job", singular="job", namespaced=True, subresources={"status"},
                                        verbs={"create", "delete", "get", "list", "patch", "watch"}),
    "v1/pods": kmock.ResourceInfo(kind="Pod", singular="pod", namespaced=True, subresources={"status"},
                                  verbs={"create", "delete", "get", "list", "patch", "watch"}),
    "v1/events": kmock.ResourceInfo(kind="Event", singular="event", namespaced=True,
                                    verbs={"create", "get", "list", "watch"}),
    "v1/serviceaccounts": kmock.ResourceInfo(kind="ServiceAccount", singular="serviceaccount", namespaced=True,
                                             verbs={"create", "delete", "get", "list", "patch", "watch"}),
    "v1/persistentvolumeclaims": kmock.ResourceInfo(kind="PersistentVolumeClaim", singular="persistentvolumeclaim",
                                                    namespaced=True,
                                                    verbs={"create", "delete", "get", "list", "watch"}),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", singular="configmap", namespaced=True,
                                        verbs={"create", "delete", "get", "list", "patch", "watch"}),
    "kubeflow.org/v1/profiles": kmock.ResourceInfo(kind="Profile", singular="profile", namespaced=False,
                                                   verbs={"create", "delete", "get", "list", "patch", "watch"}),
    # kopf waits for namespaces to be discoverable even when it watches cluster-wide (and then never lists them).
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", singular="namespace", namespaced=False,
                                        verbs={"get", "list", "watch"}),
    "v1/secrets": kmock.ResourceInfo(kind="Secret", singular="secret", namespaced=True,
                                     verbs={"create", "delete", "get", "list", "patch"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": kmock.ResourceInfo(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False,
        verbs={"get", "list", "watch"}),
}
STATUS_RESOURCES = ("federatedtrainings", "federatedparticipations", "jobs", "pods")
PARTICIPATION_CRD = Path(__file__).parents[2] / "crds" / "federatedparticipations.fedtrain.io.yaml"
WRITES = (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (``a=b,c``), as the operator uses them."""
    for term in filter(None, selector.split(",")):
        key, sep, value = term.partition("=")
        if (sep and labels.get(key) != value) or (not sep and key not in labels):
            return False
    return True


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator with the real API server's bookkeeping and admission (see the module docstring)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.versions = itertools.count(1)
        for key, info in RESOURCES.items():
            self.resources[key] = info
        # plural -> the CRD its writes are admitted against
        self.crds = {"federatedtrainings": load_crd(), "federatedparticipations": load_crd(PARTICIPATION_CRD)}
        self.warnings: list[str] = []  # what Warn field validation told clients (unknown fields pruned)
        self.refusals: list[str] = []  # every 400/422 admission answered, for a test to read
        self._writes = asyncio.Lock()

    def _current(self, request: rendering.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return dict(self.objects[key].raw)

    async def _handle(self, request: rendering.Request) -> Any:
        namespace_answer = self._namespaces(request)
        if namespace_answer is not None:
            return aiohttp.web.json_response(namespace_answer)
        if request.resource is None or request.action not in WRITES:
            return await self._serve(request)
        # One write at a time, as etcd's compare-and-swap would: each is admitted against the object it replaces
        # (a deletion too, or a patch computed before it could overwrite its deletionTimestamp).
        async with self._writes:
            if request.action == enums.action.DELETE or request.data is None:
                return await self._serve(request)
            told = len(self.warnings)
            try:
                admitted = self._admit(request)
            except Refused as refused:
                if refused.code in (400, 422):
                    self.refusals.append(refused.message)
                raise kmock.KubernetesError(refused.code, refused.reason, refused.message,
                                            refused.status(*self._kind(request), request.name or "")) from refused
            response = await self._serve(admitted)
            for warning in self.warnings[told:]:  # how the real server words them (RFC 7234 warn-code 299)
                response.headers.add("Warning", f"299 - {json.dumps(warning)}")
            return response

    async def _serve(self, request: rendering.Request) -> Any:
        try:
            return await super()._handle(request)
        finally:
            # The real collector also removes a dependent created after its owner was gone (a Pod the job
            # controller makes for a Job deleted a moment before): so collect after creates too.
            if request.action in (enums.action.DELETE, enums.action.CREATE) and request.resource is not None:
                await self._collect_garbage()

    def _kind(self, request: rendering.Request) -> tuple[str, str]:
        """The request's kind and API group (``""`` for the core group)."""
        assert request.resource is not None
        for key, info in RESOURCES.items():
            if key.rsplit("/", 1)[-1] == request.resource.plural:
                return str(info.kind), key.split("/")[0] if key.count("/") == 2 else ""
        return str(request.resource.plural), ""

    def _admit(self, request: rendering.Request) -> rendering.Request:
        """The request as the server carries it out: custom resources admitted whole, names and labels checked."""
        assert request.resource is not None
        kind, group = self._kind(request)
        crd = self.crds.get(str(request.resource.plural))
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            self._on_create(request)
            if crd is not None:
                return _with_data(request, self._admit_custom(crd, request, None, request.data))
            refuse_object(kind, group, request.data)
            return request
        current = self._current(request)
        if current is None:
            return request  # kmock answers 404
        if crd is not None:
            candidate = self._patched(current, request)
            replaced = self._admit_custom(crd, request, current, candidate)
            return _with_data(request, [{"op": "replace", "path": "", "value": replaced}])
        if isinstance(request.data, dict):
            self._on_patch(request)
        elif isinstance(request.data, list):
            self._on_json_patch(request)
        refuse_object(kind, group, dict(dicts.patch_dict(current, request.data)))
        return request

    def _patched(self, current: dict[str, Any], request: rendering.Request) -> dict[str, Any]:
        """The object a patch asks for (409 on a stale resourceVersion; 422 on a failed JSON-patch test)."""
        if isinstance(request.data, list):
            try:
                return dict(jsonpatch.apply_patch(current, request.data, in_place=False))
            except jsonpatch.JsonPatchException as failed:
                raise Refused(422, "Invalid", f"the server rejected our request due to an error in our request: "
                                              f"{failed}") from failed
        self._check_version(current, request.data)
        return dict(dicts.patch_dict(current, request.data))

    def _admit_custom(self, crd: dict[str, Any], request: rendering.Request, current: dict[str, Any] | None,
                      candidate: dict[str, Any]) -> dict[str, Any]:
        """`admit`, then the bookkeeping: a new resourceVersion, and a new generation when more than meta changed."""
        warnings: list[str] = []
        admitted = admit(crd, candidate, current, request.params.get("fieldValidation", "Warn"),
                         request.subresource, warnings)
        self.warnings += warnings
        if current is not None:
            meta = admitted["metadata"]
            for key in ("uid", "creationTimestamp", "generation", "namespace", "name"):
                if key in current["metadata"]:
                    meta[key] = current["metadata"][key]
            meta["resourceVersion"] = str(next(self.versions))
            if _content(admitted) != _content(current):
                meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
        return admitted

    @property
    def namespace_objects(self) -> dict[str, dict[str, Any]]:
        """Namespaces by name (see `_namespaces`)."""
        found: dict[str, dict[str, Any]] = self.__dict__.setdefault("_namespace_objects", {})
        return found

    def add_namespace(self, namespace: dict[str, Any]) -> None:
        """What ``kubectl create namespace`` would do (the fixture's way around kmock)."""
        namespace["metadata"].update(uid=str(uuid.uuid4()), resourceVersion=str(next(self.versions)))
        self.namespace_objects[namespace["metadata"]["name"]] = namespace

    def _namespaces(self, request: rendering.Request) -> dict[str, Any] | None:
        """Namespaces by name: kmock 0.8 reads ``/api/v1/namespaces[/x]`` as a namespace prefix and fails.

        Worked around here, in the fixture: tests add them with `add_namespace` (kmock cannot even
        parse the POST), and GET reads one (the operator only reads them).
        """
        parts = request.url.path.strip("/").split("/")
        if parts[:3] != ["api", "v1", "namespaces"] or len(parts) > 4:
            return None
        known = self.namespace_objects
        if len(parts) == 4 and parts[3] in known and request.method == enums.method.GET:
            return known[parts[3]]
        if len(parts) == 4 and request.method == enums.method.GET:
            raise kmock.KubernetesError(404, "NotFound", f'namespaces "{parts[3]}" not found')
        return None

    def _on_create(self, request: rendering.Request) -> None:
        meta = request.data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        meta.setdefault("namespace", request.namespace)
        meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(self.versions)), generation=1,
                    creationTimestamp=now())

    @staticmethod
    def _check_version(current: dict[str, Any], patch: dict[str, Any]) -> None:
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != current["metadata"].get("resourceVersion"):
            raise Refused(409, "Conflict", f"the object has been modified; please apply your changes to the latest "
                                           f"version (have {wanted}, is {current['metadata'].get('resourceVersion')})")

    def _on_patch(self, request: rendering.Request) -> None:
        current = self._current(request)
        if current is None:
            return  # kmock answers 404
        patch = request.data
        self._check_version(current, patch)
        plural = request.resource.plural if request.resource else None
        if request.subresource == "status":
            for key in list(patch):
                if key != "status":
                    del patch[key]
        elif plural in STATUS_RESOURCES:
            patch.pop("status", None)
        meta = patch.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self.versions))
        if "spec" in patch and request.subresource != "status":
            meta["generation"] = int(current["metadata"].get("generation", 1)) + 1

    def _on_json_patch(self, request: rendering.Request) -> None:
        """RFC 6902: a failed ``test`` is 422 (kopf tests resourceVersion this way); else a new version."""
        current = self._current(request)
        if current is None:
            return
        for op in [o for o in request.data if o.get("op") == "test"]:
            value: Any = current
            for part in op["path"].strip("/").split("/"):
                value = value.get(part) if isinstance(value, dict) else None
            if value != op.get("value"):
                raise Refused(422, "Invalid", f"the server rejected our request due to an error in our request: "
                                              f"test failed at {op['path']}")
            request.data.remove(op)
        request.data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": str(next(self.versions))})

    async def _serve_list(self, request: rendering.Request) -> Any:
        answer = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            answer["items"] = [i for i in answer["items"] if matches(selector, i["metadata"].get("labels") or {})]
        return answer

    async def _collect_garbage(self) -> None:
        """Delete objects whose owners are all gone (background propagation), until nothing changes."""
        while True:
            async with self._lock:
                alive = {obj.raw["metadata"].get("uid") for obj in self.objects.values() if not obj.deleted}
                orphans = [(key, obj) for key, obj in self.objects.items() if not obj.deleted
                           and obj.raw["metadata"].get("ownerReferences")
                           and not any(r["uid"] in alive for r in obj.raw["metadata"]["ownerReferences"])]
                for (resource, _, _), obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})
            if not orphans:
                return


def _with_data(request: rendering.Request, data: Any) -> rendering.Request:
    """The request with the body the server carries out (kmock matches reactions to the very request it recorded)."""
    object.__setattr__(request, "data", data)  # kmock's Request is frozen
    return request


def _content(obj: dict[str, Any]) -> dict[str, Any]:
    """What a generation counts: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


@dataclass
class Sabotage:
    """What to do instead of running a Job: exit with ``exit_code`` (and ``message``), or hang in ``waiting``."""

    exit_code: int | None = None
    message: str = "simulated failure"
    waiting: str | None = None  # e.g. "ImagePullBackOff"
    unschedulable: bool = False


@dataclass
class Running:
    job: dict[str, Any]
    pod: str
    process: Any
    started: str
    termination_log: Path
    stderr: Path


@dataclass
class JobRunner:
    """The job controller and kubelet of the test cluster (see the module docstring)."""

    api: str
    root: Path
    sabotage: Callable[[dict[str, Any]], Sabotage | None] = lambda job: None
    seen: set[str] = field(default_factory=set)
    running: dict[str, Running] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)  # job names, in start order
    paused: bool = False
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store = self.root / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.logs = self.root / "pods"
        self.logs.mkdir(exist_ok=True)
        self.forks: ForkServer | None = None  # started by the first Job that runs a process (see `_fork_server`)
        self.session: aiohttp.ClientSession | None = None

    async def _fork_server(self) -> ForkServer:
        """The fork server, started on first use, off the event loop: it takes seconds (torch) and many tests run
        no Job at all."""
        if self.forks is None:
            self.forks = await asyncio.to_thread(ForkServer, [])
        return self.forks

    async def run(self) -> None:
        """Until cancelled: start new Jobs, report finished ones, stop deleted ones."""
        async with aiohttp.ClientSession(base_url=self.api) as session:
            self.session = session
            try:
                while True:
                    if not self.paused:
                        try:
                            await self.step()
                        except Exception as error:  # kept for the test to see; the runner goes on
                            logging.getLogger("tests.jobrunner").exception("job runner step failed")
                            self.errors.append(repr(error))
                    await asyncio.sleep(0.05)
            finally:
                for running in self.running.values():
                    running.process.terminate()
                if self.forks is not None:
                    self.forks.close()

    async def _json(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        assert self.session is not None
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.session.request(method, path, json=body, headers=headers) as response:
            return dict(await response.json()) if response.status < 300 else {}

    async def step(self) -> None:
        jobs = (await self._json("GET", "/apis/batch/v1/jobs")).get("items", [])
        alive = {j["metadata"]["uid"] for j in jobs}
        for uid in [u for u in self.running if u not in alive]:  # deleted: kill its Pod's process
            self.running.pop(uid).process.terminate()
        for job in jobs:
            uid = job["metadata"]["uid"]
            if uid not in self.seen:
                self.seen.add(uid)
                await self._start(job)
        for uid, running in list(self.running.items()):
            code = running.process.poll()
            if code is not None:
                del self.running[uid]
                await self._finish(running, code)

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """The directory behind a claim other than the store (a client's own data)."""
        return self.root / "claims" / namespace / claim

    def _map(self, argument: str, mounts: dict[str, Path]) -> str:
        argument = argument.replace("sqlite:////store/", f"sqlite:///{self.store}/")
        if argument.startswith("/store/") or argument == "/store":
            return str(self.store) + argument[len("/store"):]
        for mount, folder in mounts.items():
            if argument == mount or argument.startswith(mount + "/"):
                return str(folder) + argument[len(mount):]
        return argument

    def _claim_mounts(self, namespace: str, pod_spec: dict[str, Any]) -> dict[str, Path]:
        """Mount path -> local directory, for the Pod's claims other than the store."""
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec.get("volumes") or []
                  if "persistentVolumeClaim" in v and v["name"] != "store"}
        return {m["mountPath"]: self.claim_dir(namespace, claims[m["name"]])
                for m in pod_spec["containers"][0].get("volumeMounts") or [] if m["name"] in claims}

    async def _environment(self, namespace: str, container: dict[str, Any]) -> dict[str, str] | str:
        """The container's env as the kubelet resolves it, or why it cannot (CreateContainerConfigError)."""
        found: dict[str, str] = {}
        for item in container.get("env") or []:
            reference = (item.get("valueFrom") or {}).get("secretKeyRef")
            if reference is None:
                found[item["name"]] = str(item.get("value", ""))
                continue
            secret = await self._json("GET", f"/api/v1/namespaces/{namespace}/secrets/{reference['name']}")
            if reference["key"] not in (secret.get("data") or {}):
                return f"secret \"{reference['name']}\" not found" if not secret else \
                    f"couldn't find key {reference['key']} in Secret {namespace}/{reference['name']}"
            found[item["name"]] = base64.b64decode(secret["data"][reference["key"]]).decode()
        return found

    async def _start(self, job: dict[str, Any]) -> None:
        meta = job["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        template = job["spec"]["template"]
        labels = {**template["metadata"].get("labels", {}), "job-name": name, "batch.kubernetes.io/job-name": name,
                  "controller-uid": meta["uid"]}
        pod_name = f"{name}-{uuid.uuid4().hex[:5]}"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": pod_name, "namespace": namespace, "labels": labels,
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                 "uid": meta["uid"], "controller": True}]},
               "spec": template["spec"], "status": {"phase": "Pending"}}
        await self._json("POST", f"/api/v1/namespaces/{namespace}/pods", pod)
        started = now()
        await self._json("PATCH", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}/status",
                         {"status": {"startTime": started, "active": 1}})
        plan = self.sabotage(job)
        pod_path = f"/api/v1/namespaces/{namespace}/pods/{pod_name}/status"
        if plan is not None and plan.unschedulable:
            await self._json("PATCH", pod_path, {"status": {"conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}})
            return
        if plan is not None and plan.waiting:
            await self._json("PATCH", pod_path, {"status": {"containerStatuses": [
                {"name": "worker", "ready": False, "restartCount": 0,
                 "state": {"waiting": {"reason": plan.waiting, "message": f"Back-off pulling image "
                                                                          f"{template['spec']['containers'][0]['image']}"}}}]}})
            return
        container = template["spec"]["containers"][0]
        environment = await self._environment(namespace, container)
        if isinstance(environment, str):
            await self._json("PATCH", pod_path, {"status": {"containerStatuses": [
                {"name": "worker", "ready": False, "restartCount": 0,
                 "state": {"waiting": {"reason": "CreateContainerConfigError", "message": environment}}}]}})
            return
        mounts = self._claim_mounts(namespace, template["spec"])
        mounts["/tmp"] = self.root / "scratch" / pod_name  # the Pod's emptyDir: gone when the Pod ends
        argv = [self._map(a, mounts) for a in container["args"]]
        termination_log = self.logs / f"{pod_name}.termination-log"
        argv = [str(termination_log) if a == "/dev/termination-log" else a for a in argv]
        stderr = self.logs / f"{pod_name}.err"
        if plan is not None and plan.exit_code is not None:
            process: Any = _Exited(plan.exit_code)
            stderr.write_text(plan.message + "\n")
        else:
            forks = await self._fork_server()
            process = forks.start(pod_name, argv, self.logs / f"{pod_name}.out", stderr, threads=1,
                                  environment={k: v for k, v in environment.items() if k != "HOME"})
        self.ran.append(name)
        self.running[meta["uid"]] = Running(job, pod_name, process, started, termination_log, stderr)
        await self._json("PATCH", pod_path, {"status": {"phase": "Running", "containerStatuses": [
            {"name": "worker", "ready": True, "restartCount": 0, "state": {"running": {"startedAt": started}}}]}})

    async def _finish(self, running: Running, code: int) -> None:
        meta = running.job["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        message = running.termination_log.read_text() if running.termination_log.exists() else ""
        if code != 0 and not message and running.stderr.exists():  # terminationMessagePolicy FallbackToLogsOnError
            message = "\n".join(running.stderr.read_text().splitlines()[-80:])[-2048:]
        shutil.rmtree(self.root / "scratch" / running.pod, ignore_errors=True)
        finished = now()
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message,
                      "startedAt": running.started, "finishedAt": finished}
        await self._json("PATCH", f"/api/v1/namespaces/{namespace}/pods/{running.pod}/status", {"status": {
            "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [{"name": "worker", "ready": False, "restartCount": 0,
                                   "state": {"terminated": terminated}}]}})
        condition = {"type": "Complete" if code == 0 else "Failed", "status": "True", "lastTransitionTime": finished,
                     "reason": None if code == 0 else "BackoffLimitExceeded",
                     "message": None if code == 0 else "Job has reached the specified backoff limit"}
        await self._json("PATCH", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}/status", {"status": {
            "active": None, "succeeded" if code == 0 else "failed": 1,
            "completionTime": finished if code == 0 else None,
            "conditions": [{k: v for k, v in condition.items() if v is not None}]}})


@dataclass
class _Exited:
    """A process that has already exited with ``code`` (a sabotaged Job)."""

    code: int

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        pass


def job_args(job: dict[str, Any]) -> list[str]:
    """The worker arguments of a Job."""
    return list(job["spec"]["template"]["spec"]["containers"][0]["args"])


def dump(value: Any) -> str:
    return json.dumps(value, indent=1, default=str)
