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
timer (deadlines and stuck Pods change nothing the API would tell us about).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fedtrain.engine import decide, fail
from fedtrain.engine.engine import cause, running_task_ids
from fedtrain.engine.status import FINISHED, Cancel, Decision, Event, Launch, Observation, Reason, TrainingStatus
from fedtrain.operator import metrics
from fedtrain.operator.jobs import (
    ANNOTATION_ACCEPT,
    ANNOTATION_TASK_ID,
    CLEANUP_TASK,
    LABEL_MANAGED_BY,
    LABEL_TASK,
    LABEL_TRAINING_NAMESPACE,
    LABEL_TRAINING_UID,
    MANAGER,
    Owner,
    accepts,
    claim_manifest,
    claim_name,
    cleanup_job_manifest,
    finished,
    has_ended,
    job_manifest,
    job_name,
    job_namespace,
    job_of,
    kubernetes_problems,
    observe,
    operator_worker_image,
    placement,
    training_selector,
    worker_account_manifest,
)
from fedtrain.operator.kube import ApiError, Kube, Paths
from fedtrain.operator.profiles import (
    DEFAULTS_CONFIGMAP,
    LABEL_PROFILE,
    WORKER_IMAGE_DEFAULT,
    apply_defaults,
    provision,
)
from fedtrain.operator.status import Conflict, read_status, write_status
from fedtrain.operator.storeaccess import secret_environment
from fedtrain.sites.relay import SiteRelay, assignments
from fedtrain.spec import API_VERSION, KIND, STORAGE_KINDS, FederatedTrainingSpec, SpecError, parse_spec
from fedtrain.tasks import aggregation_clients, remote, training_id, worker_arguments
from fedtrain.worker.errors import BadDataError, BadInputError, TemporaryStorageError
from fedtrain.worker.sitetask import DELETED
from fedtrain.worker.storage import open_store

log = logging.getLogger("fedtrain.operator")
MAX_CONFLICT_RETRIES = 5
PLURALS = {"ServiceAccount": "serviceaccounts", "ConfigMap": "configmaps",
           "PersistentVolumeClaim": "persistentvolumeclaims"}
KEEP_ROUNDS = 2  # Jobs of the last finished rounds stay for `kubectl logs`; older ones are deleted
JobSource = Callable[[str, str], list[dict[str, Any]]]  # (namespace, name) -> the training's Jobs, as last seen
PodSource = Callable[[str], list[dict[str, Any]]]  # training uid -> its worker Pods (`pod_view`), as last seen
Seen = Callable[[], Mapping[str, Any]]  # the training as the watch last delivered it


class Refusal(Exception):
    """Something outside the rounds that the training cannot get past: it fails with ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


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


class Wakeups:
    """One asyncio event per training: set by Job and resource events, awaited by the training's loop."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], asyncio.Event] = {}

    def event(self, namespace: str, name: str) -> asyncio.Event:
        """The training's event (created on first use)."""
        return self._events.setdefault((namespace, name), asyncio.Event())

    def wake(self, namespace: str, name: str) -> None:
        """Ask for a pass now."""
        self.event(namespace, name).set()

    def forget(self, namespace: str, name: str) -> None:
        """The training is gone."""
        self._events.pop((namespace, name), None)

    async def wait(self, namespace: str, name: str, timeout: float,
                   until: Callable[[], Awaitable[object]] | None = None) -> None:
        """Until woken, ``until()`` completes (the daemon is stopped) or ``timeout`` seconds passed.

        Clears the event for the next pass.
        """
        event = self.event(namespace, name)
        waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(event.wait())]
        if until is not None:
            waiters.append(asyncio.ensure_future(until()))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        event.clear()


class Backoff:
    """Delays between retries of a pass that failed for a temporary reason: 1, 2, 4... up to a minute."""

    FIRST, LAST = 1.0, 60.0

    def __init__(self) -> None:
        self.failures = 0

    def next(self) -> float:
        """The delay before the next try."""
        self.failures += 1
        return min(self.FIRST * 2 ** (self.failures - 1), self.LAST)

    def reset(self) -> None:
        """A pass went through."""
        self.failures = 0


def storage_claim(spec: FederatedTrainingSpec, training: str) -> str | None:
    """The claim Jobs mount (None with an object store); a spec that cannot run here is a `SpecError`."""
    problems = kubernetes_problems(spec)
    if problems:
        raise SpecError(problems)
    return claim_name(spec, training)


def owned_by(item: dict[str, Any], uid: str) -> bool:
    """Whether an object belongs to this incarnation of the training (a recreated one has a new uid).

    Jobs in a client's namespace cannot have an owner reference to the training: their label says.
    """
    meta = item.get("metadata", {})
    return any(ref.get("uid") == uid for ref in meta.get("ownerReferences") or []) or \
        (meta.get("labels") or {}).get(LABEL_TRAINING_UID) == uid


def _timestamp(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


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


def record_metrics(owner: Owner, before: TrainingStatus, after: TrainingStatus, jobs: list[dict[str, Any]]) -> None:
    """Count what the stored status gained: finished rounds, failed clients, the end of the training."""
    for record in after.rounds:
        previous = before.round(record.round)
        if record.finished_at is not None and (previous is None or previous.finished_at is None):
            metrics.ROUNDS.labels(owner.namespace, owner.name).inc()
            if record.started_at is not None:
                metrics.ROUND_SECONDS.observe(record.finished_at - record.started_at)
            _observe_aggregation(jobs, record.round)
        for client, task in record.clients.items():
            was = previous.clients.get(client) if previous else None
            if task.state in ("failed", "dropped") and (was is None or was.state != task.state):
                metrics.CLIENT_FAILURES.labels(owner.namespace, owner.name, cause(task) or task.state).inc()
    if after.phase in FINISHED and before.phase not in FINISHED:
        metrics.TRAININGS_FINISHED.labels(owner.namespace, after.phase).inc()


def _observe_aggregation(jobs: list[dict[str, Any]], round_number: int) -> None:
    for job in jobs:
        job_labels = job["metadata"].get("labels") or {}
        if job_labels.get(LABEL_TASK) == "aggregate" and job_labels.get("fedtrain.io/round") == str(round_number):
            start = _timestamp(job.get("status", {}).get("startTime"))
            end = _timestamp(job.get("status", {}).get("completionTime"))
            if start is not None and end is not None:
                metrics.AGGREGATION_SECONDS.observe(end - start)


class Controller:
    """Reconciles FederatedTrainings through the API; ``clock`` is injectable for the engine's deadlines."""

    def __init__(self, kube: Kube, clock: Callable[[], float] = time.time) -> None:
        self.kube = kube
        self.clock = clock
        self.known_jobs: JobSource | None = None
        self.known_pods: PodSource | None = None
        self.known_accounts: Callable[[str], bool] | None = None
        self._relays: dict[str, SiteRelay] = {}  # by training uid: what each has posted, checksums read
        self._ended: set[tuple[str, str]] = set()  # (uid, phase or Deleted) this process posted to the sites
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
        for uid, relay in list(self._relays.items()):
            if relay.training == f"{namespace}/{name}":
                del self._relays[uid]

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
            await self._repost_end(resource, owner, status)
            return Outcome(active=False, phase=status.phase)
        spec: FederatedTrainingSpec | None = None
        try:
            spec = parse_spec(await self.effective_spec(namespace, name, resource.get("spec") or {}, status),
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
        jobs, by_job = await self.observed_objects(spec, owner, status)
        observations, stuck = observations_from(jobs, by_job)
        relay = await self.site_relay(spec, owner) if spec.clients.sites() else None
        if relay is not None:
            observations.update(await self._sites(relay.observe, status))
        if spec.storage.s3 is not None:  # as `fedtrain run` records it: what sites (and people) find the weights by
            status.training_id = status.training_id or training_id(owner.namespace, owner.name, owner.uid)
        decision = decide(spec, status, observations, self.clock(), resource["metadata"].get("generation"))
        log.debug("%s/%s: %s, %d observations, %d actions", owner.namespace, owner.name, decision.status.progress,
                  len(observations), len(decision.actions))
        await self._store(resource, owner, status, decision, jobs)
        if relay is not None:  # after the status is stored: a posting never runs ahead of it
            await self._sites(relay.publish, decision.status)
        local = [a for a in decision.actions if not (isinstance(a, Launch) and remote(a.task, spec))]
        await self._act(local, spec, owner, claim, decision.status, stuck, jobs)
        await self._prune(jobs, decision.status)
        pending = relay is not None and bool(assignments(spec, decision.status))
        return Outcome(active=decision.status.phase not in FINISHED, phase=decision.status.phase,
                       sites_pending=pending)

    async def _sites(self, call: Callable[[TrainingStatus], Any], status: TrainingStatus) -> Any:
        """Run a relay call off the event loop; a store down for a moment costs this pass its site news only.

        Refused credentials or a missing bucket fail the training (`Refusal`), as they would fail its Jobs.
        """
        try:
            return await asyncio.to_thread(call, status)
        except TemporaryStorageError as error:
            log.warning("the store did not answer about the sites: %s", error)
            return {}
        except BadInputError as error:
            raise Refusal(Reason.BAD_INPUT, f"remote sites: {error}") from None
        except BadDataError as error:
            raise Refusal(Reason.BAD_DATA, f"remote sites: {error}") from None

    async def site_relay(self, spec: FederatedTrainingSpec, owner: Owner) -> SiteRelay:
        """The training's relay, with the store credentials of its Secret (read when the relay is made)."""
        relay = self._relays.get(owner.uid)
        if relay is None or relay.spec != spec:
            try:
                environment = await self.store_environment(spec, owner.namespace)
            except BadInputError as error:  # the Secret lacks a key the spec names
                raise Refusal(Reason.BAD_INPUT, str(error)) from None
            where = placement(spec, owner).workdir
            store = await asyncio.to_thread(open_store, where, environment)
            relay = SiteRelay(store, spec, f"{owner.namespace}/{owner.name}")
            self._relays[owner.uid] = relay
        return relay

    async def store_environment(self, spec: FederatedTrainingSpec, namespace: str) -> dict[str, str]:
        """The store's environment for the relay: the spec's settings, its Secret's keys, its CA bundle."""
        s3 = spec.storage.s3
        assert s3 is not None  # `kubernetes_problems` requires it with sites
        environment, _ = await secret_environment(self.kube, namespace, s3, "spec.storage.s3.credentialsSecret")
        return environment

    async def _store(self, resource: dict[str, Any], owner: Owner, before: TrainingStatus, decision: Decision,
                     jobs: list[dict[str, Any]]) -> None:
        """The one way a decision is recorded: the status (conditionally), its metrics, then its Events."""
        written = await write_status(self.kube, resource, decision.status)
        if written is not None:
            self._written[(owner.namespace, owner.name)] = (resource["metadata"]["resourceVersion"], written)
            record_metrics(owner, before, decision.status, jobs)
        for event in decision.events:
            await self._post(resource, event)

    async def _fail(self, owner: Owner, spec: FederatedTrainingSpec | None, reason: str, message: str) -> Outcome:
        """Fail the training through the engine, read afresh (an earlier write in this pass moved it on).

        Its Jobs are cancelled. With no valid spec, only the training's own namespace can be searched.
        """
        resource = await self.kube.get(Paths.training(owner.namespace, owner.name))
        status = read_status(resource)
        decision = fail(status, reason, message, self.clock(), resource["metadata"].get("generation"))
        jobs: list[dict[str, Any]] = []
        if decision.actions:
            jobs = (await self.worker_objects(spec, owner))[0] if spec is not None else await self._own_jobs(owner)
        await self._store(resource, owner, status, decision, jobs)
        await self._cancel(decision.actions, jobs)
        if spec is not None:
            await self.tell_sites(resource, spec, owner, lambda relay: relay.publish(decision.status))
        return Outcome(active=False, phase=decision.status.phase)

    async def _repost_end(self, resource: dict[str, Any], owner: Owner, status: TrainingStatus) -> None:
        """Post a finished training's end to its sites once per process: a crash between status and posting lost it."""
        if (owner.uid, status.phase) in self._ended or not (resource.get("spec") or {}).get("clients", {}).get("list"):
            return
        self._ended.add((owner.uid, status.phase))
        try:
            spec = parse_spec(await self.effective_spec(owner.namespace, owner.name, resource.get("spec") or {},
                                                        status), f"{owner.namespace}/{owner.name}")
        except SpecError:
            return  # it never ran, so no site was told anything
        if spec.clients.sites():
            await self.tell_sites(resource, spec, owner, lambda relay: relay.publish(status))

    async def tell_sites(self, resource: dict[str, Any], spec: FederatedTrainingSpec, owner: Owner,
                         call: Callable[[SiteRelay], None]) -> bool:
        """Post the training's end to its sites (`SiteRelay.publish` or `SiteRelay.end`); True when done or none.

        Best effort: a training that failed or is being deleted must not wait on its store, so a
        store or Secret that cannot be reached is a Warning Event (the sites then stop at their
        tasks' deadlines), not an error.
        """
        if not spec.clients.sites() or spec.storage.s3 is None:
            return True
        try:
            relay = await self.site_relay(spec, owner)
            await asyncio.to_thread(call, relay)
            return True
        except (Refusal, TemporaryStorageError, BadInputError, BadDataError) as error:
            message = error.message if isinstance(error, Refusal) else str(error)
            await self._post(resource, Event(Reason.SITES_NOT_TOLD, f"the sites were not told that the training "
                                                                    f"ended: {message}", warning=True))
            return False

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
            jobs, pods = await self.worker_objects(spec, owner)
            return jobs, pods_by_job(pods)
        jobs = [j for j in self.known_jobs(owner.namespace, owner.name) if owned_by(j, owner.uid)]
        by_job = pods_by_job(self.known_pods(owner.uid))
        waiting = set(running_task_ids(status))
        for job in jobs:
            ident = (job["metadata"].get("annotations") or {}).get(ANNOTATION_TASK_ID)
            if ident in waiting and finished(job) and not has_ended(by_job.get(job["metadata"]["name"], [])):
                return jobs, pods_by_job(await self.worker_pods(spec, owner))
        return jobs, by_job

    async def worker_objects(self, spec: FederatedTrainingSpec, owner: Owner
                             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The training's Jobs and Pods, listed in its namespace and in its clients' namespaces."""
        jobs: list[dict[str, Any]] = []
        for namespace, selector in self._selectors(spec, owner):
            listed = await self.kube.list(Paths.jobs(namespace), selector)
            jobs += [j for j in listed if owned_by(j, owner.uid)]
        return jobs, await self.worker_pods(spec, owner)

    async def worker_pods(self, spec: FederatedTrainingSpec, owner: Owner) -> list[dict[str, Any]]:
        """The training's Pods, in its namespace and in its clients' namespaces."""
        pods: list[dict[str, Any]] = []
        for namespace, selector in self._selectors(spec, owner):
            pods += await self.kube.list(Paths.core(namespace, "pods"), selector)
        return pods

    @staticmethod
    def _selectors(spec: FederatedTrainingSpec, owner: Owner) -> list[tuple[str, dict[str, str]]]:
        """Where a training's worker objects are, and their label selector there."""
        found = [(owner.namespace, training_selector(owner))]
        for namespace in sorted(set(spec.clients.namespaces().values()) - {owner.namespace}):
            found.append((namespace, {**training_selector(owner), LABEL_TRAINING_NAMESPACE: owner.namespace}))
        return found

    async def effective_spec(self, namespace: str, name: str, raw_spec: dict[str, Any],
                             status: TrainingStatus) -> dict[str, Any]:
        """The spec with the namespace's ``fedtrain-defaults`` filled in where it is silent (profiles).

        The operator's own worker image (`operator_worker_image`) counts as a default beneath the
        namespace's. The ConfigMap is read once, at the first pass that needs it, and its data kept in ``status``
        (stored with the pass's decision): later passes fill in the same values without reading it, so
        an edit to the defaults never moves a running training's storage or experiment. A training
        applied right after its defaults still finds them: that first read goes to the API server.
        """
        silent = not any(k in (raw_spec.get("storage") or {}) for k in STORAGE_KINDS)
        mlflow = raw_spec.get("mlflow") or {}
        image_silent = "image" not in (raw_spec.get("worker") or {})
        if not (silent or image_silent or "experiment" not in mlflow or "trackingUri" not in mlflow):
            return raw_spec
        if status.namespace_defaults is None:
            status.namespace_defaults = {WORKER_IMAGE_DEFAULT: operator_worker_image(),
                                         **await self._namespace_defaults(namespace)}
        return apply_defaults(raw_spec, status.namespace_defaults, name)

    async def _namespace_defaults(self, namespace: str) -> dict[str, str]:
        """The data of the namespace's ``fedtrain-defaults`` ({} when there is none)."""
        try:
            defaults = await self.kube.get(Paths.core(namespace, "configmaps", DEFAULTS_CONFIGMAP))
        except ApiError as error:
            if error.status != 404:
                raise
            return {}
        return {str(k): str(v) for k, v in (defaults.get("data") or {}).items()}

    async def provision_profile(self, profile: dict[str, Any]) -> None:
        """Create what the profile's namespace lacks; keep the defaults ConfigMap equal to the annotations.

        An existing claim is never changed or removed here (it holds data): only created when missing.
        """
        if profile["metadata"].get("deletionTimestamp"):
            return
        wanted = provision(profile)
        for problem in wanted.problems:
            log.warning("profile %s: %s", profile["metadata"]["name"], problem)
        for manifest in wanted.objects:
            path = Paths.core(wanted.namespace, PLURALS[manifest["kind"]])
            existing = await self.kube.get_or_create(path, manifest)
            if existing is not None:
                await self._adopt(path, existing, manifest)

    async def _adopt(self, path: str, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
        """Bring an existing object in line with the profile, if the operator made it.

        Ours but not yet the profile's (a worker account made for an earlier training): it gets the
        profile's labels and owner. The defaults ConfigMap gets the wanted data. Objects someone else
        made are left alone.
        """
        meta, name = existing["metadata"], existing["metadata"]["name"]
        labels = meta.get("labels") or {}
        if labels.get(LABEL_MANAGED_BY) != MANAGER:
            log.warning("%s exists and was not made by the operator; leaving it as it is", f"{path}/{name}")
            return
        patch: dict[str, Any] = {}
        if labels.get(LABEL_PROFILE) != wanted["metadata"]["labels"][LABEL_PROFILE]:
            patch["metadata"] = {"labels": wanted["metadata"]["labels"],
                                 "ownerReferences": wanted["metadata"]["ownerReferences"]}
        if wanted["kind"] == "ConfigMap" and existing.get("data") != wanted["data"]:
            patch["data"] = {**{k: None for k in existing.get("data") or {}}, **wanted["data"]}
        if patch:
            await self.kube.merge_patch(f"{path}/{name}", patch)

    async def repair_profile(self, name: str) -> None:
        """Something of a profile's was deleted: provision the profile again if it still exists."""
        try:
            profile = await self.kube.get(Paths.profile(name))
        except ApiError as error:
            if error.status == 404:
                return
            raise
        await self.provision_profile(profile)

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

    async def _post(self, resource: dict[str, Any], event: Event) -> None:
        try:
            await self.kube.post_event(resource, event.reason, event.message, event.warning)
        except ApiError as error:  # an Event is worth a log line, not a failed pass
            log.warning("could not post event %s: %s", event.reason, error)

    async def _prune(self, jobs: list[dict[str, Any]], status: TrainingStatus) -> None:
        """Delete the Jobs of rounds older than the last `KEEP_ROUNDS` finished: status and storage have them."""
        for job in jobs:
            number = int((job["metadata"].get("labels") or {}).get("fedtrain.io/round", "0"))
            record = status.round(number)
            settled = record is None or record.finished_at is not None
            if number < status.current_round - KEEP_ROUNDS and settled and not job["metadata"].get("deletionTimestamp"):
                await self.kube.delete(Paths.jobs(job["metadata"]["namespace"], job["metadata"]["name"]))

    async def release_storage(self, namespace: str, name: str, uid: str, raw_spec: dict[str, Any],
                              raw_status: dict[str, Any]) -> bool:
        """On deletion: remove Jobs in client namespaces; with ``reclaimPolicy: Delete`` also the weights.

        True when done. Jobs in the training's namespace go with it (owner references); those in
        client namespaces have none, so they are deleted here by label. The weights are where the
        training kept them: its spec with the defaults its status holds.
        """
        try:
            status = read_status({"status": raw_status})
            spec = parse_spec(await self.effective_spec(namespace, name, raw_spec, status), f"{namespace}/{name}")
        except SpecError:
            return True  # it never ran, so there is nothing to remove
        owner = Owner(name, namespace, uid)
        resource = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace,
                                                                          "uid": uid}}
        if (owner.uid, DELETED) not in self._ended:  # once: a finalizer that waits for its Jobs comes back every 2 s
            self._ended.add((owner.uid, DELETED))
            await self.tell_sites(resource, spec, owner, lambda relay: relay.end())
        remove_weights = spec.storage.reclaim_policy == "Delete" and (spec.storage.persistent_volume_claim is not None
                                                                      or spec.storage.s3 is not None)
        if not remove_weights and not spec.clients.namespaces():
            return True  # Retain; or a claim the operator created, which the garbage collector deletes
        jobs, pods = await self.worker_objects(spec, owner)
        for job in jobs:
            if job["metadata"]["namespace"] != namespace and not job["metadata"].get("deletionTimestamp"):
                await self.kube.delete(Paths.jobs(job["metadata"]["namespace"], job["metadata"]["name"]))
        if not remove_weights:
            return True
        for job in await self.kube.list(Paths.jobs(namespace), training_selector(owner)):
            meta = job["metadata"]
            if meta["labels"].get(LABEL_TASK) != CLEANUP_TASK and not meta.get("deletionTimestamp"):
                await self.kube.delete(Paths.jobs(namespace, job["metadata"]["name"]))
        if any(p["metadata"]["labels"].get(LABEL_TASK) != CLEANUP_TASK and p.get("status", {}).get("phase") in
               ("Pending", "Running") for p in pods):
            return False  # a worker may still write into the directory
        cleanup = job_name(name, CLEANUP_TASK)
        try:
            job = await self.kube.get(Paths.jobs(namespace, cleanup))
        except ApiError as error:
            if error.status != 404:
                raise
            await self.kube.create(Paths.jobs(namespace), cleanup_job_manifest(spec, owner, claim_name(spec, name)))
            return False
        if (job["metadata"].get("annotations") or {}).get("fedtrain.io/training-uid") != uid:
            await self.kube.delete(Paths.jobs(namespace, cleanup))  # left by an earlier training of that name
            return False
        seen = observe(job, [p for p in pods if p["metadata"]["labels"].get(LABEL_TASK) == CLEANUP_TASK])
        if seen.state == "running":
            return False
        if seen.state == "failed":
            await self._post(resource, Event(Reason.STORAGE_NOT_RELEASED, f"the training's directory was not removed: "
                                                                   f"{seen.reason}", warning=True))
        await self.kube.delete(Paths.jobs(namespace, cleanup))
        return True
