"""The status of a training, what executors observe, and what the engine asks them to do.

`TrainingStatus` is exactly what the custom resource's ``.status`` holds (camelCase) and what the
local runner keeps in ``status.json``: all durable control state, so that any process can resume
from it. Conditions follow Kubernetes conventions (type, status, reason, message,
lastTransitionTime that changes only when the status does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer
from pydantic.alias_generators import to_camel

Phase = Literal["Pending", "Initializing", "Running", "Suspended", "Succeeded", "Failed"]
FINISHED: tuple[Phase, ...] = ("Succeeded", "Failed")  # final: nothing changes a finished training again
TaskState = Literal["pending", "running", "succeeded", "failed", "dropped"]
SecureStage = Literal["keys", "shares", "train", "unmask"]
HISTORY_LIMIT = 100  # rounds kept in status; older ones live in storage and MLflow
# A status is stored in etcd, which refuses large objects, and every kubectl read carries it whole:
# so finished rounds keep their per-client records only while the latest of them together hold at
# most DETAILED_CLIENTS clients; others keep counts and name at most LISTED failures and
# rejections. Only the round in progress keeps every client (the engine needs them).
DETAILED_CLIENTS = 100
LISTED = 10

CONDITION_TYPES = ("Running", "Succeeded", "Failed", "Suspended", "Degraded")  # in the order status lists them


class Reason:
    """Condition and event reasons, as constants."""

    ROUND_COMPLETED = "RoundCompleted"
    TRAINING_COMPLETED = "TrainingCompleted"
    SUSPENDED = "SuspendedBySpec"
    RESUMED = "Resumed"
    CLIENT_FAILED = "ClientFailed"
    CLIENT_RETRIED = "ClientRetried"
    CLIENTS_DROPPED = "StragglersDropped"
    QUORUM_MISSED = "QuorumMissed"
    ROUND_RETRIED = "RoundRetried"
    UPDATES_REJECTED = "UpdatesRejected"
    UPDATES_CAPPED = "UpdatesCapped"  # an update counted with less weight than it claimed (clients.maxWeightOverMedian)
    NON_FINITE_MODEL = "NonFiniteModel"  # the aggregate had NaN or Inf: not written, the round missed its quorum
    SECURE_THRESHOLD = "SecureAggregationThreshold"  # fewer clients than privacy.secureAggregation.threshold survived
    SECURE_ROUND_FAILED = "SecureAggregationFailed"  # the masked sum could not be recovered (shares, range)
    SHARES_REFUSED = "SecureSharesRefused"  # a client refused shares that failed authentication (forged, replayed)
    # The Secret of a secure training's client keys is someone else's, or lacks a client's key (the operator never
    # changes one).
    SECURE_SECRET = "SecureAggregationSecret"
    BAD_INPUT = "BadInput"
    BAD_DATA = "BadData"
    TASK_FAILED = "TaskFailed"
    TASK_RETRIED = "TaskRetried"
    TRACKING_UNAVAILABLE = "TrackingUnavailable"
    CHAMPION_DECIDED = "ChampionDecided"  # finalize promoted the model, or kept the champion, and why
    TASKS_WAITING = "TasksWaiting"
    # Failures the executor finds outside the rounds (the engine records them through `fail`).
    INVALID_SPEC = "InvalidSpec"
    CLIENT_NAMESPACE_NOT_ALLOWED = "ClientNamespaceNotAllowed"
    JOB_REJECTED = "JobRejected"
    FORBIDDEN = "Forbidden"
    API_REJECTED = "ApiRejected"
    # Reported on deletion, when the training's resource is going away.
    STORAGE_NOT_RELEASED = "StorageNotReleased"
    SITES_NOT_TOLD = "SitesNotTold"  # a failed or deleted training's end could not be posted to its sites
    # Remote sites (clients.list[].site).
    SITE_REFUSED = "SiteRefused"
    SITE_EVALUATION_FAILED = "SiteEvaluationFailed"
    ROUND_EVALUATED = "RoundEvaluated"  # the sites' scores of a round's model arrived with the next round's tasks
    SITE_SCORE_OUTLIER = "SiteScoreOutlier"  # a site's accuracy far from the others' (spec.evaluation.outlierDistance)


class StatusModel(BaseModel):
    """camelCase on the wire, mutable in memory."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(StatusModel):
    """One Kubernetes-style condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str = ""


class ClientTask(StatusModel):
    """One selected client's task in the current round."""

    attempt: int = 1
    state: TaskState = "pending"
    exit_code: int | None = None
    reason: str | None = None
    temporary_failures: int = 0  # attempts that ended in a temporary storage failure (not counted as retries)

    @model_serializer(mode="wrap")
    def _without_zero_counters(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave ``temporaryFailures`` out while it is 0: a round may hold a thousand of these."""
        data: dict[str, Any] = handler(self)
        if not self.temporary_failures:
            data.pop("temporaryFailures", None)
            data.pop("temporary_failures", None)
        return data


class RoundCounts(StatusModel):
    """A finished round in numbers: what remains of it when its per-client records are dropped."""

    selected: int = 0
    succeeded: int = 0
    failed: int = 0
    dropped: int = 0
    accepted: int = 0
    rejected: int = 0


class SiteEvaluation(StatusModel):
    """One site's score of a round's global model on its own held-out split (counts and means only)."""

    examples: int
    accuracy: float
    loss: float


class FederatedMetrics(StatusModel):
    """The sites' scores of one global model combined: example-weighted means, worst and best site.

    The status's form of `fedtrain.contract.federated.FederatedScore`, which computes it: the CRD's
    status schema is generated from this model (camelCase, bounded), while the computation stays in
    the contract, where finalize uses it too without the engine.
    """

    accuracy: float
    loss: float
    examples: int
    sites: int
    worst_site: str
    worst_accuracy: float
    best_site: str
    best_accuracy: float
    combination: str = "weighted"  # spec.evaluation.combine when the round was scored
    outliers: list[str] = []  # sites further than spec.evaluation.outlierDistance from the median site


class SecureRound(StatusModel):
    """Secure aggregation's stages of one attempt of a round, and who took part in each, as the coordinator saw it.

    Stages: ``keys`` (each selected client advertises its round keys), ``shares`` (those who advertised
    send encrypted shares of their secrets), ``train`` (those who shared train and upload masked
    updates: the round's ``clients``), ``unmask`` (those who uploaded reveal the shares that remove
    the masks). ``tasks`` are the current key, share or unmask stage's tasks; each later task names
    the set it must use (``advertised``, ``shared``), so every client masks and unmasks against the
    same roster whatever reaches the store late.
    """

    stage: SecureStage = "keys"
    started_at: float | None = None  # of the stage: each stage has spec.roundDeadlineSeconds
    tasks: dict[str, ClientTask] = {}
    advertised: list[str] = []
    shared: list[str] = []
    # Task attempts used by earlier attempts of the round: a retried round's stage tasks take new ids.
    offset: int = 0
    highest: int = 0


class RoundStatus(StatusModel):
    """One round: who was selected, how they did, and what aggregation gave (``counts`` once it finished).

    In a round the sites evaluate, ``evaluations`` holds their evaluation tasks once the aggregation
    has succeeded, ``siteScores`` their figures and ``federated`` the figures combined; the round
    finishes when every evaluation has answered, failed or passed the deadline.
    """

    round: int
    attempt: int = 1
    selected: list[str] = []
    clients: dict[str, ClientTask] = {}
    aggregation: ClientTask | None = None
    # Aggregation attempts spent by earlier attempts of the round: a retried round's aggregation takes
    # a new task id, never the failed one whose observation is still there.
    aggregation_attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    accuracy: float | None = None
    loss: float | None = None
    accepted: list[str] = []
    rejected: dict[str, str] = {}
    counts: RoundCounts | None = None
    evaluations: dict[str, ClientTask] | None = None
    evaluation_started_at: float | None = None
    site_scores: dict[str, SiteEvaluation] = {}
    federated: FederatedMetrics | None = None
    secure: SecureRound | None = None  # privacy.secureAggregation's stages (kept while the round runs)
    # The sites' evaluations of this round's model travel with the next round's training tasks: the round
    # finishes at its aggregation and its federated figures arrive later (every round but the last).
    carried: bool = False

    @property
    def scored(self) -> bool:
        """Whether every site's evaluation of this round's model has answered, failed or been dropped."""
        return all(t.state not in ("pending", "running") for t in (self.evaluations or {}).values())

    def count(self, state: TaskState) -> int:
        """How many selected clients are in ``state``."""
        return sum(1 for task in self.clients.values() if task.state == state)

    def summarize(self, accepted: int, rejected: int) -> None:
        """Record the finished round's counts (before any per-client record is dropped)."""
        self.counts = RoundCounts(selected=len(self.selected), succeeded=self.count("succeeded"),
                                  failed=self.count("failed"), dropped=self.count("dropped"), accepted=accepted,
                                  rejected=rejected)

    def compact(self) -> None:
        """Drop the per-client records of a finished round, keeping its counts and the first failures."""
        lost = {c: t for c, t in sorted(self.clients.items()) if t.state != "succeeded"}
        self.clients = dict(list(lost.items())[:LISTED])
        self.rejected = dict(list(sorted(self.rejected.items()))[:LISTED])
        self.selected, self.accepted = [], []
        if self.evaluations is not None:
            self.evaluations = {s: t for s, t in sorted(self.evaluations.items()) if t.state != "succeeded"}


class TrainingStatus(StatusModel):
    """Everything the engine needs to continue a training, and what users see of it."""

    phase: Phase = "Pending"
    current_round: int = 0
    total_rounds: int = 0
    progress: str = ""  # "3/20": the ROUND column of `kubectl get ft`
    init: ClientTask | None = None
    rounds: list[RoundStatus] = []
    finalize: ClientTask | None = None
    best_round: int | None = None
    best_accuracy: float | None = None
    accuracy: float | None = None  # central accuracy; federated accuracy when evaluation.central is false
    federated_accuracy: float | None = None  # the last federated evaluation's example-weighted accuracy
    federated: FederatedMetrics | None = None  # the last federated evaluation in full
    # Differential privacy (spec.privacy): the budget spent so far, (epsilon, delta) per client.
    privacy_epsilon: float | None = None
    privacy_delta: float | None = None
    # "<namespace>/<name>-<uid8>": the training's folder under the object store's prefix, which sites join.
    training_id: str | None = None
    # The namespace's `fedtrain-defaults` data as the operator read it at the training's first pass ({}: none):
    # kept, so that editing the ConfigMap never moves a running training's storage or MLflow experiment.
    namespace_defaults: dict[str, str] | None = None
    model_uri: str | None = None
    model_version: str | None = None
    champion: bool | None = None  # whether the model version holds the champion alias now
    champion_reason: str | None = None  # why it was promoted or not (a quorum of sites, a better champion...)
    tracking_error: str | None = None
    reason: str | None = None  # why it failed, in one word: QuorumMissed, BadInput, OOMKilled, ImagePullBackOff...
    message: str = ""
    conditions: list[Condition] = []
    observed_generation: int | None = None

    def fork(self) -> TrainingStatus:
        """A copy the engine may change while this one stays as it is, made in a fraction of a deep copy.

        The engine changes tasks in place (init, finalize, the current round's clients and
        aggregation), so those are copied; it only ever replaces the attributes of other rounds and of
        the status itself (compaction, conditions), so a shallow copy of those is enough. With a
        thousand clients a deep copy was most of a decision's time.
        """
        copied = self.model_copy()
        copied.init = self.init.model_copy() if self.init is not None else None
        copied.finalize = self.finalize.model_copy() if self.finalize is not None else None
        copied.rounds = [record.model_copy() for record in self.rounds]
        previous = copied.round(self.current_round - 1)
        if previous is not None and previous.carried and previous.evaluations is not None:
            previous.evaluations = {name: task.model_copy() for name, task in previous.evaluations.items()}
            previous.site_scores = dict(previous.site_scores)
        current = copied.round(self.current_round)
        if current is not None:
            current.clients = {name: task.model_copy() for name, task in current.clients.items()}
            current.aggregation = current.aggregation.model_copy() if current.aggregation is not None else None
            if current.secure is not None:
                current.secure = current.secure.model_copy()
                current.secure.tasks = {name: task.model_copy() for name, task in current.secure.tasks.items()}
            if current.evaluations is not None:
                current.evaluations = {name: task.model_copy() for name, task in current.evaluations.items()}
                current.site_scores = dict(current.site_scores)
        return copied

    def round(self, number: int) -> RoundStatus | None:
        """The record of round ``number``, if it is still in the history."""
        return next((r for r in self.rounds if r.round == number), None)

    def to_json(self) -> dict[str, Any]:
        """CamelCase dict for ``.status`` or ``status.json``."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


@dataclass(frozen=True)
class Task:
    """One unit of work for an executor; ``id`` is unique and deterministic within a training."""

    id: str
    kind: Literal["init", "train", "aggregate", "evaluate", "finalize", "keys", "shares", "unmask"]
    round: int = 0
    client: str | None = None
    attempt: int = 1
    # Secure aggregation: the round attempt that keys are derived for, the clients that advertised keys (the
    # share graph is theirs), that shared (masks are added and removed against them) and whose masked
    # updates count (an unmask, an aggregation).
    round_attempt: int = 1
    advertised: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    survivors: tuple[str, ...] = ()
    revealed: tuple[str, ...] = ()  # an aggregation: whose reveals it reads (their unmask tasks succeeded)


@dataclass(frozen=True)
class Observation:
    """What an executor knows of a task: its state, exit code and (for aggregate/finalize) its JSON output."""

    state: Literal["running", "succeeded", "failed"]
    exit_code: int | None = None
    output: dict[str, Any] | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Launch:
    """Start a task (executors ignore a launch of a task that already exists)."""

    task: Task


@dataclass(frozen=True)
class Cancel:
    """Stop a task that is no longer wanted (a dropped straggler)."""

    task_id: str


@dataclass(frozen=True)
class Event:
    """Something worth telling a person: a Kubernetes Event, a log line locally."""

    reason: str
    message: str
    warning: bool = False


@dataclass
class Decision:
    """The engine's answer: the new status, what to start or stop, and what to report."""

    status: TrainingStatus
    actions: list[Launch | Cancel] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def launches(self) -> list[Task]:
        """The tasks to start."""
        return [a.task for a in self.actions if isinstance(a, Launch)]
