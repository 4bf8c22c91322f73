"""The site's operator: one FederatedParticipation's loop, reading its task from the store and running it as a Job.

The same operator image runs both roles. At a site, each FederatedParticipation names a training in
an object store; a pass reads the participation fresh, reads ``sites/<site>/task.json`` with the
site's own credentials (its Secret, read by name only), lets `fedtrain.sites.agent.plan` decide, and
acts: a refusal is written to the store as a failed result (exit 77) and shown in the status and a
Warning Event; an accepted task becomes a Job in the participation's namespace, on the site's own
claim mounted read-only; a withdrawn task's Job is deleted; a Job that failed is answered in the
store with its exit code and a reason free of the site's paths (a worker that succeeded wrote its
own answer). Then the status goes to the status subresource as a merge patch.

Restart safety comes from the store and the API, not from memory: a task with an answer in the
store is never run again, the Job's name is deterministic (a second create answers 409), and a
finished Job carries an annotation once its end has been counted in the status. Nothing here
imports kopf: the handlers call `SiteController.reconcile` on a timer and on the site's Job events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedtrain.contract.errors import EXIT_BAD_INPUT, BadDataError, BadInputError, TemporaryStorageError
from fedtrain.contract.layout import Layout
from fedtrain.contract.sitetask import (
    POSTING_LIMIT,
    Posting,
    SiteResult,
    SiteTask,
    encode,
    parse_posting,
    parse_result,
    parse_task,
)
from fedtrain.contract.storage import Store, open_store
from fedtrain.operator.jobs import (
    LABEL_MANAGED_BY,
    LABEL_TASK,
    MANAGER,
    POD_ANNOTATIONS,
    TERMINATION_LOG,
    WORKER_SERVICE_ACCOUNT,
    finished,
    fit,
    object_store_access,
    observe,
    operator_worker_image,
    worker_account_manifest,
)
from fedtrain.operator.jobs import LABEL_PARTICIPATION as LABEL_PARTICIPATION
from fedtrain.operator.kube import ApiError, Kube
from fedtrain.operator.site_secrets import SiteSecrets, site_secret_file, site_secret_volume
from fedtrain.operator.status import merge_patch
from fedtrain.operator.storeaccess import secret_environment
from fedtrain.sites import agent
from fedtrain.sites.pace import Pace
from fedtrain.sites.participation import (
    PARTICIPATION_KIND,
    PARTICIPATION_PLURAL,
    ParticipationError,
    ParticipationSpec,
    ParticipationStatus,
    parse_participation_spec,
    training_location,
)
from fedtrain.spec import API_VERSION, GROUP, VERSION

log = logging.getLogger("fedtrain.operator.sites")
SITE_DATA_MOUNT = "/site-data"
LABEL_SITE = "fedtrain.io/site"
ANNOTATION_PARTICIPATION = "fedtrain.io/participation"  # the whole name, where the label may be cut
ANNOTATION_SITE_TASK = "fedtrain.io/site-task"  # the task's JSON: what a failure is answered with
ANNOTATION_COUNTED = "fedtrain.io/counted"  # the Job's end is in the participation's status
# Phases after which the participation needs no loop: the coordinator said the training is over.
OVER = ("Completed", "Failed", "Deleted")
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"}}


@dataclass(frozen=True)
class SiteOutcome:
    """What a pass found: whether the participation still needs its loop, and when to look again."""

    active: bool
    delay: float = 5.0
    phase: str = ""


def participation_path(namespace: str, name: str = "") -> str:
    """A FederatedParticipation, or the collection of a namespace."""
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PARTICIPATION_PLURAL}"
    return f"{base}/{name}" if name else base


def participation_selector(name: str) -> dict[str, str]:
    """The label selector of a participation's Jobs (and Pods)."""
    return {LABEL_PARTICIPATION: fit(name)}


def site_job_name(participation: str, task_id: str) -> str:
    """``<participation>-<task id>``, fitted to 63 characters: a restarted operator creates the same name."""
    return fit(f"{participation}-{task_id}")


def data_path(spec: ParticipationSpec) -> str:
    """The site's GTSRB tree as the worker Pod sees it: the claim's mount and ``data.path`` inside it."""
    return f"{SITE_DATA_MOUNT}/{spec.data.path}".rstrip("/")


def spec_problems(spec: ParticipationSpec) -> list[str]:
    """What a participation lacks to run on a cluster (beyond what its model validates), one line per field."""
    problems = []
    if spec.store.s3 is None:
        problems.append("spec.store.s3: a site on Kubernetes reaches the training through an object store; "
                        "store.local is for `fedtrain site run`")
    elif spec.store.s3.credentials_secret is None:
        problems.append("spec.store.s3.credentialsSecret: name the Secret (in the participation's namespace) that "
                        "holds this site's access key and secret")
    if spec.data.claim_name is None:
        problems.append("spec.data.claimName: a site on Kubernetes reads its data from one of its claims; "
                        "data.localPath and data.synthetic are for `fedtrain site run`")
    return problems


def site_job_manifest(task: SiteTask, spec: ParticipationSpec, participation: dict[str, Any],
                      arguments: list[str], now: float) -> dict[str, Any]:
    """The Job that runs ``fedtrain-worker <arguments>`` for ``task`` on the site's claim, owned by the participation.

    The store's keys come from the site's Secret by reference (their values never enter the Job);
    security settings are those of the coordinator's worker Jobs. The Job may run until the task's
    deadline and no longer: past it the coordinator no longer waits for the answer. A secure
    round's task also mounts the site's master secret, read-only (`site_secret_volume`).
    """
    meta = participation["metadata"]
    s3 = spec.store.s3
    assert s3 is not None and s3.credentials_secret is not None and spec.data.claim_name is not None
    job_labels = {"app.kubernetes.io/name": "fedtrain-worker", LABEL_MANAGED_BY: MANAGER,
                  LABEL_PARTICIPATION: fit(meta["name"]), LABEL_SITE: spec.site, LABEL_TASK: task.kind,
                  "fedtrain.io/round": str(task.round)}
    env, volumes, mounts = object_store_access(s3, meta["namespace"])
    if task.secure is not None:
        volume, mount = site_secret_volume(meta["name"], spec.site)
        volumes, mounts = [*volumes, volume], [*mounts, mount]
    worker = spec.worker
    container: dict[str, Any] = {
        "name": "worker", "image": worker.image or operator_worker_image(), "imagePullPolicy": worker.image_pull_policy,
        "command": [agent.WORKER_COMMAND], "args": arguments, "workingDir": "/tmp",
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
                {"name": "PYTHONUNBUFFERED", "value": "1"}, *env, *(worker.env or [])],
        "resources": worker.resources or {},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                         {"name": "site-data", "mountPath": SITE_DATA_MOUNT, "readOnly": True}, *mounts],
        "terminationMessagePath": TERMINATION_LOG, "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": CONTAINER_SECURITY,
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never", "serviceAccountName": WORKER_SERVICE_ACCOUNT, "automountServiceAccountToken": False,
        "securityContext": POD_SECURITY, "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}},
                    {"name": "site-data", "persistentVolumeClaim": {"claimName": spec.data.claim_name,
                                                                    "readOnly": True}}, *volumes],
    }
    if worker.node_selector:
        pod_spec["nodeSelector"] = worker.node_selector
    if worker.tolerations:
        pod_spec["tolerations"] = worker.tolerations
    owner = {"apiVersion": API_VERSION, "kind": PARTICIPATION_KIND, "name": meta["name"], "uid": meta["uid"],
             "controller": True, "blockOwnerDeletion": True}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": site_job_name(meta["name"], task.id), "namespace": meta["namespace"],
                     "labels": job_labels, "ownerReferences": [owner],
                     "annotations": {ANNOTATION_PARTICIPATION: meta["name"],
                                     ANNOTATION_SITE_TASK: json.dumps(task.to_json(), sort_keys=True)}},
        "spec": {"backoffLimit": 0, "activeDeadlineSeconds": max(1, math.ceil(task.deadline - now)),
                 "template": {"metadata": {"labels": job_labels, "annotations": POD_ANNOTATIONS}, "spec": pod_spec}},
    }


def job_task(job: dict[str, Any]) -> SiteTask | None:
    """The task a site Job runs (from its annotation), or None for a Job that is not one of ours."""
    raw = (job["metadata"].get("annotations") or {}).get(ANNOTATION_SITE_TASK)
    if not raw:
        return None
    try:
        return parse_task(json.loads(raw), f"Job {job['metadata']['name']}")
    except (ValueError, BadDataError):
        return None


def running_task(jobs: list[dict[str, Any]]) -> str | None:
    """The id of the task whose Job still runs (at most one: a site runs one task at a time)."""
    for job in jobs:
        task = job_task(job)
        if task is not None and not finished(job) and not job["metadata"].get("deletionTimestamp"):
            return task.id
    return None


class SiteController:
    """Reconciles FederatedParticipations through the API and the store; ``clock`` is injectable for deadlines."""

    def __init__(self, kube: Kube, clock: Callable[[], float] = time.time) -> None:
        self.kube = kube
        self.clock = clock
        self.known_jobs: Callable[[str, str], list[dict[str, Any]]] | None = None
        self._stores: dict[str, tuple[Any, Store]] = {}  # by participation uid: (what it was opened with, store)
        # By participation uid: when to look next (`Pace`), and the posting last read with its tag.
        self._paces: dict[str, Pace] = {}
        self._postings: dict[str, tuple[str | None, Posting | None]] = {}
        self._answers: dict[str, set[str]] = {}  # by participation uid: tasks whose answer is in the store
        self.secrets = SiteSecrets(kube)

    def follow(self, known_jobs: Callable[[str, str], list[dict[str, Any]]]) -> None:
        """Read each participation's Jobs from the operator's watch (a kopf index) instead of listing them."""
        self.known_jobs = known_jobs

    def forget(self, uid: str) -> None:
        """The participation's loop ended."""
        self._stores.pop(uid, None)
        self._paces.pop(uid, None)
        self._postings.pop(uid, None)
        self._answers.pop(uid, None)
        self.secrets.forget(uid)

    async def reconcile(self, namespace: str, name: str) -> SiteOutcome:
        """One pass: read, decide with `agent.plan`, act, write the status."""
        try:
            resource = await self.kube.get(participation_path(namespace, name))
        except ApiError as error:
            if error.status == 404:
                return SiteOutcome(active=False)
            raise
        if resource["metadata"].get("deletionTimestamp"):
            return SiteOutcome(active=False, phase="Deleting")
        status = ParticipationStatus.model_validate(resource.get("status") or {})
        if status.phase in OVER and status.training_phase in agent.FINISHED_PHASES:
            return SiteOutcome(active=False, phase=status.phase)
        try:
            spec = parse_participation_spec(resource.get("spec") or {}, f"{namespace}/{name}")
        except ParticipationError as error:
            return await self._problem(resource, status, "InvalidSpec", "; ".join(error.problems), 30.0)
        problems = spec_problems(spec)
        if problems:
            return await self._problem(resource, status, "InvalidSpec", "; ".join(problems), 30.0)
        try:
            return await self._pass(resource, status, spec)
        except (BadInputError, BadDataError) as error:
            return await self._problem(resource, status, "StoreRefused", agent.redact(str(error), []),
                                       float(spec.poll_seconds))
        except TemporaryStorageError as error:
            log.warning("%s/%s: the store did not answer: %s", namespace, name, error)
            return SiteOutcome(active=True, delay=float(spec.poll_seconds), phase=status.phase)

    async def _pass(self, resource: dict[str, Any], status: ParticipationStatus,
                    spec: ParticipationSpec) -> SiteOutcome:
        meta = resource["metadata"]
        store = await self._store(resource, spec)
        layout = Layout()
        jobs = await self._jobs(meta["namespace"], meta["name"], meta["uid"])
        ended = await self._settle(jobs, spec, store, layout)
        # A pass lists the site's Jobs from the API server whatever the store: never the pace of a local store's reads.
        pace = self._paces.setdefault(meta["uid"], Pace(float(spec.poll_seconds)))
        if ended:
            pace.moved()  # an answer was just written: the next task is coming
        posting = agent.vanished(await asyncio.to_thread(self._posting, store, layout, spec.site, meta["uid"], pace),
                                 status)
        pace.follow(posting is not None and posting.phase == "Running", float(spec.poll_seconds))
        running = running_task(jobs)
        answered = posting is not None and posting.task is not None and await self._answered(
            store, layout, spec.site, posting.task.id, running, meta["uid"])
        action = agent.plan(posting, spec.site, spec.policy, self.clock(), answered, running, spec.suspend)
        if isinstance(action, agent.Cancel) and await asyncio.to_thread(
                store.exists, layout.site_result(spec.site, action.task_id)):
            action = agent.Wait(action.task_id)  # answered: the Job is ending on its own; keep it and its logs
        await self._act(action, resource, spec, store, layout, jobs)
        new = status
        endings: list[tuple[SiteTask, SiteResult] | None] = [*ended] or [None]
        for ending in endings:
            new = agent.next_status(new, posting, action, ending, self.clock())
        new.observed_generation = meta.get("generation")
        await self._write_status(resource, new)
        await self._mark_counted(jobs)
        over = isinstance(action, agent.Idle) and action.finished
        if not isinstance(action, agent.Wait | agent.Idle):
            pace.moved()  # it started, refused or cancelled a task
        return SiteOutcome(active=not over, delay=pace.next_wait(), phase=new.phase)

    async def _store(self, resource: dict[str, Any], spec: ParticipationSpec) -> Store:
        """The training's store with the site's credentials; opened again when the spec or the Secret changed."""
        s3 = spec.store.s3
        assert s3 is not None
        environment, version = await secret_environment(self.kube, resource["metadata"]["namespace"], s3,
                                                         "spec.store.s3.credentialsSecret")
        known = self._stores.get(resource["metadata"]["uid"])
        if known is not None and known[0] == (spec, version):
            return known[1]
        store = await asyncio.to_thread(open_store, training_location(spec), environment)
        self._stores[resource["metadata"]["uid"]] = ((spec, version), store)
        return store

    async def _answered(self, store: Store, layout: Layout, site: str, task_id: str, running: str | None,
                        uid: str) -> bool:
        """Whether a task's answer is in the store: not asked while its Job runs, remembered once it is."""
        known = self._answers.setdefault(uid, set())
        if task_id not in known and running != task_id and await asyncio.to_thread(
                store.exists, layout.site_result(site, task_id)):
            known.add(task_id)
        return task_id in known

    def _posting(self, store: Store, layout: Layout, site: str, uid: str, pace: Pace) -> Posting | None:
        """The site's ``task.json``, or None while the coordinator has posted nothing: read again only if it changed."""
        key = layout.site_task(site)
        seen = self._postings.get(uid)
        version = store.read_if_changed(key, POSTING_LIMIT, seen[0] if seen else None)
        if seen is not None and not version.changed:
            return seen[1]
        pace.moved()
        posting = parse_posting(version.data, store.describe(key)) if version.data is not None else None
        self._postings[uid] = (version.tag, posting)
        return posting

    async def _jobs(self, namespace: str, name: str, uid: str) -> list[dict[str, Any]]:
        """The participation's Jobs: from the watch when followed, else listed by label."""
        if self.known_jobs is not None:
            found = self.known_jobs(namespace, name)
        else:
            found = await self.kube.list(f"/apis/batch/v1/namespaces/{namespace}/jobs", participation_selector(name))
        return [j for j in found if any(r.get("uid") == uid for r in j["metadata"].get("ownerReferences") or [])]

    async def _settle(self, jobs: list[dict[str, Any]], spec: ParticipationSpec, store: Store,
                      layout: Layout) -> list[tuple[SiteTask, SiteResult]]:
        """Finished Jobs not yet counted: each with its answer, written here when the worker failed."""
        ended = []
        for job in jobs:
            task = job_task(job)
            if task is None or not finished(job) or (job["metadata"].get("annotations") or {}).get(ANNOTATION_COUNTED):
                continue
            key = layout.site_result(spec.site, task.id)
            result = await asyncio.to_thread(self._answer, store, key)
            if result is None:
                result = await self._failure(job, task, spec)
                await asyncio.to_thread(store.write_bytes, key, encode(result))
            ended.append((task, result))
        return ended

    @staticmethod
    def _answer(store: Store, key: str) -> SiteResult | None:
        if not store.exists(key):
            return None
        return parse_result(store.read_bytes(key), store.describe(key))

    async def _failure(self, job: dict[str, Any], task: SiteTask, spec: ParticipationSpec) -> SiteResult:
        """The answer for a Job that ended without one: its exit code and reason (from the Pod), redacted."""
        meta = job["metadata"]
        pods = await self.kube.list(f"/api/v1/namespaces/{meta['namespace']}/pods",
                                    {"batch.kubernetes.io/job-name": meta["name"]})
        pods.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "")
        seen = observe(job, pods)
        if seen.state == "succeeded":
            return agent.failure_result(task, spec.site, None, "the site's worker ended without writing its answer",
                                        [])
        return agent.failure_result(task, spec.site, seen.exit_code, seen.reason,
                                    [data_path(spec), SITE_DATA_MOUNT])

    async def _act(self, action: agent.SiteAction, resource: dict[str, Any], spec: ParticipationSpec, store: Store,
                   layout: Layout, jobs: list[dict[str, Any]]) -> None:
        """Refuse in the store, create the task's Job, or delete a withdrawn one."""
        meta = resource["metadata"]
        if isinstance(action, agent.Refuse):
            result = agent.refusal_result(action.task, spec.site, action.reason)
            await asyncio.to_thread(store.write_bytes, layout.site_result(spec.site, action.task.id), encode(result))
            await self._post(resource, "TaskRefused", f"refused task {action.task.id}: {action.reason}", True)
        elif isinstance(action, agent.Run):
            await self._start(action.task, resource, spec, store, layout)
        elif isinstance(action, agent.Cancel):
            for job in jobs:
                task = job_task(job)
                if task is not None and task.id == action.task_id:
                    await self.kube.delete(f"/apis/batch/v1/namespaces/{meta['namespace']}/jobs/"
                                           f"{job['metadata']['name']}")
            await self._post(resource, "TaskCancelled", f"cancelled task {action.task_id}: {action.why}", False)

    async def _start(self, task: SiteTask, resource: dict[str, Any], spec: ParticipationSpec, store: Store,
                     layout: Layout) -> None:
        """Create the task's Job, unless its answer is in the store already (never run or upload twice)."""
        if await asyncio.to_thread(store.exists, layout.site_result(spec.site, task.id)):
            return
        namespace = resource["metadata"]["namespace"]
        await self.kube.get_or_create(f"/api/v1/namespaces/{namespace}/serviceaccounts",
                                      worker_account_manifest(namespace))
        if task.secure is not None and not await self._secret(task, resource, spec, store, layout):
            return
        arguments = agent.worker_arguments(task, spec, training_location(spec), data_path(spec),
                                           site_secret_file(spec.site))
        manifest = site_job_manifest(task, spec, resource, arguments, self.clock())
        try:
            await self.kube.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", manifest)
        except ApiError as error:
            if error.status != 409:  # 409: created by an earlier pass or process; it runs, wait for it
                raise
            return
        await self._post(resource, "TaskStarted", f"running task {task.id} (Job {manifest['metadata']['name']})",
                         False)

    async def _secret(self, task: SiteTask, resource: dict[str, Any], spec: ParticipationSpec, store: Store,
                      layout: Layout) -> bool:
        """The site's master secret is there for a secure task's Job; if it cannot be, the task is answered failed."""
        try:
            await self.secrets.ensure(resource, spec.site)
            return True
        except BadInputError as error:
            result = agent.failure_result(task, spec.site, EXIT_BAD_INPUT, str(error), [])
            await asyncio.to_thread(store.write_bytes, layout.site_result(spec.site, task.id), encode(result))
            await self._post(resource, "SecureSecretRefused", f"task {task.id} not run: {error}", True)
            return False

    async def _write_status(self, resource: dict[str, Any], after: ParticipationStatus) -> None:
        """Merge-patch the status subresource with what changed (conditional: a 409 waits for the next pass)."""
        patch = merge_patch(resource.get("status") or {}, after.model_dump(by_alias=True, exclude_none=True))
        if not patch:
            return
        meta = resource["metadata"]
        body = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": patch}
        try:
            await self.kube.merge_patch(participation_path(meta["namespace"], meta["name"]) + "/status", body)
        except ApiError as error:
            if error.status != 409:
                raise
            log.debug("%s/%s changed while deciding; the next pass writes", meta["namespace"], meta["name"])

    async def _mark_counted(self, jobs: list[dict[str, Any]]) -> None:
        """Finished Jobs whose end the status now holds: annotated, so that no later pass counts them again."""
        for job in jobs:
            meta = job["metadata"]
            if finished(job) and job_task(job) is not None and not (meta.get("annotations") or {}).get(
                    ANNOTATION_COUNTED):
                await self.kube.merge_patch(f"/apis/batch/v1/namespaces/{meta['namespace']}/jobs/{meta['name']}",
                                            {"metadata": {"annotations": {ANNOTATION_COUNTED: "true"}}})
                meta.setdefault("annotations", {})[ANNOTATION_COUNTED] = "true"

    async def _problem(self, resource: dict[str, Any], status: ParticipationStatus, reason: str, message: str,
                       delay: float) -> SiteOutcome:
        """A participation that cannot run as it is: say why in its status and an Event; look again later."""
        if status.message != message:
            new = status.model_copy(deep=True)
            new.message = message
            new.observed_generation = resource["metadata"].get("generation")
            await self._write_status(resource, new)
            await self._post(resource, reason, message, True)
        return SiteOutcome(active=True, delay=delay, phase=status.phase)

    async def _post(self, resource: dict[str, Any], reason: str, message: str, warning: bool) -> None:
        involved = {"apiVersion": API_VERSION, "kind": PARTICIPATION_KIND, "metadata": resource["metadata"]}
        try:
            await self.kube.post_event(involved, reason, message, warning)
        except ApiError as error:  # an Event is worth a log line, not a failed pass
            log.warning("could not post event %s: %s", reason, error)
