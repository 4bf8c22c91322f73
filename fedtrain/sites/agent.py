"""A site's decisions, shared by ``fedtrain site run`` and the site's operator: what to do with the posted task.

Both runners loop the same way: read ``sites/<site>/task.json`` (`Posting`), ask `plan` what to do,
act (start the worker with `worker_arguments`, stop it, or write `refusal_result` /
`failure_result` where the coordinator reads answers), then keep `next_status`. Everything here is
pure: no I/O, no clock, so each rule is tested on its own and both runners behave alike. The worker
writes the result of a task that succeeded; the runner writes the others. Kept free of torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from fedtrain.contract.errors import EXIT_REFUSED
from fedtrain.contract.sitetask import (
    DELETED,
    ENDED_PHASES,
    REASON_KEPT,
    SECURE_STAGES,
    Posting,
    SiteResult,
    SiteTask,
)
from fedtrain.engine.status import Condition
from fedtrain.sites.participation import ParticipationPhase, ParticipationSpec, ParticipationStatus, SitePolicy
from fedtrain.sites.policy import refusal, total_epsilon
from fedtrain.tasks import s3_environment

FINISHED_PHASES = ENDED_PHASES  # the coordinator's phases after which a site stops polling
# The participation's phase once the training is over, by the coordinator's phase.
END_PHASES: dict[str, ParticipationPhase] = {"Succeeded": "Completed", "Failed": "Failed", DELETED: "Deleted"}
REDACTED = "<site data>"
MAX_REASON = REASON_KEPT
WORKER_COMMAND = "fedtrain-worker"
SECURE_DONE = {"keys": "advertised its keys", "shares": "shared its secrets", "unmask": "revealed its shares"}


@dataclass(frozen=True)
class Idle:
    """Nothing to start: no task, one answered already, one past its deadline, or the training is over."""

    why: str
    finished: bool = False  # the training is over (Succeeded or Failed): stop polling it


@dataclass(frozen=True)
class Wait:
    """The site's task is running: let it run."""

    task_id: str


@dataclass(frozen=True)
class Run:
    """Start the task (its policy accepted it and its deadline has not passed)."""

    task: SiteTask


@dataclass(frozen=True)
class Refuse:
    """Answer the task with a refusal (`refusal_result`) without touching the site's data."""

    task: SiteTask
    reason: str


@dataclass(frozen=True)
class Cancel:
    """Stop the running task: the coordinator withdrew it (another task, none, or the training ended)."""

    task_id: str
    why: str


SiteAction = Idle | Wait | Run | Refuse | Cancel


def plan(posting: Posting | None, site: str, policy: SitePolicy | None, now: float, answered: bool,
         running: str | None, suspended: bool = False) -> SiteAction:
    """What the site does next with ``posting`` (None: nothing posted yet).

    ``answered``: a result for the posted task is in the store already (never run a task twice);
    ``running``: the id of the site's task in progress, if any; ``suspended``: take no new task.
    ``policy``: the participation's ``spec.policy``; None accepts every task (tools and tests).
    """
    task = posting.task if posting is not None else None
    if running is not None:
        if posting is not None and posting.phase in FINISHED_PHASES:
            return Cancel(running, f"the training is {posting.phase}")
        if task is None or task.id != running:
            return Cancel(running, "the coordinator withdrew the task")
        return Wait(running)
    if posting is not None and posting.phase in FINISHED_PHASES:
        return Idle(f"the training is {posting.phase}", finished=True)
    if task is None:
        return Idle("no task posted")
    if answered:
        return Idle(f"task {task.id} is answered")
    if task.site != site:
        return Refuse(task, f"the task is addressed to site {task.site}, but this is site {site}")
    reason = refusal(task, policy) if policy is not None else None
    if reason is not None:
        return Refuse(task, reason)
    if now > task.deadline:
        return Idle(f"task {task.id} is past its deadline")
    if suspended:
        return Idle("suspended (spec.suspend)")
    return Run(task)


def vanished(posting: Posting | None, status: ParticipationStatus) -> Posting | None:
    """The posting to act on: a ``task.json`` that is gone after the site had read one means the training is gone.

    A coordinator that deletes its training with its store folder (``reclaimPolicy: Delete``)
    removes the posting that said so; the site must not wait for it forever.
    """
    if posting is None and status.training_phase is not None:
        return Posting(DELETED, None, "the training's folder is gone from the store")
    return posting


# What is left of a path once its root is replaced: the rest of it up to a space, quote or bracket.
_PATH_TAIL = r"[^\s'\"()\[\]{},;]*"
# Any other path (absolute, or relative with a folder) and any file name of the kinds a data set holds.
_OTHER_PATHS = re.compile(r"(?<![\w.])(?:/|[\w.-]+/)" + _PATH_TAIL)
_FILE_NAMES = re.compile(r"(?<![\w.])[\w.-]+\.(?:ppm|png|jpe?g|bmp|gif|tiff?|csv|txt|npz|npy|json|pkl)\b", re.I)


def redact(text: str, data_paths: Iterable[str]) -> str:
    """``text`` without the site's paths or file names, cut to `MAX_REASON` characters.

    The data paths go with whatever follows them (``<data>/Final_Training/Images/00007/x.ppm`` is
    only `REDACTED`): a relative file name tells the coordinator what the site holds (its classes,
    its tracks). Then any other path and any file name of a data set's kinds go the same way.
    """
    for path in sorted((p.rstrip("/") for p in data_paths if p and p.rstrip("/")), key=len, reverse=True):
        text = re.sub(re.escape(path) + _PATH_TAIL, REDACTED, text)
    text = _OTHER_PATHS.sub(lambda m: m.group(0) if m.group(0) == REDACTED else REDACTED, text)
    return _FILE_NAMES.sub(REDACTED, text)[:MAX_REASON]


def failure_result(task: SiteTask, site: str, exit_code: int | None, reason: str | None,
                   data_paths: Iterable[str]) -> SiteResult:
    """The answer for a task that failed at the site, its reason free of the site's paths."""
    said = redact(reason or "the site's worker failed without a message", data_paths)
    return SiteResult(task=task.id, site=site, state="failed", exit_code=exit_code, reason=said)


def refusal_result(task: SiteTask, site: str, reason: str) -> SiteResult:
    """The answer for a task the site's policy refused (exit code 77, the reason naming the policy field)."""
    return SiteResult(task=task.id, site=site, state="failed", exit_code=EXIT_REFUSED, reason=f"refused: {reason}")


def worker_arguments(task: SiteTask, spec: ParticipationSpec, location: str, data_path: str,
                     secret: SecretFile | None = None) -> list[str]:
    """Arguments after ``fedtrain-worker`` that run ``task`` on the site's data at ``data_path``.

    A secure round's task also names the site's master secret (``secret``), which stays at the site.
    """
    args = ["site-task", "--workdir", location, "--task-json", json.dumps(task.to_json(), sort_keys=True),
            "--data", data_path, "--device", spec.worker.device,
            "--validation-fraction", repr(spec.validation_fraction), "--evaluation-split", spec.evaluation.split]
    if task.secure is not None and secret is not None:
        args += ["--secret-file", secret.path, *(["--secret-provided"] if secret.provided else [])]
    return args


@dataclass(frozen=True)
class SecretFile:
    """Where a site's worker finds the site's secure-aggregation master secret, and whether it is only to be read.

    ``fedtrain site run``: a file of its work directory that the first secure task makes (0600);
    the site operator: the key of a Secret it made once, mounted read-only (``provided``).
    """

    path: str
    provided: bool = False


def storage_environment(spec: ParticipationSpec) -> dict[str, str]:
    """The worker's object-store settings (`S3_ENV`) from ``spec.store.s3`` that are not secret."""
    return s3_environment(spec.store.s3)


def next_status(status: ParticipationStatus, posting: Posting | None, action: SiteAction,
                ended: tuple[SiteTask, SiteResult] | None = None, now: float = 0.0) -> ParticipationStatus:
    """The site's status after one look at the store: what was posted, what `plan` decided, what ended.

    ``ended`` is a task that finished since the last look and its result (the worker's, or the
    site's failure or refusal). ``now`` (unix seconds) stamps changed conditions.
    """
    new = status.model_copy(deep=True)
    if posting is not None:
        new.training_phase = posting.phase
    if ended is not None:
        _record(new, *ended)
    _apply(new, posting, action)
    _conditions(new, now)
    return new


def _record(status: ParticipationStatus, task: SiteTask, result: SiteResult) -> None:
    """Count a finished task: rounds, accuracy and epsilon from a success, the reason from a failure."""
    status.last_task = task.id
    if result.state == "failed":
        refused = result.exit_code == EXIT_REFUSED
        status.phase = "Refused" if refused else "Failed"
        status.message = f"task {task.id} {'refused' if refused else 'failed'}: {result.reason or ''}".strip()
        if refused:
            status.last_refusal = result.reason
        return
    status.phase = "Waiting"
    if task.kind in SECURE_STAGES:
        status.message = f"{SECURE_DONE[task.kind]} for round {task.round} (secure aggregation)"
        return
    if task.kind == "train":
        status.rounds_done += 1
        metrics = result.output.get("metrics") or {}
        accuracy = metrics.get("val_accuracy", metrics.get("accuracy"))
        if task.privacy is not None and task.privacy.noise_multiplier > 0:
            status.epsilon = round(total_epsilon(task.privacy, task.round), 6)
        examples = result.output.get("num_examples")
        status.message = f"trained round {task.round}" + (f" ({examples} examples)" if examples else " (masked)")
    else:
        accuracy = result.output.get("accuracy")
        status.message = f"evaluated the global model of round {task.round}"
    if isinstance(accuracy, (int, float)):
        status.last_accuracy = float(accuracy)


def _apply(status: ParticipationStatus, posting: Posting | None, action: SiteAction) -> None:
    """The phase and message that the decision itself gives."""
    if isinstance(action, Run):
        status.phase = "Evaluating" if action.task.kind == "evaluate" else "Training"
        status.last_task = action.task.id
        status.message = f"running task {action.task.id}"
    elif isinstance(action, Refuse):
        status.phase, status.last_task, status.last_refusal = "Refused", action.task.id, action.reason
        status.message = f"refused task {action.task.id}: {action.reason}"
    elif isinstance(action, Cancel):
        over = posting is not None and posting.phase in FINISHED_PHASES
        status.phase = END_PHASES[posting.phase] if over and posting is not None else "Withdrawn"
        status.message = f"cancelled task {action.task_id}: {action.why}"
    elif isinstance(action, Idle) and action.finished and posting is not None:
        status.phase = END_PHASES[posting.phase]
        status.message = f"the training is {posting.phase}" + (f": {posting.message}" if posting.message else "")
    elif isinstance(action, Idle) and status.phase in ("Training", "Evaluating"):
        status.phase, status.message = "Waiting", action.why


CONDITIONS = ("Participating", "Refused", "Completed", "Ended")


def _conditions(status: ParticipationStatus, now: float) -> None:
    """Kubernetes-style conditions from the phase; a condition's time changes only when its status does.

    Their reason is the phase (``Withdrawn``: the coordinator took back the task that ran), except
    Ended's: ``TrainingSucceeded``, ``TrainingFailed`` or ``TrainingDeleted`` once the training is over.
    """
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    over = status.training_phase in FINISHED_PHASES
    wanted = {"Participating": (status.phase in ("Waiting", "Training", "Evaluating", "Withdrawn"), status.phase),
              "Refused": (status.phase == "Refused", status.phase),
              "Completed": (status.phase == "Completed", status.phase),
              "Ended": (over, f"Training{status.training_phase}" if over else "TrainingRunning")}
    old = {c.type: c for c in status.conditions}
    conditions = []
    for kind in CONDITIONS:
        true, reason = wanted[kind]
        value: Literal["True", "False"] = "True" if true else "False"
        previous = old.get(kind)
        since = previous.last_transition_time if previous is not None and previous.status == value else stamp
        conditions.append(Condition(type=kind, status=value, reason=reason, message=status.message[:MAX_REASON],
                                    last_transition_time=since))
    status.conditions = conditions
