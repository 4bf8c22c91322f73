"""kopf handlers: thin. They only wake a training's loop or call the controller.

Run with ``kopf run --standalone --all-namespaces -m fedtrain.operator.handlers`` (the Deployment in
``deploy/`` does). Each FederatedTraining gets a daemon, a loop that runs a reconcile pass whenever
one of its Jobs or its spec changes, and every few seconds anyway (round deadlines and Pods stuck
pulling an image change no Job). kopf restarts the daemons of all existing trainings when the
operator starts, and the status holds everything they need: that is what makes restarts safe.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from fedtrain.operator.controller import Controller, Outcome, Wakeups
from fedtrain.operator.jobs import LABEL_MANAGED_BY, LABEL_TRAINING, LABEL_TRAINING_NAMESPACE, MANAGER
from fedtrain.operator.kube import GROUP, PLURAL, VERSION, ApiError, Kube
from fedtrain.operator.profiles import LABEL_PROFILE, PROFILE_GROUP, PROFILE_PLURAL, PROFILE_VERSION

IDLE_TICK = 60.0
PROFILE_NAMESPACE_WAITS = 30  # x 2 s: how long a new profile's namespace may take to appear


def active_tick() -> float:
    """Seconds between passes of a running training when no event comes (``FEDTRAIN_TICK_SECONDS``)."""
    return float(os.environ.get("FEDTRAIN_TICK_SECONDS", "5"))


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Keep kopf's own bookkeeping in annotations (status is ours alone) and build the controller."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING  # the controller posts the Events people read
    settings.watching.server_timeout = 300
    memo.controller = Controller(Kube.from_environment())
    memo.wakeups = Wakeups()
    port = int(os.environ.get("FEDTRAIN_METRICS_PORT", "9090"))  # 0: no metrics server
    if port:
        from prometheus_client import start_http_server

        start_http_server(port)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    """Close the API connection pool."""
    memo.controller.kube.close()


@kopf.daemon(GROUP, VERSION, PLURAL, id="rounds", cancellation_timeout=2.0)
async def drive(namespace: str | None, name: str, stopped: kopf.DaemonStopped, memo: Any,
                logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
    """The training's loop: a pass, then wait for a Job or spec event (or the tick)."""
    assert namespace is not None  # FederatedTrainings are namespaced
    controller: Controller = memo.controller
    wakeups: Wakeups = memo.wakeups
    while not stopped:
        try:
            outcome = await controller.reconcile(namespace, name)
        except ApiError as error:
            logger.warning("reconcile failed, retrying: %s", error)
            outcome = Outcome(active=True)
        if outcome.phase == "Deleting" or (not outcome.active and not outcome.phase):
            wakeups.forget(namespace, name)
            return
        await wakeups.wait(namespace, name, active_tick() if outcome.active else IDLE_TICK)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGER, LABEL_TRAINING: kopf.PRESENT})
def job_changed(namespace: str | None, labels: kopf.Labels, memo: Any, **_: Any) -> None:
    """A worker Job changed: its training decides now (the next Jobs follow within a second).

    A Job in a client's namespace names its training's namespace in a label.
    """
    memo.wakeups.wake(labels.get(LABEL_TRAINING_NAMESPACE) or namespace or "", labels[LABEL_TRAINING])


def _spec_changed(body: kopf.Body, **_: Any) -> bool:
    status = body.get("status") or {}
    return body.metadata.get("generation") != status.get("observedGeneration")


@kopf.on.event(GROUP, VERSION, PLURAL, when=_spec_changed)
def training_changed(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    """A new generation (spec edit: suspend, resume...): decide now, not at the next tick."""
    memo.wakeups.wake(namespace or "", name)


@kopf.on.delete(GROUP, VERSION, PLURAL, id="storage")
async def release(namespace: str | None, name: str, uid: str, spec: kopf.Spec, memo: Any, **_: Any) -> None:
    """Finalizer: delete Jobs in client namespaces and, with ``reclaimPolicy: Delete``, the training's weights."""
    assert namespace is not None
    memo.wakeups.forget(namespace, name)
    if not await memo.controller.release_storage(namespace, name, uid, dict(spec)):
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
            await memo.controller.provision_profile(dict(body))
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
    await memo.controller.repair_profile(labels[LABEL_PROFILE])
