"""The coordinator's side of remote sites: post each site's task into the store, read the sites' answers.

Both executors (the operator and ``fedtrain run``) call `SiteRelay.observe` before the engine
decides and `SiteRelay.publish` after the new status is stored. Publishing is a state sync, not
an action: each site's ``task.json`` is made to say what the stored status says that site should be
doing now (train in the current round, evaluate its global model, nothing, or that the training is
over), so a posting lost to a crash is simply written again on the next pass, a dropped site's task
is withdrawn by the same write, and writing twice changes nothing. The engine's launches and
cancellations of site tasks therefore need no executor of their own.

Observations come from ``sites/<site>/results/<task id>.json``: one GET per site task the engine
waits for, and nothing for tasks already settled. A task the relay has posted and that has no
answer yet is "running"; one it has not posted (a new coordinator process) is not observed, so the
engine asks for it again and the next publish posts it.

An answer is the site's data, never trusted: it is read within `RESULT_LIMIT` bytes and parsed
strictly (`parse_result`, then the output of its task's kind, its example count within what the
spec allows that site). Whatever fails is that one task failing with bad data (exit code 3) and a
reason naming the field; the pass, and the round under its quorum, go on.

After each stored status the relay also records, per finished round with federated evaluation, the
site scores the engine accepted (``round-NNNN/federated.json``): finalize reads those, so that
MLflow and the champion rule see exactly the figures the status shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from fedtrain.contract.errors import EXIT_BAD_DATA, BadDataError, BadInputError
from fedtrain.contract.layout import Layout, sidecar_of
from fedtrain.contract.sitetask import (
    DELETED,
    REASON_KEPT,
    RESULT_LIMIT,
    Posting,
    PrivacySettings,
    ScoresRecord,
    SiteTask,
    TaskKind,
    TrainSettings,
    client_mu,
    encode,
    evaluation_output,
    parse_result,
    secure_train_output,
    stage_output,
    train_output,
)
from fedtrain.contract.storage import Store
from fedtrain.engine.engine import secure_roster, task_id
from fedtrain.engine.status import FINISHED, Observation, RoundStatus, TrainingStatus
from fedtrain.sites.inbox import SecureAssignment, SecureInbox
from fedtrain.spec import FederatedTrainingSpec
from fedtrain.tasks import client_training


def refused(site: str, why: str) -> Observation:
    """A site's answer that is not what its task asks for: the task failed with bad data (not retried)."""
    return Observation("failed", EXIT_BAD_DATA, None, f"{site}'s answer was refused: {why}")


@dataclass(frozen=True)
class Assignment:
    """What one site should be doing now, as the status says (in a secure round, with the roster it must use)."""

    site: str
    kind: TaskKind
    round: int
    attempt: int
    started_at: float
    secure: SecureAssignment | None = None
    evaluate_base: bool = False  # a training that scores the previous round's model first (a carried evaluation)

    @property
    def task_id(self) -> str:
        """The engine's id of the task (the site answers under it)."""
        return task_id(self.kind, self.attempt, self.round, self.site)


def assignments(spec: FederatedTrainingSpec, status: TrainingStatus) -> dict[str, Assignment]:
    """Each site's running task in the current round: a secure stage, training (until aggregation) or evaluation."""
    if status.phase in FINISHED:
        return {}
    current = status.round(status.current_round)
    if current is None or current.finished_at is not None:
        return {}
    found: dict[str, Assignment] = {}
    sites = set(spec.clients.sites())
    secure = current.secure
    if current.aggregation is None and secure is not None and secure.stage != "train":
        for client, task in secure.tasks.items():
            if client in sites and task.state == "running":
                found[client] = Assignment(client, secure.stage, current.round, task.attempt,
                                           secure.started_at or _started(current),
                                           _secure(client, secure.stage, current))
    elif current.aggregation is None:
        carried = _carried(status, current)
        for client, task in current.clients.items():
            if client in sites and task.state == "running":
                found[client] = Assignment(client, "train", current.round, task.attempt, _started(current),
                                           _secure(client, "train", current) if secure is not None else None,
                                           evaluate_base=client in carried)
    previous = status.round(current.round - 1)
    apart = {s: t for s, t in (previous.evaluations or {}).items() if s not in current.clients} \
        if previous is not None and previous.carried else {}  # carried, but the site does not train now
    for record, evaluations in ((previous, apart), (current, current.evaluations or {})):
        for site, task in evaluations.items():
            if task.state == "running" and record is not None:
                found[site] = Assignment(site, "evaluate", record.round, task.attempt,
                                         record.evaluation_started_at or _started(record))
    return found


def _carried(status: TrainingStatus, current: RoundStatus) -> set[str]:
    """Sites whose evaluation of the previous round's model travels with their training task of this round."""
    previous = status.round(current.round - 1)
    if previous is None or not previous.carried:
        return set()
    return {site for site, task in (previous.evaluations or {}).items()
            if task.state in ("pending", "running") and site in current.clients}


def _started(record: RoundStatus) -> float:
    return record.started_at or 0.0


def _secure(site: str, kind: TaskKind, current: RoundStatus) -> SecureAssignment:
    """A site's task of a secure round with the roster the engine gives the round's in-cluster tasks."""
    roster = secure_roster(current)
    return SecureAssignment(site, kind, current.round, roster.get("round_attempt", current.attempt),
                            roster.get("advertised", ()), roster.get("peers", ()), roster.get("survivors", ()))


def posting_message(status: TrainingStatus) -> str:
    """What every site may read of the training's state: that it ended, and in one word why it failed.

    Never the status's message: it names other clients and their reasons, which no site may learn.
    """
    if status.phase == "Succeeded":
        return "the training succeeded"
    if status.phase == "Failed":
        return f"the training failed ({status.reason or 'Failed'})"
    return ""


def train_settings(spec: FederatedTrainingSpec, client: str) -> TrainSettings:
    """spec.training with the client's overrides, as a site trains with them (the same as a local client)."""
    training = spec.training
    epochs, batch, rate = client_training(spec, client)
    mu = client_mu(spec.strategy.name, spec.strategy.parameters)
    return TrainSettings(epochs=epochs, batch_size=batch, optimizer=training.optimizer, learning_rate=rate,
                         momentum=training.momentum, weight_decay=training.weight_decay,
                         scheduler=training.scheduler, restart_epochs=training.restart_epochs, mu=mu,
                         clip_norm=spec.privacy.clip_norm if spec.privacy is not None else None)


def privacy_settings(spec: FederatedTrainingSpec) -> PrivacySettings | None:
    """The training's central DP as a site judges it (the sampling rate is perRound / count)."""
    if spec.privacy is None:
        return None
    return PrivacySettings(spec.privacy.clip_norm, spec.privacy.noise, spec.privacy.delta,
                           spec.clients.round_size / spec.clients.total)


@dataclass
class SiteRelay:
    """Posts tasks for the sites of one training and reads their answers, in the training's store."""

    store: Store
    spec: FederatedTrainingSpec
    training: str  # "<namespace>/<name>", shown to the sites
    identity: str = ""  # what secure aggregation binds keys and messages to (`fedtrain.tasks.secure_identity`)
    layout: Layout = field(default_factory=Layout)
    posted: dict[str, bytes] = field(default_factory=dict)  # site -> the task.json this process wrote last
    checksums: dict[int, str] = field(default_factory=dict)  # round -> sha256 of its global model
    recorded: set[int] = field(default_factory=set)  # rounds whose accepted site scores this process recorded
    relayed: SecureInbox | None = None  # secure rounds' messages, read once (made on first use)
    published: TrainingStatus | None = None  # the status `publish` wrote everything for last

    @property
    def inbox(self) -> SecureInbox:
        """The secure rounds' messages the tasks relay; needs the training's `identity`."""
        if self.relayed is None:
            if not self.identity:
                raise BadInputError("a secure training's relay needs the training's identity to check the sites' "
                                    "messages against")
            self.relayed = SecureInbox(self.store, self.spec, self.identity)
        return self.relayed

    def awaits_answers(self, status: TrainingStatus) -> bool:
        """Whether some site has a task the engine waits for: an answer can arrive at any moment."""
        return bool(assignments(self.spec, status))

    def observe(self, status: TrainingStatus) -> dict[str, Observation]:
        """Observations of the site tasks the engine waits for.

        A site's key that the store refuses to read as data (an object the site encrypted with a key
        of its own, say) is that site's refused answer; refused credentials (`BadInputError`) and a
        store that is down (`TemporaryStorageError`) are the coordinator's problem and propagate.
        """
        observations: dict[str, Observation] = {}
        for site, wanted in assignments(self.spec, status).items():
            ident = wanted.task_id
            key = self.layout.site_result(site, ident)
            try:
                seen = self._answer(wanted, key) if self.store.exists(key) else None
            except BadDataError as error:
                seen = refused(site, str(error))
            if seen is not None:
                observations[ident] = seen
            elif self._posted_id(site) == ident:
                observations[ident] = Observation("running", reason=None)
        return observations

    def _answer(self, wanted: Assignment, key: str) -> Observation:
        """The site's answer read within `RESULT_LIMIT` and parsed strictly; a refusal says which field was wrong."""
        where = self.store.describe(key)
        try:
            result = parse_result(self.store.read_bounded(key, RESULT_LIMIT), where)
            if (result.task, result.site) != (wanted.task_id, wanted.site):
                raise BadDataError(f"{where}: answers task {result.task!r} of site {result.site!r}, not "
                                   f"{wanted.task_id!r} of {wanted.site!r}")
            if result.state == "failed":
                reason = (result.reason or "the site reported a failure")[:REASON_KEPT]  # rounds keep it: bounded
                return Observation("failed", result.exit_code, None, reason)
            output = self._output(wanted, result.output, where)
            refusal = self.inbox.refusal(wanted.secure) if wanted.secure is not None else None
            if refusal is not None:
                return refused(wanted.site, f"its {wanted.kind} stage's message: {refusal}"[:REASON_KEPT])
            return Observation("succeeded", 0, output)
        except BadDataError as error:
            return refused(wanted.site, str(error))
        except BadInputError as error:  # it exists, yet the store refuses to read it (a site's own encryption key)
            return refused(wanted.site, f"{where}: the store refused to read it: {error}")

    def _output(self, wanted: Assignment, output: dict[str, object], where: str) -> dict[str, object]:
        """The output checked for its task's kind: an update's claim, a masked update's, a stage's, or figures."""
        bound = self.spec.clients.max_examples_of(wanted.site)
        what = f"{where}: output"
        if wanted.kind == "evaluate":
            return evaluation_output(output, bound, what).model_dump()
        if wanted.kind == "train":
            return self._training_output(wanted, output, what)
        return stage_output(output, what).model_dump()

    def _training_output(self, wanted: Assignment, output: dict[str, object], what: str) -> dict[str, object]:
        """A training answer checked, its carried evaluation apart: bad figures lose the score, never the update.

        A refused evaluation comes back as ``evaluation_refused`` (the engine fails that evaluation
        with it); a training asked for none carries none.
        """
        figures = output.get("evaluation")
        rest = {k: v for k, v in output.items() if k != "evaluation"}
        checked = (train_output(rest, self.spec.clients.max_examples_of(wanted.site), what) if wanted.secure is None
                   else secure_train_output(rest, what)).model_dump(exclude_none=True)
        if wanted.evaluate_base and figures is not None:
            try:
                if not isinstance(figures, dict):
                    raise BadDataError(f"{what}.evaluation: expected an object, got {type(figures).__name__}")
                bound = self.spec.clients.max_examples_of(wanted.site)
                checked["evaluation"] = evaluation_output(figures, bound, f"{what}.evaluation").model_dump()
            except BadDataError as error:
                checked["evaluation_refused"] = str(error)[:REASON_KEPT]
        return checked

    def _posted_id(self, site: str) -> str | None:
        data = self.posted.get(site)
        if data is None:
            return None
        task = json.loads(data).get("task")
        return str(task["id"]) if isinstance(task, dict) else None

    def publish(self, status: TrainingStatus) -> None:
        """Make every site's ``task.json`` say what the status wants of it (writing only what changed).

        Then record the accepted site scores of rounds that finished their evaluation (`record_scores`).
        A status equal to the one published last changes nothing and is skipped: a coordinator
        waiting on a local store passes many times a second.
        """
        if status == self.published:
            return
        wanted = assignments(self.spec, status)
        if self.relayed is not None:
            self.relayed.forget_before(status.current_round)
        for site in self.spec.clients.sites():
            assignment = wanted.get(site)
            task = self.task(assignment) if assignment is not None else None
            self._post(site, Posting(status.phase, task, posting_message(status)))
        self.record_scores(status)
        self.published = status.model_copy(deep=True)  # only once all of it is written: a failure tries again

    def end(self, message: str = "the coordinator deleted the training") -> None:
        """Tell every site that the training is gone (its resource is being deleted): no task, phase `DELETED`.

        A site cancels what it runs and stops polling; written even where this process posted
        nothing yet, since the sites may have read a posting of an earlier process.
        """
        for site in self.spec.clients.sites():
            self._post(site, Posting(DELETED, None, message))

    def _post(self, site: str, posting: Posting) -> None:
        """Write a site's ``task.json`` unless this process wrote the same bytes last."""
        data = encode(posting)
        if self.posted.get(site) != data:
            self.store.write_bytes(self.layout.site_task(site), data)
            self.posted[site] = data

    def record_scores(self, status: TrainingStatus) -> None:
        """Write ``round-NNNN/federated.json`` once for each finished round the sites evaluated.

        It holds the scores the engine accepted (none, when every site failed or was refused), which
        finalize reads instead of the sites' own files. A new process checks each round once: a
        record lost to a crash between the status and this write is written now.
        """
        for record in status.rounds:
            if (record.finished_at is None or record.evaluations is None or not record.scored
                    or record.round in self.recorded):
                continue
            key = self.layout.federated_scores(record.round)
            if not self.store.exists(key):
                scores = {site: score.model_dump() for site, score in record.site_scores.items()}
                evaluation = self.spec.evaluation
                document = {"round": record.round, "sites": scores, "combine": evaluation.combine,
                            "outlier_distance": evaluation.outlier_distance}
                self.store.write_bytes(key, ScoresRecord.model_validate(document).encode())
            self.recorded.add(record.round)

    def task(self, wanted: Assignment) -> SiteTask:
        """The document for one assignment (a secure round's with its settings, rosters and relayed messages).

        Every task but an evaluation names the model the round trains from; a masked training clips
        when it masks, so its settings carry no clip norm of their own (as an in-cluster client's).
        """
        model_round = wanted.round if wanted.kind == "evaluate" else wanted.round - 1
        key = self.layout.global_weights(model_round)
        train = train_settings(self.spec, wanted.site) if wanted.kind == "train" else None
        secure = self.inbox.settings(wanted.secure) if wanted.secure is not None else None
        if train is not None and secure is not None:
            train = replace(train, clip_norm=None)
        return SiteTask(
            id=wanted.task_id, kind=wanted.kind, round=wanted.round, site=wanted.site, training=self.training,
            total_rounds=self.spec.rounds, strategy=self.spec.strategy.name,
            architecture=self.spec.model.architecture, global_key=key, global_sha256=self.checksum(model_round),
            deadline=wanted.started_at + self.spec.round_deadline_seconds, seed=self.spec.seed, train=train,
            privacy=privacy_settings(self.spec), roi_crop=self.spec.dataset.roi_crop, attempt=wanted.attempt,
            secure=secure, evaluate_base=wanted.evaluate_base)

    def checksum(self, round_number: int) -> str:
        """The sha256 the aggregator recorded for a round's global model (read once per round)."""
        if round_number not in self.checksums:
            key = sidecar_of(self.layout.global_weights(round_number))
            try:
                meta = json.loads(self.store.read_bytes(key))
            except ValueError as error:
                raise BadDataError(f"{self.store.describe(key)}: not valid JSON ({error})") from error
            self.checksums[round_number] = str(meta["sha256"])
        return self.checksums[round_number]
