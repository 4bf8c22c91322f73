"""The round engine: from spec, status and observed task results, the next actions and the new status.

Pure: no I/O, no clock (``now`` is passed in), no randomness but seeded sampling. Both executors
call `decide` after every observation; it is idempotent, so calling it twice with the same inputs
asks for the same tasks again, which executors ignore (Kubernetes answers 409, the local executor
knows its processes). All durable state is in the returned status.

A training goes: init → rounds (clients train, then one aggregation) → finalize. Failures are
sorted by the worker's exit code: bad input or bad data is permanent (retrying cannot help), a
temporary storage failure is retried `TEMPORARY_RETRIES` times on top of the others, any other
failure is retried up to ``clients.maxRetries`` times; rejected updates or too many failed
clients miss the round's quorum, which fails the training or retries the round
(``stragglers.onMissedQuorum``).
"""

from __future__ import annotations

import math
import random
import statistics
from datetime import UTC, datetime
from enum import Enum
from typing import Literal, TypedDict

from fedtrain.contract.errors import (
    EXIT_BAD_DATA,
    EXIT_BAD_INPUT,
    EXIT_CODE_NAMES,
    EXIT_NON_FINITE_MODEL,
    EXIT_REFUSED,
    EXIT_REJECTED_UPDATES,
    EXIT_SECURE_ROUND,
    EXIT_TEMPORARY,
    BadDataError,
)
from fedtrain.contract.federated import FederatedScore, SiteScore, combine
from fedtrain.contract.sitetask import REASON_KEPT, SECURE_STAGES, TASK_LETTERS
from fedtrain.engine.status import (
    CONDITION_TYPES,
    DETAILED_CLIENTS,
    FINISHED,
    HISTORY_LIMIT,
    LISTED,
    Cancel,
    ClientTask,
    Condition,
    Decision,
    Event,
    FederatedMetrics,
    Launch,
    Observation,
    Reason,
    RoundStatus,
    SecureRound,
    SecureStage,
    SiteEvaluation,
    Task,
    TrainingStatus,
)
from fedtrain.spec import FederatedTrainingSpec

PERMANENT_EXIT_CODES = {EXIT_BAD_INPUT: Reason.BAD_INPUT, EXIT_BAD_DATA: Reason.BAD_DATA,
                        EXIT_REFUSED: Reason.SITE_REFUSED}
# A task that exits EXIT_TEMPORARY (its store was down past the worker's own retries) runs again this
# many times without spending clients.maxRetries; after that it is an ordinary failure.
TEMPORARY_RETRIES = 3
# Causes an executor reports that name themselves in the Failed condition's reason. Those in
# PERMANENT_CAUSES are not retried: a wrong image stays wrong.
KNOWN_CAUSES = ("OOMKilled", "DeadlineExceeded", "ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                "CreateContainerConfigError", "CreateContainerError", "Unschedulable")
PERMANENT_CAUSES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError")
# An aggregation that exits with one of these is not run again by itself: its round missed its
# quorum (too few updates survived, or their aggregate was not finite) and stragglers.onMissedQuorum
# decides between retrying the round and failing the training.
ROUND_FAILURES = {EXIT_REJECTED_UPDATES: (Reason.UPDATES_REJECTED, "aggregation rejected the updates"),
                  EXIT_NON_FINITE_MODEL: (Reason.NON_FINITE_MODEL, "aggregation refused a non-finite global model"),
                  EXIT_SECURE_ROUND: (Reason.SECURE_ROUND_FAILED, "secure aggregation could not recover the sum")}
# Secure aggregation's stage tasks: the letter that starts their ids, and what each stage's task does.
SECURE_LETTERS = {stage: TASK_LETTERS[stage] for stage in SECURE_STAGES}
SECURE_DOING = {"keys": "advertising keys", "shares": "sharing secrets", "unmask": "revealing shares"}
MAX_STEPS_PER_DECISION = 10_000
REASON_LENGTH = 80  # of a client failure in a round over DETAILED_CLIENTS (the status must stay small)
SHOWN_DIGITS = 4


def significant(value: float) -> float:
    """``value`` to 4 significant digits, for the status figures people read (printer columns have no format).

    The rounds' records keep full precision.
    """
    return float(f"{value:.{SHOWN_DIGITS}g}")


class Roster(TypedDict, total=False):
    """What a secure round's tasks must agree on (see `Task`): empty for a plain round."""

    round_attempt: int
    advertised: tuple[str, ...]
    peers: tuple[str, ...]
    survivors: tuple[str, ...]
    revealed: tuple[str, ...]


class Progress(Enum):
    """Where a single task stands after looking at its observation."""

    LAUNCH = "launch"
    WAIT = "wait"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def task_id(kind: str, attempt: int, round_number: int = 0, client: str | None = None) -> str:
    """Deterministic task ids: ``init-a1``, ``r0003-client-01-a2``, ``r0003-aggregate-a1``, ``finalize-a1``.

    A site's evaluation of round 3's model is ``e0003-munich-a1``: the letter keeps it apart from any
    training task, whatever the site is called; so do secure aggregation's ``k0003-``, ``s0003-`` and
    ``u0003-`` stages.
    """
    if kind in ("init", "finalize"):
        return f"{kind}-a{attempt}"
    if kind == "evaluate":
        return f"e{round_number:04d}-{client}-a{attempt}"
    if kind in SECURE_LETTERS:  # secure aggregation's k(eys), s(hares) and u(nmask) stages
        return f"{SECURE_LETTERS[kind]}{round_number:04d}-{client}-a{attempt}"
    who = client if kind == "train" else "aggregate"
    return f"r{round_number:04d}-{who}-a{attempt}"


def select_clients(spec: FederatedTrainingSpec, round_number: int) -> list[str]:
    """The clients of a round: a seeded sample of ``perRound``, in the order of the client list."""
    names = spec.clients.names()
    if spec.clients.round_size >= len(names):
        return names
    chosen = set(random.Random(f"{spec.seed}:{round_number}").sample(names, spec.clients.round_size))
    return [n for n in names if n in chosen]


def describe_failure(observation: Observation) -> str:
    """A short reason from an exit code and whatever the executor knew."""
    code = observation.exit_code
    if code is None:  # no process ended (an image that cannot be pulled...): the executor's reason is the whole story
        return observation.reason or "failed"
    detail = f": {observation.reason}" if observation.reason else ""
    return f"exit code {code} ({EXIT_CODE_NAMES.get(code, 'failed')}){detail}"


def cause(task: ClientTask) -> str | None:
    """The specific cause of a failed task, for a condition's reason: BadInput, OOMKilled, ImagePullBackOff..."""
    if task.exit_code in PERMANENT_EXIT_CODES:
        return PERMANENT_EXIT_CODES[task.exit_code or 0]
    detail = task.reason or ""
    return next((known for known in KNOWN_CAUSES if known in detail), None)


def _advance(task: ClientTask, ident: str, observations: dict[str, Observation], max_retries: int) -> Progress:
    """Move one task along from its observation; a failure below the retry limit becomes a new attempt."""
    if task.state == "succeeded":
        return Progress.SUCCEEDED
    if task.state in ("failed", "dropped"):
        return Progress.FAILED
    seen = observations.get(ident)
    if seen is None:
        task.state = "running"
        return Progress.LAUNCH  # not started yet, or lost by its executor: (re)start it
    if seen.state == "running":
        task.state, task.reason = "running", seen.reason  # e.g. why its Pod is not scheduled yet
        return Progress.WAIT
    if seen.state == "succeeded":
        task.state, task.exit_code, task.reason = "succeeded", 0, None
        return Progress.SUCCEEDED
    task.exit_code, task.reason = seen.exit_code, describe_failure(seen)
    if seen.exit_code == EXIT_TEMPORARY and task.temporary_failures < TEMPORARY_RETRIES:
        task.temporary_failures += 1  # the store, not the task, failed: run it again for free
    else:
        permanent = seen.exit_code in PERMANENT_EXIT_CODES or cause(task) in PERMANENT_CAUSES
        counted = task.attempt - task.temporary_failures  # attempts that maxRetries pays for
        if permanent or seen.exit_code in ROUND_FAILURES or counted > max_retries:
            task.state = "failed"
            return Progress.FAILED
    task.attempt += 1
    task.state = "running"
    return Progress.LAUNCH


class _Step:
    """One pass of the state machine over a status being decided; `run` repeats it until nothing moves."""

    def __init__(self, spec: FederatedTrainingSpec, observations: dict[str, Observation], now: float,
                 decision: Decision) -> None:
        self.spec = spec
        self.observations = observations
        self.now = now
        self.decision = decision
        self.status = decision.status

    def launch(self, task: Task) -> None:
        self.decision.actions.append(Launch(task))

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.decision.events.append(Event(reason, message, warning))

    def fail(self, reason: str, message: str) -> bool:
        self.status.phase = "Failed"
        self.status.reason = reason
        self.status.message = message
        self.event(reason, message, warning=True)
        return False

    def run(self) -> None:
        for _ in range(MAX_STEPS_PER_DECISION):
            if self.status.phase in FINISHED or not self.step():
                return

    def step(self) -> bool:
        """Advance by one stage; True when the status moved so that another pass may do more."""
        status = self.status
        if status.init is None and self.held("before it started"):
            return False
        if status.init is None or status.init.state != "succeeded":
            return self.single("init", 0)
        if status.current_round == 0:
            return not self.held("before round 1") and self.start_round(1)
        current = status.round(status.current_round)
        assert current is not None, "the current round is always kept in the history"
        if current.finished_at is None:
            return self.advance_round(current)
        if current.round < self.spec.rounds:
            return not self.held(f"after round {current.round}") and self.start_round(current.round + 1)
        return self.single("finalize", current.round)

    def held(self, where: str) -> bool:
        """At a boundary between stages: True while ``spec.suspend`` holds the training there."""
        status = self.status
        if not self.spec.suspend:
            if status.phase == "Suspended":
                self.event(Reason.RESUMED, f"resumed {where.replace('after', 'from').replace('before', 'at')}")
            return False
        if status.phase != "Suspended":
            status.phase = "Suspended"
            status.message = f"suspended {where} (spec.suspend)"
            self.event(Reason.SUSPENDED, status.message)
        return True

    def single(self, kind: str, round_number: int) -> bool:
        """Init or finalize: one task with retries."""
        status = self.status
        if kind == "init":
            status.phase = "Initializing"
            status.init = status.init or ClientTask()
            task = status.init
        else:
            status.finalize = status.finalize or ClientTask()
            task = status.finalize
        attempt_before = task.attempt
        progress = _advance(task, task_id(kind, task.attempt), self.observations, self.spec.clients.max_retries)
        if progress is Progress.LAUNCH:
            if task.attempt != attempt_before:
                self.event(Reason.TASK_RETRIED, f"{kind} retried after {task.reason}", warning=True)
            self.launch(Task(task_id(kind, task.attempt), kind, round_number, attempt=task.attempt))  # type: ignore[arg-type]
            return False
        if progress is Progress.FAILED:
            return self.fail(cause(task) or Reason.TASK_FAILED, f"{kind} failed: {task.reason}")
        if progress is Progress.SUCCEEDED and kind == "finalize":
            self.finish()
            return False
        return progress is Progress.SUCCEEDED

    def finish(self) -> None:
        status = self.status
        output = self.observations.get(task_id("finalize", status.finalize.attempt if status.finalize else 1))
        details = output.output if output and output.output else {}
        status.model_uri = details.get("model_uri")
        status.model_version = details.get("model_version")
        status.phase = "Succeeded"
        status.message = f"{self.spec.rounds} rounds, best accuracy {status.best_accuracy or 0:.4f}"
        status.tracking_error = details.get("tracking_error")
        champion, why = details.get("champion"), details.get("champion_reason")
        status.champion = champion if isinstance(champion, bool) else None
        status.champion_reason = str(why)[:REASON_KEPT] if why else None
        if status.champion_reason:
            self.event(Reason.CHAMPION_DECIDED, f"model version {status.model_version}: {status.champion_reason}")
        if status.tracking_error:
            self.event(Reason.TRACKING_UNAVAILABLE, f"model not tracked: {details['tracking_error']}", warning=True)
        self.event(Reason.TRAINING_COMPLETED, status.message)

    def start_round(self, number: int) -> bool:
        status = self.status
        selected = select_clients(self.spec, number)
        status.rounds.append(RoundStatus(round=number, selected=selected, started_at=self.now,
                                         clients={c: ClientTask() for c in selected}))
        status.rounds = status.rounds[-HISTORY_LIMIT:]
        status.current_round = number
        status.phase = "Running"
        status.message = f"round {number}/{self.spec.rounds}: {len(selected)} clients training"
        return True

    def advance_round(self, current: RoundStatus) -> bool:
        if current.aggregation is None and self.secure_threshold:
            secure = current.secure or self.start_secure(current)
            if secure.stage != "train":
                return self.advance_secure(current, secure)
        if current.aggregation is None:
            return self.advance_clients(current)
        if current.evaluations is None:
            return self.advance_aggregation(current)
        return self.advance_evaluations(current)

    def advance_clients(self, current: RoundStatus) -> bool:
        for client in current.selected:
            task = current.clients[client]
            attempt_before, state_before = task.attempt, task.state
            ident = task_id("train", task.attempt, current.round, client)
            progress = _advance(task, ident, self.observations, self.spec.clients.max_retries)
            if task.reason and len(current.selected) > DETAILED_CLIENTS:
                task.reason = task.reason[:REASON_LENGTH]
            if progress is Progress.LAUNCH:
                if task.attempt != attempt_before:
                    self.event(Reason.CLIENT_RETRIED, f"round {current.round}: {client} retried after {task.reason}")
                self.launch(Task(task_id("train", task.attempt, current.round, client), "train", current.round,
                                 client, task.attempt, **self.secure_roster(current)))
            elif progress is Progress.FAILED and state_before not in ("failed", "dropped"):
                self.event(Reason.CLIENT_FAILED, f"round {current.round}: {client} failed: {task.reason}",
                           warning=True)
        failed = [c for c in current.selected if current.clients[c].state == "failed"]
        dropped = sum(1 for c in current.selected if current.clients[c].state == "dropped")  # before training
        waiting = [c for c in current.selected if current.clients[c].state in ("pending", "running")]
        quorum = self.spec.clients.quorum
        if len(current.selected) - len(failed) - dropped < quorum:
            reasons = some([f"{c}: {current.clients[c].reason}" for c in failed], "; ")
            causes = {cause(current.clients[c]) for c in failed}
            shared = causes.pop() if len(causes) == 1 else None  # one cause for all: name it in the reason
            return self.missed_quorum(current, f"{len(failed)} of {len(current.selected)} clients failed, "
                                               f"{quorum} must succeed ({reasons})", shared or Reason.QUORUM_MISSED)
        late = current.started_at is not None and self.now - current.started_at > self.spec.round_deadline_seconds
        if waiting and late:
            succeeded = current.count("succeeded")
            if succeeded < quorum:
                return self.missed_quorum(current, f"deadline of {self.spec.round_deadline_seconds}s passed with "
                                                   f"{succeeded} of {quorum} needed clients done")
            for client in waiting:
                self.decision.actions.append(Cancel(task_id("train", current.clients[client].attempt,
                                                            current.round, client)))
                current.clients[client].state = "dropped"
                current.clients[client].reason = "dropped at the round deadline"
            self.event(Reason.CLIENTS_DROPPED, f"round {current.round}: dropped late clients {some(waiting)}",
                       warning=True)
            waiting = []
        carried = self.advance_carried(current)  # the previous model's scores, before this round aggregates
        if waiting or carried:
            return False
        if current.secure is not None:  # the survivors reveal the shares that unmask their sum
            masked = [c for c in current.selected if current.clients[c].state == "succeeded"]
            return self.next_secure_stage(current, current.secure, "unmask", masked)
        current.aggregation = ClientTask(attempt=current.aggregation_attempts + 1)
        return True

    def advance_aggregation(self, current: RoundStatus) -> bool:
        task = current.aggregation
        assert task is not None
        ident = task_id("aggregate", task.attempt, current.round)
        progress = _advance(task, ident, self.observations, self.spec.clients.max_retries)
        if progress is Progress.LAUNCH:
            self.launch(Task(task_id("aggregate", task.attempt, current.round), "aggregate", current.round,
                             attempt=task.attempt, **self.secure_roster(current)))
            return False
        if progress is Progress.WAIT:
            return False
        if progress is Progress.FAILED:
            if task.exit_code in ROUND_FAILURES:
                reason, what = ROUND_FAILURES[task.exit_code or 0]
                return self.missed_quorum(current, f"{what}: {task.reason}", reason)
            reason = PERMANENT_EXIT_CODES.get(task.exit_code or 0, Reason.TASK_FAILED)
            return self.fail(reason, f"round {current.round}: aggregation failed: {task.reason}")
        seen = self.observations.get(ident)
        self.record_result(current, seen.output if seen and seen.output else {})
        if self.spec.evaluates_round(current.round):
            current.evaluations = {site: ClientTask() for site in self.spec.clients.evaluating_sites()}
            current.evaluation_started_at = self.now
            if current.round < self.spec.rounds:  # scored while the next round trains, by the same site tasks
                current.carried = True
                self.complete_round(current)
                return True
            status = self.status
            status.message = f"round {current.round}/{self.spec.rounds}: {len(current.evaluations)} sites evaluating"
            return True
        self.complete_round(current)
        return True

    @property
    def secure_threshold(self) -> int:
        """privacy.secureAggregation.threshold, or 0 when the round's updates are not masked."""
        privacy = self.spec.privacy
        secure = privacy.secure_aggregation if privacy is not None else None
        return secure.threshold if secure is not None else 0

    def secure_roster(self, current: RoundStatus) -> Roster:
        """What a secure round's train, unmask and aggregate tasks must agree on; nothing for a plain round."""
        return secure_roster(current)

    def start_secure(self, current: RoundStatus) -> SecureRound:
        """The first stage of a secure round: every selected client advertises its keys for this attempt."""
        secure = SecureRound(stage="keys")
        current.secure = secure
        self.open_secure_stage(current, secure, "keys", list(current.selected))
        return secure

    def open_secure_stage(self, current: RoundStatus, secure: SecureRound, stage: SecureStage,
                          clients: list[str]) -> None:
        """Give ``clients`` the stage's tasks (new ids past any earlier attempt's) and its own deadline."""
        secure.stage, secure.started_at = stage, self.now
        secure.tasks = {c: ClientTask(attempt=secure.offset + 1) for c in clients}
        self.status.message = (f"round {current.round}/{self.spec.rounds}: {len(clients)} clients "
                               f"{SECURE_DOING[stage]} (secure aggregation)")

    def next_secure_stage(self, current: RoundStatus, secure: SecureRound, stage: SecureStage,
                          survivors: list[str]) -> bool:
        """Move on with the clients that finished the stage before, or miss the round below the threshold or quorum.

        Clients that dropped out are marked so in the round (they neither train nor count); the
        engine tells no one anything else: the next tasks name the roster they must use.
        """
        needed = max(self.secure_threshold, self.spec.clients.quorum)
        if len(survivors) < needed:
            below = len(survivors) < self.secure_threshold
            what = f"threshold {self.secure_threshold}" if below else f"quorum {self.spec.clients.quorum}"
            before = {"train": "sharing secrets", "unmask": "training"}.get(stage, "advertising keys")
            return self.missed_quorum(current, f"secure aggregation: {len(survivors)} of {len(current.selected)} "
                                               f"clients finished {before}, {what} needed",
                                      Reason.SECURE_THRESHOLD if below else Reason.QUORUM_MISSED)
        if stage == "shares":
            secure.advertised = survivors
        elif stage == "train":
            secure.shared = survivors
            for client in current.selected:
                if client not in survivors:
                    current.clients[client].state = "dropped"
                    current.clients[client].reason = "dropped before training: its keys or shares did not arrive"
            secure.stage, secure.tasks = "train", {}
            current.started_at = self.now  # training has the whole deadline, as in a plain round
            self.status.message = (f"round {current.round}/{self.spec.rounds}: {len(survivors)} clients training "
                                   "(secure aggregation)")
            return True
        self.open_secure_stage(current, secure, stage, survivors)
        return True

    def advance_secure(self, current: RoundStatus, secure: SecureRound) -> bool:
        """A key, share or unmask stage: each client's task with retries, then the next stage with who finished."""
        stage = secure.stage
        roster = self.secure_roster(current)
        for client in list(secure.tasks):
            task = secure.tasks[client]
            before = task.state
            progress = _advance(task, task_id(stage, task.attempt, current.round, client), self.observations,
                                self.spec.clients.max_retries)
            secure.highest = max(secure.highest, task.attempt)
            if progress is Progress.LAUNCH:
                self.launch(Task(task_id(stage, task.attempt, current.round, client), stage, current.round,
                                 client, task.attempt, **roster))
            elif progress is Progress.FAILED and before != "failed":
                self.event(Reason.CLIENT_FAILED, f"round {current.round}: {client} failed {SECURE_DOING[stage]}: "
                                                 f"{task.reason}", warning=True)
            elif progress is Progress.SUCCEEDED and before != "succeeded" and stage == "unmask":
                self.name_refused_shares(current.round, client, task_id(stage, task.attempt, current.round, client))
        waiting = [c for c, t in secure.tasks.items() if t.state in ("pending", "running")]
        late = secure.started_at is not None and self.now - secure.started_at > self.spec.round_deadline_seconds
        if waiting and late:
            for client in waiting:
                task = secure.tasks[client]
                self.decision.actions.append(Cancel(task_id(stage, task.attempt, current.round, client)))
                task.state, task.reason = "dropped", "dropped at the round deadline"
            self.event(Reason.CLIENTS_DROPPED, f"round {current.round}: dropped late clients {some(waiting)} while "
                                               f"{SECURE_DOING[stage]}", warning=True)
            waiting = []
        if waiting:
            return False
        finished = [c for c, t in secure.tasks.items() if t.state == "succeeded"]
        if stage == "unmask":
            return self.unmasked(current, secure, finished)
        return self.next_secure_stage(current, secure, "shares" if stage == "keys" else "train", finished)

    def name_refused_shares(self, round_number: int, client: str, ident: str) -> None:
        """A Warning Event naming the senders whose shares ``client`` refused to open (forged, altered, replayed).

        The unmasking goes on without them while the other shares reach the threshold; a sender
        named here by several clients sent shares that were not its own, or someone altered them.
        """
        seen = self.observations.get(ident)
        refused = (seen.output or {}).get("refused") if seen is not None else None
        if isinstance(refused, dict) and refused:
            named = [f"{sender}'s ({str(why)[:200]})" for sender, why in sorted(refused.items())]
            self.event(Reason.SHARES_REFUSED, f"round {round_number}: {client} refused the shares of "
                                              f"{some(named, '; ')}", warning=True)

    def unmasked(self, current: RoundStatus, secure: SecureRound, revealed: list[str]) -> bool:
        """The survivors revealed their shares: aggregate the masked sum (its task checks each secret's shares)."""
        if len(revealed) < self.secure_threshold:
            return self.missed_quorum(current, f"secure aggregation: {len(revealed)} of {len(secure.tasks)} "
                                               f"surviving clients revealed their shares, threshold "
                                               f"{self.secure_threshold} needed", Reason.SECURE_THRESHOLD)
        current.aggregation = ClientTask(attempt=current.aggregation_attempts + 1)
        return True

    def advance_evaluations(self, current: RoundStatus) -> bool:
        """The sites score the round's global model; the round completes when each answered or the deadline passed.

        A site that fails or stays silent is left out of the federated figures: it never fails the
        training (its model is already aggregated), but it is named in an Event.
        """
        evaluations = current.evaluations
        assert evaluations is not None
        for site in sorted(evaluations):
            self.evaluate_apart(current, site)
        if self.open_evaluations(current, current.evaluation_started_at or self.now):
            return False
        self.score(current)
        self.complete_round(current)
        return True

    def evaluate_apart(self, record: RoundStatus, site: str) -> None:
        """One site's evaluation task of ``record``'s model (its own task, not travelling with a training)."""
        task = (record.evaluations or {})[site]
        before = task.state
        ident = task_id("evaluate", task.attempt, record.round, site)
        progress = _advance(task, ident, self.observations, self.spec.clients.max_retries)
        if progress is Progress.LAUNCH:
            self.launch(Task(task_id("evaluate", task.attempt, record.round, site), "evaluate", record.round,
                             site, task.attempt))
        elif progress is Progress.SUCCEEDED and before != "succeeded":
            seen = self.observations.get(ident)
            self.take_score(record, site, seen.output if seen and seen.output else {})
        self.tell_failure(record, site, before)

    def take_score(self, record: RoundStatus, site: str, output: dict[str, object]) -> None:
        """Keep a site's figures, or fail its evaluation with why they were refused."""
        task = (record.evaluations or {})[site]
        try:
            score = SiteScore.from_output(output, self.spec.clients.max_examples_of(site), f"{site}'s evaluation")
        except BadDataError as error:  # executors check answers too; the engine never trusts one unchecked
            task.state, task.exit_code, task.reason = "failed", EXIT_BAD_DATA, f"score refused: {error}"
        else:
            task.state = "succeeded"
            record.site_scores[site] = SiteEvaluation(examples=score.examples, accuracy=score.accuracy,
                                                      loss=score.loss)

    def tell_failure(self, record: RoundStatus, site: str, before: str) -> None:
        """A Warning Event the first time a site's evaluation fails: it is left out of the figures, not retried."""
        task = (record.evaluations or {})[site]
        if task.state == "failed" and before != "failed":
            self.event(Reason.SITE_EVALUATION_FAILED, f"round {record.round}: {site} did not evaluate: "
                                                      f"{task.reason}", warning=True)

    def open_evaluations(self, record: RoundStatus, started: float, exempt: set[str] | None = None) -> bool:
        """Whether some of ``record``'s evaluations are still out; past the deadline their tasks are dropped.

        ``exempt``: sites whose evaluation travels with a training task, which settles it (in time or not).
        """
        evaluations = record.evaluations or {}
        waiting = [s for s, t in sorted(evaluations.items()) if t.state in ("pending", "running")]
        late = [s for s in waiting if s not in (exempt or set())]
        if late and self.now - started > self.spec.round_deadline_seconds:
            for site in late:
                self.decision.actions.append(Cancel(task_id("evaluate", evaluations[site].attempt, record.round,
                                                            site)))
                evaluations[site].state, evaluations[site].reason = "dropped", "dropped at the round deadline"
            self.event(Reason.CLIENTS_DROPPED, f"round {record.round}: evaluation deadline passed without "
                                               f"{some(late)}", warning=True)
            waiting = [s for s in waiting if s not in late]
        return bool(waiting)

    def score(self, record: RoundStatus) -> None:
        """Combine the sites' accepted figures of ``record``'s model, naming outliers."""
        scores = {s: SiteScore(e.examples, e.accuracy, e.loss) for s, e in record.site_scores.items()}
        evaluation = self.spec.evaluation
        combined = combine(scores, evaluation.combine, evaluation.outlier_distance)
        if combined is not None:
            record.federated = FederatedMetrics(**vars(combined))
            self.name_outliers(record.round, combined, scores)

    def carried_by_training(self, record: RoundStatus) -> set[str]:
        """The sites whose evaluation of ``record``'s model travels with their training task of the next round."""
        following = self.status.round(record.round + 1)
        return set(following.clients) & set(record.evaluations or {}) if following is not None else set()

    def advance_carried(self, current: RoundStatus) -> bool:
        """The previous round's evaluations, carried by this round: True while some are still out.

        A site that trains in this round evaluates the global model it trains from (the previous
        round's) in the same task, so its figures arrive with its training answer; a site that does
        not train now evaluates in a task of its own. The previous round's record gets the figures
        and the combined score, as if it had waited for them.
        """
        previous = self.status.round(current.round - 1)
        if previous is None or not previous.carried or previous.evaluations is None or previous.scored:
            return False
        training = self.carried_by_training(previous)
        for site in sorted(previous.evaluations):
            task = previous.evaluations[site]
            if task.state in ("pending", "running"):
                if site in training:
                    self.carried_with(previous, current, site)
                else:
                    self.evaluate_apart(previous, site)
        # Those carried by a training follow it (its deadline, its retries); the others have this round's time.
        started = max(previous.evaluation_started_at or 0.0, current.started_at or self.now)
        if self.open_evaluations(previous, started, training):
            return True
        self.score(previous)
        self.tell_scored(previous)
        return False

    def carried_with(self, previous: RoundStatus, current: RoundStatus, site: str) -> None:
        """A site's evaluation of the previous model, read from its training answer of this round."""
        task, training = (previous.evaluations or {})[site], current.clients[site]
        before = task.state
        task.attempt = training.attempt
        if training.state in ("failed", "dropped"):
            task.state, task.exit_code = training.state, training.exit_code
            task.reason = f"its training task, which carried the evaluation, {training.state}: {training.reason}"
        elif training.state == "succeeded":
            seen = self.observations.get(task_id("train", training.attempt, current.round, site))
            output = seen.output if seen is not None and seen.output else {}
            figures, refused = output.get("evaluation"), output.get("evaluation_refused")
            if isinstance(figures, dict):
                self.take_score(previous, site, figures)
            else:
                task.state, task.exit_code = "failed", EXIT_BAD_DATA
                task.reason = (f"score refused: {str(refused)[:REASON_KEPT]}" if refused else
                               f"its training answer has no evaluation of round {previous.round}'s model")
        else:
            task.state = "running"
        self.tell_failure(previous, site, before)

    def tell_scored(self, record: RoundStatus) -> None:
        """The carried figures reach the status (and its headline, without central evaluation), and people."""
        federated = record.federated
        if federated is None:
            self.event(Reason.ROUND_EVALUATED, f"round {record.round}: no site's evaluation was accepted",
                       warning=True)
            return
        self.apply_federated(record)
        self.event(Reason.ROUND_EVALUATED, f"round {record.round}: federated accuracy {federated.accuracy:.4f} "
                                           f"over {federated.sites} sites (worst {federated.worst_site} "
                                           f"{federated.worst_accuracy:.4f})")

    def apply_federated(self, record: RoundStatus) -> None:
        """A round's federated figures become the status's (the headline too when nothing is scored centrally)."""
        status, federated = self.status, record.federated
        if federated is None:
            return
        status.federated = federated.model_copy()
        status.federated_accuracy = significant(federated.accuracy)
        if not self.spec.evaluation.central:
            self.headline(record.round, federated.accuracy)

    def headline(self, round_number: int, accuracy: float) -> None:
        """The figure ``kubectl get ft`` shows, and the best round by it."""
        status = self.status
        status.accuracy = significant(accuracy)
        if status.best_accuracy is None or accuracy > status.best_accuracy:
            status.best_accuracy, status.best_round = significant(accuracy), round_number

    def name_outliers(self, round_number: int, combined: FederatedScore, scores: dict[str, SiteScore]) -> None:
        """A Warning Event for the sites whose accuracy is far from the median site's (see `federated.outliers`)."""
        if not combined.outliers:
            return
        median = statistics.median(s.accuracy for s in scores.values())
        far = [f"{site} {significant(scores[site].accuracy)}" for site in combined.outliers]
        self.event(Reason.SITE_SCORE_OUTLIER, f"round {round_number}: accuracy further than "
                                              f"{self.spec.evaluation.outlier_distance:g} from the sites' median "
                                              f"{significant(median)}: {some(far)}", warning=True)

    def record_result(self, current: RoundStatus, output: dict[str, object]) -> None:
        """What the aggregation reported: central scores (if any), accepted, rejected and capped updates, privacy."""
        status = self.status
        current.accuracy = _finite(output.get("accuracy"))
        current.loss = _finite(output.get("loss"))
        accepted = output.get("accepted")
        current.accepted = [str(c) for c in accepted] if isinstance(accepted, list) else []
        rejected = output.get("rejected")
        rejected = rejected if isinstance(rejected, dict) else {}
        current.rejected = {str(k): str(v)[:200] for k, v in sorted(rejected.items())[:DETAILED_CLIENTS]}
        current.summarize(_counted(output, "accepted_count", len(current.accepted)),
                          _counted(output, "rejected_count", len(rejected)))
        spent, delta = _finite(output.get("epsilon")), _finite(output.get("dp_delta"))
        if spent is not None and delta is not None:
            status.privacy_epsilon, status.privacy_delta = significant(spent), delta
        if current.rejected:
            self.event(Reason.UPDATES_REJECTED, f"round {current.round}: " + some(
                [f"{c}: {r}" for c, r in current.rejected.items()], "; "), warning=True)
        capped = output.get("capped")
        if isinstance(capped, dict) and capped:
            self.event(Reason.UPDATES_CAPPED, f"round {current.round}: " + some(
                [f"{c}: {str(r)[:200]}" for c, r in sorted(capped.items())], "; "), warning=True)

    def complete_round(self, current: RoundStatus) -> None:
        """The round is done: its figures reach the status, the history is compacted, people are told."""
        status = self.status
        current.finished_at = self.now
        current.secure = None  # its rosters served the round; its counts say who took part
        compact_history(status.rounds)
        federated = current.federated
        self.apply_federated(current)
        if self.spec.evaluation.central:
            if current.accuracy is not None:
                self.headline(current.round, current.accuracy)
            else:
                status.accuracy = None
        shown = f"{current.accuracy:.4f}" if current.accuracy is not None else "n/a"
        counts = current.counts
        assert counts is not None
        sites = ", federated evaluation travels with the next round's training" if current.carried else ""
        if federated is not None:
            sites = (f", federated accuracy {federated.accuracy:.4f} over {federated.sites} sites (worst "
                     f"{federated.worst_site} {federated.worst_accuracy:.4f})")
        self.event(Reason.ROUND_COMPLETED, f"round {current.round}/{self.spec.rounds}: accuracy {shown}{sites}, "
                                           f"{counts.accepted} updates accepted, {counts.rejected} rejected, "
                                           f"{counts.dropped + counts.failed} clients dropped or failed")

    def missed_quorum(self, current: RoundStatus, why: str, reason: str = Reason.QUORUM_MISSED) -> bool:
        for client in current.selected:
            task = current.clients[client]
            if task.state == "running":
                self.decision.actions.append(Cancel(task_id("train", task.attempt, current.round, client)))
        secure = current.secure
        if secure is not None and secure.stage != "train":
            for client, task in secure.tasks.items():
                if task.state == "running":
                    self.decision.actions.append(Cancel(task_id(secure.stage, task.attempt, current.round, client)))
        retries = self.spec.stragglers
        if retries.on_missed_quorum == "retry" and current.attempt <= retries.max_round_retries:
            current.attempt += 1
            current.started_at = self.now
            if current.aggregation is not None:
                current.aggregation_attempts = current.aggregation.attempt
            current.aggregation = None
            if secure is not None:  # a new attempt of the round: new keys, new stage tasks
                current.secure = SecureRound(offset=secure.highest, highest=secure.highest)
                self.open_secure_stage(current, current.secure, "keys", list(current.selected))
            for client in current.selected:
                task = current.clients[client]
                current.clients[client] = ClientTask(attempt=task.attempt + 1)
            self.event(Reason.ROUND_RETRIED, f"round {current.round} retried (attempt {current.attempt}): {why}",
                       warning=True)
            return True
        return self.fail(reason, f"round {current.round}: {why}")


def secure_roster(current: RoundStatus) -> Roster:
    """What a secure round's tasks must agree on now: the round attempt, who advertised, shared and survived.

    Nothing for a plain round. The relay posts the same roster to remote sites that the engine's
    tasks carry to in-cluster clients.
    """
    secure = current.secure
    if secure is None:
        return {}
    survivors = tuple(c for c in current.selected if current.clients[c].state == "succeeded")
    unmasking = secure.stage == "unmask"
    revealed = tuple(c for c, t in sorted(secure.tasks.items()) if t.state == "succeeded") if unmasking else ()
    return Roster(round_attempt=current.attempt, advertised=tuple(secure.advertised), peers=tuple(secure.shared),
                  survivors=survivors if unmasking else (), revealed=revealed)


def some(items: list[str], separator: str = ", ") -> str:
    """The first `LISTED` items joined, and how many more: messages stay short with a thousand clients."""
    more = f"{separator}and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return separator.join(items[:LISTED]) + more


def _finite(value: object) -> float | None:
    """A number for the status, or None: NaN or infinity would make the API server refuse the whole status."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int past float's range
        return None
    return number if math.isfinite(number) else None


def _counted(output: dict[str, object], key: str, listed: int) -> int:
    """A count the worker reports when its list was too long for the termination message, else the list's size."""
    value = output.get(key)
    return value if isinstance(value, int) and value >= listed else listed


def compact_history(rounds: list[RoundStatus]) -> None:
    """Keep the status small whatever the number of clients (see `DETAILED_CLIENTS`).

    Newest first, finished rounds keep their per-client records while they fit the budget; every
    older one is compacted to its counts.
    """
    budget = DETAILED_CLIENTS
    for record in reversed(rounds):
        if record.finished_at is None:
            continue
        if record.counts is None:  # recorded before rounds had counts
            record.summarize(len(record.accepted), len(record.rejected))
        budget -= len(record.selected)
        if budget < 0:
            record.compact()


def decide(spec: FederatedTrainingSpec, status: TrainingStatus, observations: dict[str, Observation], now: float,
           generation: int | None = None) -> Decision:
    """The next actions and the new status; ``status`` itself is not modified."""
    decision = Decision(status.fork())
    if decision.status.phase in FINISHED:
        return decision  # final: a finished training is never judged again
    decision.status.total_rounds = spec.rounds
    if generation is not None:
        decision.status.observed_generation = generation
    _Step(spec, observations, now, decision).run()
    decision.status.progress = f"{rounds_completed(decision.status)}/{spec.rounds}"
    update_conditions(decision.status, now)
    return decision


def fail(status: TrainingStatus, reason: str, message: str, now: float, generation: int | None = None) -> Decision:
    """Fail a training for a cause the executor found outside the rounds, and stop what still runs.

    A spec the cluster cannot run, a client namespace that withdrew its consent, a request the API
    server refuses for good: these end the training as a round failure does, with the same status
    writer, metrics and Event. A finished training is left as it is.
    """
    decision = Decision(status.fork())
    failed = decision.status
    if failed.phase in FINISHED:
        return decision
    if generation is not None:
        failed.observed_generation = generation
    decision.actions.extend(Cancel(ident) for ident in running_task_ids(failed))
    failed.phase, failed.reason, failed.message = "Failed", reason, message
    decision.events.append(Event(reason, message, warning=True))
    update_conditions(failed, now)
    return decision


def running_task_ids(status: TrainingStatus) -> list[str]:
    """The ids of the tasks that may still be running: init, the current round's, finalize."""
    running: list[str] = []
    if status.init is not None and status.init.state == "running":
        running.append(task_id("init", status.init.attempt))
    current = status.round(status.current_round)
    if current is not None:
        running += [task_id("train", task.attempt, current.round, client)
                    for client, task in current.clients.items() if task.state == "running"]
        if current.aggregation is not None and current.aggregation.state == "running":
            running.append(task_id("aggregate", current.aggregation.attempt, current.round))
        running += [task_id("evaluate", task.attempt, current.round, site)
                    for site, task in (current.evaluations or {}).items() if task.state == "running"]
        if current.secure is not None and current.secure.stage != "train":
            running += [task_id(current.secure.stage, task.attempt, current.round, client)
                        for client, task in current.secure.tasks.items() if task.state == "running"]
        previous = status.round(current.round - 1)
        if previous is not None and previous.carried:  # evaluations of its model in tasks of their own
            running += [task_id("evaluate", task.attempt, previous.round, site)
                        for site, task in (previous.evaluations or {}).items()
                        if task.state == "running" and site not in current.clients]
    if status.finalize is not None and status.finalize.state == "running":
        running.append(task_id("finalize", status.finalize.attempt))
    return running


def rounds_completed(status: TrainingStatus) -> int:
    """The current round if it has been aggregated, else the one before."""
    current = status.round(status.current_round)
    finished = current is not None and current.finished_at is not None
    return status.current_round if finished else max(status.current_round - 1, 0)


def update_conditions(status: TrainingStatus, now: float) -> None:
    """Derive the conditions from the phase; a condition's transition time changes only with its status."""
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    wanted = {
        "Running": (status.phase in ("Initializing", "Running"), status.phase),
        "Succeeded": (status.phase == "Succeeded", Reason.TRAINING_COMPLETED if status.phase == "Succeeded"
                      else status.phase),
        "Failed": (status.phase == "Failed", (status.reason or "Failed") if status.phase == "Failed" else status.phase),
        "Suspended": (status.phase == "Suspended", Reason.SUSPENDED if status.phase == "Suspended" else status.phase),
    }
    current = {c.type: c for c in status.conditions}
    degraded = _degradation(status)
    wanted["Degraded"] = (degraded is not None, degraded[0] if degraded else "AsExpected")
    for kind, (true, reason) in wanted.items():
        value: Literal["True", "False"] = "True" if true else "False"
        previous = current.get(kind)
        since = previous.last_transition_time if previous is not None and previous.status == value else stamp
        message = (degraded[1] if degraded else "") if kind == "Degraded" else status.message
        current[kind] = Condition(type=kind, status=value, reason=reason, message=message,
                                  last_transition_time=since)
    status.conditions = [current[k] for k in CONDITION_TYPES]


def _degradation(status: TrainingStatus) -> tuple[str, str] | None:
    """Degraded: the last round lost clients or updates, though the training goes on."""
    if status.tracking_error:
        return Reason.TRACKING_UNAVAILABLE, f"training done, but not tracked: {status.tracking_error}"
    last = status.round(status.current_round)
    if last is None:
        return None
    waiting = [f"{c}: {t.reason}" for c, t in last.clients.items() if t.state == "running" and t.reason]
    if waiting:
        return Reason.TASKS_WAITING, f"round {last.round}: " + some(waiting, "; ")
    lost = [c for c, t in last.clients.items() if t.state in ("failed", "dropped")]
    if lost:
        return Reason.CLIENT_FAILED, f"round {last.round}: {some(lost)} failed or dropped"
    if last.rejected:
        return Reason.UPDATES_REJECTED, f"round {last.round}: updates of {some(list(last.rejected))} rejected"
    return None
