"""The Kubernetes executor around the engine: one reconcile pass reads, decides, stores, then acts.

A pass takes the FederatedTraining (its status is the engine's durable state) and the training's
Jobs and Pods as the operator's watches last delivered them (or reads them from the API), turns
them into observations, and asks the pure engine what next. The new status is stored first,
conditionally on the resourceVersion it was read at; only then are Jobs created or deleted and
Events posted. So:

- a pass that raced with another writer stores nothing and acts on nothing (409: read again);
- an operator killed after storing but before creating Jobs finds tasks the status calls running
  with no Job, and the engine launches them again under the same deterministic name;
- one killed after creating Jobs but before storing re-decides the same thing, and the creates
  answer 409 AlreadyExists. No round is lost or run twice.

Nothing here imports kopf: the handlers call `reconcile` on Job events, on spec changes and on a
timer (deadlines and stuck Pods change nothing the API would tell us about). The pass's other jobs
live beside it: what it reads about a training (`training_api`), the remote sites' postings and
answers (`site_relays`), the counting of what it stored (`metrics`); deletion (`deletion`) and
Kubeflow profiles (`profile_provisioner`) are not part of a pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedtrain.engine import decide, fail
from fedtrain.engine.engine import running_task_ids
from fedtrain.engine.status import FINISHED, Cancel, Decision, Launch, Observation, Reason, TrainingStatus
from fedtrain.operator import metrics
from fedtrain.operator.jobs import (
    ANNOTATION_ACCEPT,
    ANNOTATION_TASK_ID,
    CLEANUP_TASK,
    Owner,
    accepts,
    claim_manifest,
    claim_name,
    finished,
    has_ended,
    job_manifest,
    job_namespace,
    job_of,
    kubernetes_problems,
    observe,
    placement,
    training_selector,
    worker_account_manifest,
)
from fedtrain.operator.kube import ApiError, Kube, Paths
from fedtrain.operator.secure_secrets import SecureSecrets
from fedtrain.operator.site_relays import SiteRelays
from fedtrain.operator.status import Conflict, read_status, write_status
from fedtrain.operator.training_api import Refusal, TrainingApi, owned_by
from fedtrain.sites.relay import assignments
from fedtrain.spec import FederatedTrainingSpec, SpecError, parse_spec
from fedtrain.tasks import aggregation_clients, remote, training_id, worker_arguments

log = logging.getLogger("fedtrain.operator")
MAX_CONFLICT_RETRIES = 5
KEEP_ROUNDS = 2  # Jobs of the last finished rounds stay for `kubectl logs`; older ones are deleted
JobSource = Callable[[str, str], list[dict[str, Any]]]  # (namespace, name) -> the training's Jobs, as last seen
PodSource = Callable[[str], list[dict[str, Any]]]  # training uid -> its worker Pods (`pod_view`), as last seen
Seen = Callable[[], Mapping[str, Any]]  # the training as the watch last delivered it


def api_refusal(error: ApiError) -> tuple[str, str]:
    """The Failed reason and message for a request the API server refuses for good (`ApiError.permanent`)."""
    if error.status == 403:
        return Reason.FORBIDDEN, (f"the API server refused {error.request}: {error.message}; the operator's "
                                  "ServiceAccount needs this permission (see deploy/rbac.yaml)")
    return Reason.API_REJECTED, (f"the API server refused {error.request}: {error.status} {error.reason}: "
                                 f"{error.message}")


@dataclass(frozen=True)
class Outcome:
    """What a pass found: whether the training still has work that Job events or the clock will move.

    ``sites_pending``: it waits for remote sites, whose answers no watch reports, so the next pass
    should come sooner than the usual tick.
    """

    active: bool
    phase: str = ""
    sites_pending: bool = False


def storage_claim(spec: FederatedTrainingSpec, training: str) -> str | None:
    """The claim Jobs mount (None with an object store); a spec that cannot run here is a `SpecError`."""
    problems = kubernetes_problems(spec)
    if problems:
        raise SpecError(problems)
    return claim_name(spec, training)


def pods_by_job(pods: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each Job's Pods, oldest first."""
    by_job: dict[str, list[dict[str, Any]]] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
        owner = job_of(pod)
        if owner:
            by_job.setdefault(owner, []).append(pod)
    return by_job


def observations_from(jobs: list[dict[str, Any]], by_job: dict[str, list[dict[str, Any]]]
                      ) -> tuple[dict[str, Observation], list[dict[str, Any]]]:
    """Observations by task id, and the Jobs whose Pods (`pods_by_job`) are stuck (failed, still alive)."""
    observations: dict[str, Observation] = {}
    stuck: list[dict[str, Any]] = []
    for job in jobs:
        ident = (job["metadata"].get("annotations") or {}).get(ANNOTATION_TASK_ID)
        if not ident or ident == CLEANUP_TASK:
            continue
        seen = observe(job, by_job.get(job["metadata"]["name"], []))
        observations[ident] = seen
        if seen.state == "failed" and not finished(job):
            stuck.append(job)
    return observations, stuck


class Controller:
    """Reconciles FederatedTrainings through the API; ``clock`` is injectable for the engine's deadlines."""

    def __init__(self, kube: Kube, clock: Callable[[], float] = time.time) -> None:
        self.kube = kube
        self.clock = clock
        self.known_jobs: JobSource | None = None
        self.known_pods: PodSource | None = None
        self.known_accounts: Callable[[str], bool] | None = None
        self.api = TrainingApi(kube)
        self.relays = SiteRelays(self.api)
        self.secrets = SecureSecrets(kube)
        # (namespace, name) -> (the resourceVersion a status write replaced, the resource it returned)
        self._written: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}

    def follow(self, known_jobs: JobSource, known_pods: PodSource,
               known_accounts: Callable[[str], bool] | None = None) -> None:
        """Read Jobs, Pods and worker accounts from the operator's watches (kopf indexes), not from the API each pass.

        ``known_accounts(namespace)``: whether the watch has seen the namespace's worker account.
        """
        self.known_jobs = known_jobs
        self.known_pods = known_pods
        self.known_accounts = known_accounts

    def forget(self, namespace: str, name: str) -> None:
        """The training's loop ended: drop what this process remembered of it."""
        self._written.pop((namespace, name), None)
        self.relays.forget(namespace, name)
        self.secrets.forget(namespace, name)

    async def reconcile(self, namespace: str, name: str, seen: Seen | None = None) -> Outcome:
        """One pass, repeated while another writer changed the resource under it.

        ``seen`` gives the training as the operator's watch last delivered it (kopf's live body): the
        first attempt decides from that, or from what this process last wrote when the watch has not
        delivered the write yet, without a read. A stale copy costs nothing but a retry: the status is
        written on the condition of the resourceVersion it was read at, and a retry reads the API.
        """
        for attempt in range(MAX_CONFLICT_RETRIES):
            try:
                return await self._pass(namespace, name, seen if attempt == 0 else None)
            except Conflict:
                log.debug("%s/%s changed while deciding; deciding again", namespace, name)
        return Outcome(active=True)

    def _latest(self, namespace: str, name: str, seen: Seen) -> dict[str, Any]:
        """The watch's copy of the training, or this process's own last write if the watch still has the one before."""
        watched = dict(seen())
        written = self._written.get((namespace, name))
        if written is not None and watched.get("metadata", {}).get("resourceVersion") == written[0]:
            return written[1]
        return watched

    async def _pass(self, namespace: str, name: str, seen: Seen | None = None) -> Outcome:
        if seen is not None:
            resource = self._latest(namespace, name, seen)
        else:
            try:
                resource = await self.kube.get(Paths.training(namespace, name))
            except ApiError as error:
                if error.status == 404:
                    return Outcome(active=False)
                raise
        meta = resource["metadata"]
        if meta.get("deletionTimestamp"):
            return Outcome(active=False, phase="Deleting")
        status = read_status(resource)
        owner = Owner(name, namespace, meta["uid"])
        if status.phase in FINISHED:  # final: nothing re-judges a finished training; its sites hear it once more
            await self.relays.repost_end(resource, owner, status)
            return Outcome(active=False, phase=status.phase)
        spec: FederatedTrainingSpec | None = None
        try:
            spec = parse_spec(await self.api.effective_spec(namespace, name, resource.get("spec") or {}, status),
                              f"{namespace}/{name}")
            return await self._run(resource, status, spec, owner)
        except SpecError as error:
            return await self._fail(owner, spec, Reason.INVALID_SPEC, "; ".join(error.problems))
        except Refusal as refusal:
            return await self._fail(owner, spec, refusal.reason, refusal.message)
        except ApiError as error:
            if not error.permanent:
                raise
            return await self._fail(owner, spec, *api_refusal(error))

    async def _run(self, resource: dict[str, Any], status: TrainingStatus, spec: FederatedTrainingSpec,
                   owner: Owner) -> Outcome:
        """Observe the training's Jobs, let the engine decide, store the status, then act on the decision."""
        claim = storage_claim(spec, owner.name)
        if spec.storage.create is not None:
            await self._ensure_claim(spec, owner)
        refusal = await self.client_namespaces_refusal(spec, owner)
        if refusal:
            raise Refusal(Reason.CLIENT_NAMESPACE_NOT_ALLOWED, refusal)
        await self.secrets.ensure(spec, owner)  # secure aggregation's client keys, before any Job could mount one
        jobs, by_job = await self.observed_objects(spec, owner, status)
        observations, stuck = observations_from(jobs, by_job)
        relay = await self.relays.relay(spec, owner) if spec.clients.sites() else None
        if relay is not None:
            observations.update(await self.relays.exchange(relay.observe, status))
        if spec.storage.s3 is not None:  # as `fedtrain run` records it: what sites (and people) find the weights by
            status.training_id = status.training_id or training_id(owner.namespace, owner.name, owner.uid)
        decision = decide(spec, status, observations, self.clock(), resource["metadata"].get("generation"))
        log.debug("%s/%s: %s, %d observations, %d actions", owner.namespace, owner.name, decision.status.progress,
                  len(observations), len(decision.actions))
        await self._store(resource, owner, status, decision, jobs)
        if relay is not None:  # after the status is stored: a posting never runs ahead of it
            await self.relays.exchange(relay.publish, decision.status)
        local = [a for a in decision.actions if not (isinstance(a, Launch) and remote(a.task, spec))]
        await self._act(local, spec, owner, claim, decision.status, stuck, jobs)
        await self._prune(jobs, decision.status)
        pending = relay is not None and bool(assignments(spec, decision.status))
        return Outcome(active=decision.status.phase not in FINISHED, phase=decision.status.phase,
                       sites_pending=pending)

    async def _store(self, resource: dict[str, Any], owner: Owner, before: TrainingStatus, decision: Decision,
                     jobs: list[dict[str, Any]]) -> None:
        """The one way a decision is recorded: the status (conditionally), its metrics, then its Events."""
        written = await write_status(self.kube, resource, decision.status)
        if written is not None:
            self._written[(owner.namespace, owner.name)] = (resource["metadata"]["resourceVersion"], written)
            metrics.count(owner, before, decision.status, jobs)
        for event in decision.events:
            await self.api.post(resource, event)

    async def _fail(self, owner: Owner, spec: FederatedTrainingSpec | None, reason: str, message: str) -> Outcome:
        """Fail the training through the engine, read afresh (an earlier write in this pass moved it on).

        Its Jobs are cancelled. With no valid spec, only the training's own namespace can be searched.
        """
        resource = await self.kube.get(Paths.training(owner.namespace, owner.name))
        status = read_status(resource)
        decision = fail(status, reason, message, self.clock(), resource["metadata"].get("generation"))
        jobs: list[dict[str, Any]] = []
        if decision.actions:
            jobs = (await self.api.worker_objects(spec, owner))[0] if spec is not None else await self._own_jobs(owner)
        await self._store(resource, owner, status, decision, jobs)
        await self._cancel(decision.actions, jobs)
        if spec is not None:
            await self.relays.tell(resource, spec, owner, lambda relay: relay.publish(decision.status))
        return Outcome(active=False, phase=decision.status.phase)

    async def _own_jobs(self, owner: Owner) -> list[dict[str, Any]]:
        listed = await self.kube.list(Paths.jobs(owner.namespace), training_selector(owner))
        return [j for j in listed if owned_by(j, owner.uid)]

    async def _cancel(self, actions: list[Launch | Cancel], jobs: list[dict[str, Any]]) -> None:
        by_task = {(j["metadata"].get("annotations") or {}).get(ANNOTATION_TASK_ID): j for j in jobs}
        for action in actions:
            found = by_task.get(action.task_id) if isinstance(action, Cancel) else None
            if found is not None:
                await self.kube.delete(Paths.jobs(found["metadata"]["namespace"], found["metadata"]["name"]))

    async def _act(self, actions: list[Launch | Cancel], spec: FederatedTrainingSpec, owner: Owner,
                   claim: str | None, status: TrainingStatus, stuck: list[dict[str, Any]],
                   jobs: list[dict[str, Any]]) -> None:
        """Create and delete Jobs; a Job the API server refuses for good raises `Refusal`."""
        where = placement(spec, owner)
        for namespace in sorted({job_namespace(spec, owner, a.task) for a in actions if isinstance(a, Launch)}):
            await self.ensure_worker_account(namespace)
        await self._cancel(actions, jobs)
        for action in actions:
            if not isinstance(action, Launch):
                continue
            task = action.task
            arguments = worker_arguments(task, spec, where, aggregation_clients(status, task.round))
            manifest = job_manifest(task, spec, owner, arguments, claim)
            try:
                await self.kube.create(Paths.jobs(manifest["metadata"]["namespace"]), manifest)
                metrics.JOBS_CREATED.labels(task.kind).inc()
            except ApiError as error:
                if error.status == 409:
                    continue  # created by an earlier pass: the deterministic name makes this idempotent
                if error.permanent and error.status != 403:
                    raise Refusal(Reason.JOB_REJECTED,
                                  f"the API server refused Job {manifest['metadata']['name']}: {error.message}; "
                                  "check spec.worker (resources, volumes, env) and the client entries") from None
                raise
        for job in stuck:  # the engine has recorded them as failed; their Pods would wait forever
            await self.kube.delete(Paths.jobs(job["metadata"]["namespace"], job["metadata"]["name"]))

    async def client_namespaces_refusal(self, spec: FederatedTrainingSpec, owner: Owner) -> str:
        """Why a client namespace may not be used by this training ("" when all have opted in).

        Checked on every pass, so a namespace that withdraws its consent stops the training.
        """
        for client, namespace in sorted(spec.clients.namespaces().items()):
            if namespace == owner.namespace:
                continue
            try:
                found = await self.kube.get(Paths.namespace(namespace))
            except ApiError as error:
                if error.status != 404:
                    raise
                return f"client {client}: namespace {namespace} does not exist"
            annotation = (found["metadata"].get("annotations") or {}).get(ANNOTATION_ACCEPT)
            if not accepts(annotation, owner):
                now = f"; it now says {annotation!r}" if annotation else ""
                return (f"client {client}: namespace {namespace} has not opted in to training "
                        f"{owner.namespace}/{owner.name}; its owners must annotate it {ANNOTATION_ACCEPT}="
                        f"{owner.namespace} (or {owner.namespace}/{owner.name}){now}")
        return ""

    async def observed_objects(self, spec: FederatedTrainingSpec, owner: Owner, status: TrainingStatus
                               ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        """The training's Jobs and its Pods by Job (`pods_by_job`), as the watches last saw them (`follow`), or listed.

        A Job's end and its Pod's end come on two watch streams, in either order. When a Job the engine
        waits for has finished but the watch has not yet shown its Pod's end (the exit code and the
        task's output are there), the Pods are listed once: a decision never reads a finished task
        without its output. Otherwise a pass lists nothing, whatever the number of other trainings.
        """
        if self.known_jobs is None or self.known_pods is None:
            jobs, pods = await self.api.worker_objects(spec, owner)
            return jobs, pods_by_job(pods)
        jobs = [j for j in self.known_jobs(owner.namespace, owner.name) if owned_by(j, owner.uid)]
        by_job = pods_by_job(self.known_pods(owner.uid))
        waiting = set(running_task_ids(status))
        for job in jobs:
            ident = (job["metadata"].get("annotations") or {}).get(ANNOTATION_TASK_ID)
            if ident in waiting and finished(job) and not has_ended(by_job.get(job["metadata"]["name"], [])):
                return jobs, pods_by_job(await self.api.worker_pods(spec, owner))
        return jobs, by_job

    async def ensure_worker_account(self, namespace: str) -> None:
        """The worker ServiceAccount of a namespace: no role bindings and no token, so Pods get no API rights.

        Not read again where the watch has seen it; one deleted meanwhile is made again at the next launch.
        """
        if self.known_accounts is not None and self.known_accounts(namespace):
            return
        await self.kube.get_or_create(Paths.core(namespace, "serviceaccounts"), worker_account_manifest(namespace))

    async def _ensure_claim(self, spec: FederatedTrainingSpec, owner: Owner) -> None:
        wanted = claim_manifest(spec, owner)
        existing = await self.kube.get_or_create(Paths.core(owner.namespace, "persistentvolumeclaims"), wanted)
        if existing is not None and not owned_by(existing, owner.uid):
            raise SpecError([f"spec.storage.create: a claim named {wanted['metadata']['name']} already exists and "
                             "is not this training's; delete it, or use it with storage.persistentVolumeClaim"])

    async def _prune(self, jobs: list[dict[str, Any]], status: TrainingStatus) -> None:
        """Delete the Jobs of rounds older than the last `KEEP_ROUNDS` finished: status and storage have them."""
        for job in jobs:
            number = int((job["metadata"].get("labels") or {}).get("fedtrain.io/round", "0"))
            record = status.round(number)
            settled = record is None or record.finished_at is not None
            if number < status.current_round - KEEP_ROUNDS and settled and not job["metadata"].get("deletionTimestamp"):
                await self.kube.delete(Paths.jobs(job["metadata"]["namespace"], job["metadata"]["name"]))
