"""kopf handlers: thin. They only wake a training's loop or call the controller, deletion or profile provisioning.

Run with ``kopf run --standalone --all-namespaces -m fedtrain.operator.handlers`` (the Deployment in
``deploy/`` does). Each unfinished FederatedTraining gets a daemon, a loop that runs a reconcile
pass whenever one of its Jobs finishes or goes or its spec changes, and every few seconds anyway (round deadlines
and Pods stuck pulling an image change no Job); it ends when the training finishes or is deleted.
kopf restarts the daemons of all existing trainings when the operator starts, and the status holds
everything they need: that is what makes restarts safe.

The same operator runs a site's side: each FederatedParticipation gets a daemon too, a loop that
reads the site's task from the store as `fedtrain.sites.pace` says, at least every ``spec.pollSeconds`` (no watch
reports a posting) and
at once when one of its Jobs changes (`fedtrain.operator.sites`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from typing import Any

import kopf

from fedtrain.operator.controller import Controller, Outcome
from fedtrain.operator.deletion import release_storage
from fedtrain.operator.jobs import (
    ANNOTATION_TRAINING,
    LABEL_MANAGED_BY,
    LABEL_TRAINING,
    LABEL_TRAINING_NAMESPACE,
    LABEL_TRAINING_UID,
    MANAGER,
    WORKER_SERVICE_ACCOUNT,
    finished,
    pod_view,
)
from fedtrain.operator.kube import ApiError, Kube
from fedtrain.operator.loops import Backoff, Wakeups
from fedtrain.operator.profile_provisioner import ProfileProvisioner
from fedtrain.operator.profiles import LABEL_PROFILE, PROFILE_GROUP, PROFILE_PLURAL, PROFILE_VERSION
from fedtrain.operator.sites import ANNOTATION_PARTICIPATION, LABEL_PARTICIPATION, SiteController
from fedtrain.sites.participation import PARTICIPATION_PLURAL
from fedtrain.spec import GROUP, PLURAL, VERSION

PROFILE_NAMESPACE_WAITS = 30  # x 2 s: how long a new profile's namespace may take to appear


def active_tick() -> float:
    """Seconds between passes of a running training when no event comes (``FEDTRAIN_TICK_SECONDS``)."""
    return float(os.environ.get("FEDTRAIN_TICK_SECONDS", "5"))


def site_tick() -> float:
    """Seconds between passes while remote sites work (``FEDTRAIN_SITE_POLL_SECONDS``, default 0.5).

    No watch reports a site's answer, so the store is read this often instead: one existence check
    per site task awaited, so that an answer is seen within half a second.
    """
    return float(os.environ.get("FEDTRAIN_SITE_POLL_SECONDS", "0.5"))


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Keep kopf's own bookkeeping in annotations (status is ours alone) and build the controllers."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING  # the controller posts the Events people read
    settings.watching.server_timeout = 300
    watch_only_ours(settings)
    # What is loaded by now (kopf, the API client, pydantic's schemas) lives as long as the process: kept out
    # of the collector's scans, a full collection no longer stalls whichever pass happens to trigger it.
    gc.freeze()
    memo.controller = Controller(Kube.from_environment())
    memo.wakeups = Wakeups()
    memo.profiles = ProfileProvisioner(memo.controller.kube)
    memo.sites = SiteController(memo.controller.kube)
    memo.site_wakeups = Wakeups()
    port = int(os.environ.get("FEDTRAIN_METRICS_PORT", "9090"))  # 0: no metrics server
    if port:
        from prometheus_client import start_http_server

        start_http_server(port)


def watch_only_ours(settings: kopf.OperatorSettings) -> None:
    """Ask the API server for the objects the handlers below look at, not for every one in the cluster.

    kopf filters handlers by label on its side; without these selectors it would stream every Job,
    Pod, ConfigMap, claim and ServiceAccount of the cluster to the operator. Each selector is what
    all handlers of that resource have in common.
    """
    managed = f"{LABEL_MANAGED_BY}={MANAGER}"
    settings.watching.label_selectors["batch", "v1", "jobs"] = managed
    settings.watching.label_selectors["v1", "pods"] = managed
    settings.watching.label_selectors["v1", "configmaps"] = LABEL_PROFILE
    settings.watching.label_selectors["v1", "persistentvolumeclaims"] = LABEL_PROFILE
    settings.watching.field_selectors["v1", "serviceaccounts"] = f"metadata.name={WORKER_SERVICE_ACCOUNT}"


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    """Close the API connection pool."""
    memo.controller.kube.close()


def _training_of(namespace: str | None, labels: kopf.Labels, annotations: kopf.Annotations) -> tuple[str, str]:
    """A worker Job's training: its namespace (a label on Jobs in client namespaces) and its whole name."""
    return (labels.get(LABEL_TRAINING_NAMESPACE) or namespace or "",
            annotations.get(ANNOTATION_TRAINING) or labels[LABEL_TRAINING])


@kopf.index("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGER, LABEL_TRAINING: kopf.PRESENT})
def worker_jobs(namespace: str | None, body: kopf.Body, labels: kopf.Labels, annotations: kopf.Annotations,
                **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Every worker Job as the watch last saw it, by training: passes read Jobs here instead of listing them."""
    return {_training_of(namespace, labels, annotations): dict(body)}


@kopf.index("v1", "pods", labels={LABEL_MANAGED_BY: MANAGER, LABEL_TRAINING_UID: kopf.PRESENT})
def worker_pods(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, Any]]:
    """Every worker Pod as the watch last saw it (only what decisions read), by its training's uid.

    By uid, not by name: a Pod carries its training's name only as a label, cut to 63 characters.
    """
    return {labels[LABEL_TRAINING_UID]: pod_view(dict(body))}


@kopf.index("v1", "serviceaccounts", field="metadata.name", value=WORKER_SERVICE_ACCOUNT)
def worker_accounts(namespace: str | None, **_: Any) -> dict[str, bool]:
    """The namespaces whose worker account the watch has seen: a launch there need not read it first."""
    return {namespace or "": True}


# On deletion or shutdown kopf sets `stopped` and, after cancellation_backoff, cancels the loop; the
# loop wakes on `stopped` and ends well within that (after the pass in flight, if any).
@kopf.daemon(GROUP, VERSION, PLURAL, id="rounds", cancellation_backoff=10.0, cancellation_timeout=2.0)
async def drive(namespace: str | None, name: str, body: kopf.Body, stopped: kopf.DaemonStopped, memo: Any,
                logger: logging.Logger | logging.LoggerAdapter[Any], **indexes: Any) -> None:
    """The training's loop: a pass, then wait for a Job or spec event (or the tick), until it is finished.

    A finished training needs no loop (nothing changes it again); a deleted one ends the loop at once.
    Requests the API server refuses for good have failed the training inside the pass; what is left
    here is temporary (5xx, 429, lost connections): retried with a growing delay.
    """
    assert namespace is not None  # FederatedTrainings are namespaced
    controller: Controller = memo.controller
    wakeups: Wakeups = memo.wakeups
    jobs: kopf.Index[tuple[str, str], dict[str, Any]] = indexes["worker_jobs"]  # kopf passes indexes by name
    pods: kopf.Index[str, dict[str, Any]] = indexes["worker_pods"]
    accounts: kopf.Index[str, bool] = indexes["worker_accounts"]
    controller.follow(lambda space, training: list(jobs.get((space, training), [])),
                      lambda uid: list(pods.get(uid, [])), accounts.__contains__)
    backoff = Backoff()
    while not stopped:
        try:
            outcome = await controller.reconcile(namespace, name, lambda: body)  # kopf keeps `body` current
            delay = min(active_tick(), site_tick()) if outcome.sites_pending else active_tick()
            backoff.reset()
        except ApiError as error:
            delay = backoff.next()
            logger.warning("reconcile failed, retrying in %.0f s: %s", delay, error)
            outcome = Outcome(active=True)
        if not outcome.active:
            break
        await wakeups.wait(namespace, name, delay, until=stopped.wait)
    wakeups.forget(namespace, name)
    controller.forget(namespace, name)


def _job_settled(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> bool:
    """Whether a Job event can change a decision: the Job finished (Complete or Failed) or is gone.

    A Job starting or counting its Pods changes nothing the engine reads; a Pod stuck before it
    starts is found by the loop's tick. Waking on those too doubled the passes.
    """
    return event.get("type") == "DELETED" or finished(dict(body))


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGER, LABEL_TRAINING: kopf.PRESENT},
               when=_job_settled)
def job_changed(namespace: str | None, labels: kopf.Labels, annotations: kopf.Annotations, memo: Any,
                **_: Any) -> None:
    """A worker Job changed: its training decides now (the next Jobs follow within a second).

    A Job in a client's namespace names its training's namespace in a label; the annotation keeps the
    training's whole name (a label value may be cut to 63 characters).
    """
    memo.wakeups.wake(*_training_of(namespace, labels, annotations))


def _spec_changed(body: kopf.Body, **_: Any) -> bool:
    status = body.get("status") or {}
    return body.metadata.get("generation") != status.get("observedGeneration")


@kopf.on.event(GROUP, VERSION, PLURAL, when=_spec_changed)
def training_changed(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    """A new generation (spec edit: suspend, resume...): decide now, not at the next tick."""
    memo.wakeups.wake(namespace or "", name)


@kopf.on.delete(GROUP, VERSION, PLURAL, id="storage")
async def release(namespace: str | None, name: str, uid: str, spec: kopf.Spec, status: kopf.Status, memo: Any,
                  **_: Any) -> None:
    """Finalizer: delete Jobs in client namespaces and, with ``reclaimPolicy: Delete``, the training's weights."""
    assert namespace is not None
    memo.wakeups.forget(namespace, name)
    controller: Controller = memo.controller
    if not await release_storage(controller.api, controller.relays, namespace, name, uid, dict(spec), dict(status)):
        raise kopf.TemporaryError("waiting for the training's Jobs to stop and its directory to be removed", delay=2)


@kopf.on.event(PROFILE_GROUP, PROFILE_VERSION, PROFILE_PLURAL)
async def profile_changed(event: kopf.RawEvent, body: kopf.Body, memo: Any, **_: Any) -> None:
    """A Kubeflow profile appeared or changed: provision its namespace.

    Only watched (no finalizer, no annotations): the operator never writes to Kubeflow's Profiles. What
    it provisions carries an owner reference to the profile, so the garbage collector removes it when
    the profile goes, whether or not the operator runs then. Without Kubeflow installed, kopf waits for
    the resource to appear and this never runs.
    """
    if event.get("type") == "DELETED":
        return
    for _attempt in range(PROFILE_NAMESPACE_WAITS):
        try:
            await memo.profiles.provision(dict(body))
            return
        except ApiError as error:
            if error.status != 404:  # 404: Kubeflow has not created the profile's namespace yet
                raise
        await asyncio.sleep(2.0)
    raise kopf.PermanentError(f"namespace {body.metadata.name} did not appear; provisioning again at the "
                              "profile's next change")


def _deleted(event: kopf.RawEvent, **_: Any) -> bool:
    return event.get("type") == "DELETED"


@kopf.on.event("v1", "serviceaccounts", labels={LABEL_PROFILE: kopf.PRESENT}, when=_deleted)
@kopf.on.event("v1", "configmaps", labels={LABEL_PROFILE: kopf.PRESENT}, when=_deleted)
@kopf.on.event("v1", "persistentvolumeclaims", labels={LABEL_PROFILE: kopf.PRESENT}, when=_deleted)
async def profile_object_deleted(labels: kopf.Labels, memo: Any, **_: Any) -> None:
    """Someone deleted what a profile needs: put it back (nothing happens once the profile itself is gone)."""
    await memo.profiles.repair(labels[LABEL_PROFILE])


def _participation_of(namespace: str | None, labels: kopf.Labels, annotations: kopf.Annotations) -> tuple[str, str]:
    """A site Job's participation: its namespace and whole name (the label may be cut to 63 characters)."""
    return namespace or "", annotations.get(ANNOTATION_PARTICIPATION) or labels[LABEL_PARTICIPATION]


@kopf.index("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGER, LABEL_PARTICIPATION: kopf.PRESENT})
def site_jobs(namespace: str | None, body: kopf.Body, labels: kopf.Labels, annotations: kopf.Annotations,
              **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Every site Job as the watch last saw it, by participation."""
    return {_participation_of(namespace, labels, annotations): dict(body)}


@kopf.daemon(GROUP, VERSION, PARTICIPATION_PLURAL, id="tasks", cancellation_backoff=10.0, cancellation_timeout=2.0)
async def participate(namespace: str | None, name: str, uid: str, stopped: kopf.DaemonStopped, memo: Any,
                      logger: logging.Logger | logging.LoggerAdapter[Any], **indexes: Any) -> None:
    """A site's loop: a pass every ``spec.pollSeconds`` or when one of its Jobs changes, until the training is over.

    Passes that fail for a temporary reason (API 5xx, 429, lost connections) are retried with a growing delay.
    """
    assert namespace is not None  # FederatedParticipations are namespaced
    sites: SiteController = memo.sites
    wakeups: Wakeups = memo.site_wakeups
    jobs: kopf.Index[tuple[str, str], dict[str, Any]] = indexes["site_jobs"]
    sites.follow(lambda space, participation: list(jobs.get((space, participation), [])))
    backoff = Backoff()
    while not stopped:
        try:
            outcome = await sites.reconcile(namespace, name)
            delay = outcome.delay
            backoff.reset()
        except ApiError as error:
            delay = backoff.next()
            logger.warning("site pass failed, retrying in %.0f s: %s", delay, error)
        else:
            if not outcome.active:
                break
        await wakeups.wait(namespace, name, delay, until=stopped.wait)
    wakeups.forget(namespace, name)
    sites.forget(uid)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGER, LABEL_PARTICIPATION: kopf.PRESENT})
def site_job_changed(namespace: str | None, labels: kopf.Labels, annotations: kopf.Annotations, memo: Any,
                     **_: Any) -> None:
    """A site Job changed: its participation answers now (a finished task is reported within a second)."""
    memo.site_wakeups.wake(*_participation_of(namespace, labels, annotations))


@kopf.on.event(GROUP, VERSION, PARTICIPATION_PLURAL, when=_spec_changed)
def participation_changed(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    """A new generation (suspend, policy edit...): decide now, not at the next poll."""
    memo.site_wakeups.wake(namespace or "", name)
