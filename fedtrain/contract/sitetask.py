"""What a coordinator asks of a site, and what the site answers: two small JSON documents in the store.

The coordinator writes a site's current task to ``sites/<site>/task.json`` (`Layout.site_task`);
the site answers in ``sites/<site>/results/<task id>.json``. Nothing else crosses between the
organisations but the global models and the site's update. A task carries everything the site's
policy judges (strategy, architecture, rounds, epochs, privacy) and everything its worker needs
(which global model, with its sha256, and the training settings), plus a sha256 of itself: a task
that was cut short or altered in the store is refused, as is a global model whose bytes differ
from the digest the coordinator vouched for.

Everything a site writes is untrusted: each object the coordinator (or its workers) reads from a
site's folder has a size limit here (`RESULT_LIMIT`, `EVALUATION_LIMIT`, `SIDECAR_LIMIT`,
`UPDATE_HEADER_LIMIT`), is read with that bound (`Store.read_bounded`), and is parsed into a strict
typed model (types, ranges, finite numbers, names matching their patterns). What does not parse
is one refused answer with a reason that names the field, never an exception in a pass.

Kept free of torch and numpy: the operator and the local runner build and read these documents.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from fedtrain.contract.errors import BadDataError
from fedtrain.contract.secmessages import MAX_SHARE_SET, Advertisement, Name, SharesMessage
from fedtrain.contract.wire import MAX_ATTEMPT as MAX_ATTEMPT
from fedtrain.contract.wire import MAX_ROUND as MAX_ROUND
from fedtrain.contract.wire import NAME_PATTERN as NAME_PATTERN
from fedtrain.contract.wire import SHA256_PATTERN as SHA256_PATTERN
from fedtrain.contract.wire import problems as problems
from fedtrain.contract.wire import showable

# 2: a task carries its attempt, an update is update-a<attempt>.safetensors, a task is parsed strictly.
# 3: secure aggregation's stages are site tasks (keys, shares, unmask) and a secure round's tasks carry a
# `secure` block, which a site of version 2 would refuse as an unknown field; a training task may ask the
# site to score the model it trains from first (`evaluate_base`: the previous round's federated evaluation).
# A document of another version is refused before its fields are read, naming the side to upgrade.
PROTOCOL_VERSION = 3
TaskKind = Literal["train", "evaluate", "keys", "shares", "unmask"]
SECURE_STAGES: tuple[TaskKind, ...] = ("keys", "shares", "unmask")  # secure aggregation's stages besides training
# The letter that starts a task's id, by its kind (the engine's `task_id`): r0003-munich-a1, k0003-munich-a1.
TASK_LETTERS: dict[str, str] = {"train": "r", "evaluate": "e", "keys": "k", "shares": "s", "unmask": "u"}
ResultState = Literal["succeeded", "failed"]

# Size limits, in bytes, of what a site writes and the coordinator's side reads; larger is refused unread.
# sites/<site>/task.json, which the coordinator writes: a task, and in a secure round the messages it relays
POSTING_LIMIT = 8 * 1024 * 1024
RESULT_LIMIT = 64 * 1024  # sites/<site>/results/<task id>.json: a state, a reason, a few figures
EVALUATION_LIMIT = 256 * 1024  # sites/<site>/round-N/evaluation.json: per-class counts for up to 1000 classes
SIDECAR_LIMIT = 1024 * 1024  # any weights file's .json sidecar (a site's update's included)
UPDATE_HEADER_LIMIT = 1024 * 1024  # what an update may hold beyond its model's tensors (its safetensors header)
REASON_LIMIT = 4096  # characters of the reason a failed answer gives (a termination message's size)
REASON_KEPT = 500  # what a status keeps of a reason: a site's failure, the champion decision
# A site's free text: bounded, then `showable` (kept as text, never acting on a terminal or a reader).
Reason = Annotated[str, Field(max_length=REASON_LIMIT), AfterValidator(showable)]
ShortReason = Annotated[str, Field(max_length=REASON_KEPT), AfterValidator(showable)]
METRICS_LIMIT = 64  # entries of an update's metrics
# A mean loss past this is no model's (cross-entropy of a diverged one is in the tens); the bound also keeps
# loss x examples, summed over the sites, finite, so a combined score never becomes Infinity in a status.
LOSS_LIMIT = 1e6
# Example counts: no count a site (or any client) claims is believed past what the coordinator declares
# (spec.clients.maxExamples, per client clients.list[].maxExamples), and never past EXAMPLES_LIMIT.
EXAMPLES_LIMIT = 2**31 - 1
DEFAULT_MAX_EXAMPLES = 1_000_000
# An accepted update weighs at most this multiple of the median count of the round's accepted updates (three or
# more) in an example-weighted mean (spec.clients.maxWeightOverMedian): a count within maxExamples can still be
# a thousand times the honest sites'.
DEFAULT_MAX_WEIGHT_OVER_MEDIAN = 10.0
TASK_ID_PATTERN = r"^[a-z0-9][-a-z0-9]{0,127}$"  # the engine's task ids: r0003-munich-a1, e0003-munich-a1
MASKED_LENGTH_LIMIT = 2**31 - 1  # elements of a masked vector: one per model value, and the weight
METRIC_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
GLOBAL_KEY_PATTERN = r"^round-[0-9]{4,5}/global\.safetensors$"  # the only keys a task may name (Layout.global_weights)
CHOICE_PATTERN = r"^[a-z0-9_]{1,63}$"  # strategy, architecture, optimizer and scheduler names

# What a posted task's fields must be before anything uses them in a key, a Job name or a path.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Choice = Annotated[str, Field(pattern=CHOICE_PATTERN)]


# How the coordinator combines the sites' scores of one model (spec.evaluation.combine, `federated.combine`).
Combination = Literal["weighted", "median", "trimmed"]
# A site whose accuracy is further than this from the median of the sites' (three or more) is named
# an outlier (spec.evaluation.outlierDistance).
DEFAULT_OUTLIER_DISTANCE = 0.2
# Strategies that read each update (a median, a trimmed mean, distances between updates): secure aggregation
# shows the aggregator only the sum, so the spec refuses them with it; the others act on the weighted mean.
PER_UPDATE_STRATEGIES = ("fedmedian", "trimmedmean", "krum", "multikrum")
SUM_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")
FEDPROX_MU = 0.01  # FedProx's proximal strength when spec.strategy.parameters names no mu: the one default


def client_mu(strategy: str, parameters: Mapping[str, Any]) -> float:
    """The proximal strength a client trains with: the spec's ``mu`` (default `FEDPROX_MU`) under FedProx, else 0."""
    return float(parameters.get("mu", FEDPROX_MU)) if strategy == "fedprox" else 0.0


@dataclass(frozen=True)
class TrainSettings:
    """How the site trains in a round (the coordinator's spec.training, with the client's overrides).

    The wire form of the worker's `TrainConfig`, kept apart on purpose: it is versioned with the
    protocol, bounded field by field (a site's policy judges these values before any of its data is
    touched), and torch-free; the site's worker maps it onto a `TrainConfig`.
    """

    epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 32
    optimizer: Choice = "adam"
    learning_rate: Positive = 1e-3
    momentum: NonNegative = 0.9
    weight_decay: NonNegative = 0.0
    scheduler: Choice = "none"
    restart_epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    mu: NonNegative = 0.0  # FedProx
    clip_norm: Positive | None = None  # central DP: the update is clipped before it leaves


@dataclass(frozen=True)
class PrivacySettings:
    """The coordinator's central DP, so that a site can require it and bound the budget it accepts."""

    clip_norm: Positive
    noise_multiplier: NonNegative
    delta: Annotated[float, Field(gt=0, lt=1)]
    sampling_rate: Annotated[float, Field(gt=0, le=1)]


Roster = Annotated[tuple[Name, ...], Field(max_length=MAX_SHARE_SET)]


@dataclass(frozen=True)
class SecureSettings:
    """A secure round's part of a site's task: the attempt, the protocol's settings, the rosters and an inbox.

    A site reads nothing of the other clients (its bucket policy grants only its own folder), so the
    coordinator relays inside the task what the stage needs of them, each message parsed before it
    is relayed: for ``shares`` the advertisements of the site's share set, for ``train`` those of
    the members that shared, for ``unmask`` those and each sender's ciphertext addressed to this
    site (a `SharesMessage` with one entry: its AES-GCM AAD binds sender, recipient and round, so
    the coordinator can withhold it but not forge it). ``identity`` is the training identity every
    key and message is bound to, exactly as the coordinator's aggregation uses it; the share
    graph's seed is the task's ``seed``.
    """

    identity: Annotated[str, Field(min_length=1, max_length=253)]
    round_attempt: Annotated[int, Field(ge=1, le=MAX_ATTEMPT)]  # keys are new for each attempt of the round
    threshold: Annotated[int, Field(ge=2, le=MAX_SHARE_SET)]
    clip_norm: Positive  # privacy.clipNorm: each update is clipped to it before it is masked
    weight_unit: Annotated[int, Field(ge=1, le=EXAMPLES_LIMIT)]  # examples per unit of an update's weight
    neighbours: Annotated[int, Field(ge=1, le=MAX_SHARE_SET)] | None = None  # SecAgg+; None: every client
    equal_weights: bool = False  # central DP: each update weighs 1
    advertised: Roster = ()  # who advertised keys: the share graph is theirs
    peers: Roster = ()  # who shared: masks are added and removed against them
    survivors: Roster = ()  # whose masked updates count (an unmask task)
    advertisements: Annotated[dict[Name, Advertisement], Field(max_length=MAX_SHARE_SET)] = \
        field(default_factory=dict)
    shares: Annotated[dict[Name, SharesMessage], Field(max_length=MAX_SHARE_SET)] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteTask:
    """One task for one site: train on the global model of ``round - 1``, or evaluate that of ``round``.

    In a secure round (``secure`` set) the site also advertises its keys, shares its secrets and
    reveals shares (kinds ``keys``, ``shares`` and ``unmask``), and trains into a masked update.
    """

    id: Annotated[str, Field(pattern=TASK_ID_PATTERN)]  # checked against kind, round, site and attempt too
    kind: TaskKind
    round: Annotated[int, Field(ge=1, le=MAX_ROUND)]
    site: Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
    # "<namespace>/<name>" of the coordinator's resource, for people reading the site's status
    training: Annotated[str, Field(max_length=253)]
    total_rounds: Annotated[int, Field(ge=1, le=MAX_ROUND)]
    strategy: Choice
    architecture: Choice
    global_key: Annotated[str, Field(pattern=GLOBAL_KEY_PATTERN)]
    global_sha256: Annotated[str, Field(pattern=SHA256_PATTERN)]
    deadline: NonNegative  # unix seconds after which the coordinator no longer waits for the answer
    seed: int = 0
    train: TrainSettings | None = None
    privacy: PrivacySettings | None = None
    roi_crop: bool = True
    attempt: Annotated[int, Field(ge=1, le=MAX_ATTEMPT)] = 1  # the engine's attempt (the id's "-aN")
    secure: SecureSettings | None = None  # privacy.secureAggregation: this round's settings, rosters and inbox
    # A training task that first scores the model it trains from (the previous round's global model) on the
    # site's evaluation split, and answers the figures with its update: one task where there were two.
    evaluate_base: bool = False
    version: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        """The document, with its digest."""
        body: dict[str, Any] = _TASK.dump_python(self, mode="json")
        return {**body, "digest": digest(body)}


# The coordinator's phases after which a site has nothing more to do; "Deleted" is posted only by a
# coordinator whose training resource is being deleted (it has no status phase of that name).
DELETED = "Deleted"
ENDED_PHASES = ("Succeeded", "Failed", DELETED)


# A task's fields checked strictly (JSON types exactly, unknown fields refused) against SiteTask's annotations.
SiteTask.__pydantic_config__ = ConfigDict(strict=True, extra="forbid")  # type: ignore[attr-defined]
TrainSettings.__pydantic_config__ = ConfigDict(strict=True, extra="forbid")  # type: ignore[attr-defined]
PrivacySettings.__pydantic_config__ = ConfigDict(strict=True, extra="forbid")  # type: ignore[attr-defined]
SecureSettings.__pydantic_config__ = ConfigDict(strict=True, extra="forbid")  # type: ignore[attr-defined]
_TASK = TypeAdapter(SiteTask)


@dataclass(frozen=True)
class Posting:
    """What ``task.json`` holds: the current task, or none, and where the training stands.

    Every site reads its own posting, so it says nothing of the other clients: ``message`` is the
    coordinator's word on the training as a whole (it ended, and in one word why), never the
    status's message, which names clients and their failures.
    """

    phase: str  # the coordinator's phase: Running, Succeeded, Failed..., or DELETED
    task: SiteTask | None = None
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        """``{"phase": ..., "task": {...} | null, "message": ...}``."""
        return {"phase": self.phase, "task": self.task.to_json() if self.task else None, "message": self.message}


@dataclass(frozen=True)
class SiteResult:
    """A site's answer to one task: done (with its output) or failed (refused by policy included)."""

    task: str
    site: str
    state: ResultState
    exit_code: int | None = None
    reason: str | None = None
    output: dict[str, Any] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        """The document as JSON data."""
        return asdict(self)


def digest(body: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a task without its digest."""
    canonical = json.dumps({k: v for k, v in body.items() if k != "digest"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def encode(document: Posting | SiteResult) -> bytes:
    """Bytes to store (stable, so that an unchanged posting is recognised and not written again)."""
    return (json.dumps(document.to_json(), indent=1, sort_keys=True) + "\n").encode()


def _object(data: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise BadDataError(f"{where}: not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise BadDataError(f"{where}: expected a JSON object")
    return value


def parse_task(value: dict[str, Any], where: str = "task") -> SiteTask:
    """A task from its JSON data; `BadDataError` when the version, the digest or a field is wrong.

    Every field is checked against its type, range and pattern (`SiteTask`'s annotations) before
    any of them names a key, a Job or a path: a task id, site or round from the store is never
    trusted to be what it says, even one whose digest matches (whoever can write the posting can
    compute a digest).
    """
    mismatch = version_mismatch(value.get("version"), where, reader="site")
    if mismatch is not None:
        raise BadDataError(mismatch)
    if value.get("digest") != digest(value):
        raise BadDataError(f"{where}: its sha256 does not match its content; it was altered or cut short in the "
                           "store, so it is refused")
    body = {k: v for k, v in value.items() if k != "digest"}
    try:
        task = _TASK.validate_json(json.dumps(body))
    except ValidationError as error:
        raise BadDataError(f"{where}: not a task of protocol version {PROTOCOL_VERSION}: {problems(error)}") from error
    expected = expected_task_id(task)
    if task.id != expected:
        raise BadDataError(f"{where}: id {task.id!r} is not the id of a {task.kind} task of round {task.round}, "
                           f"site {task.site}, attempt {task.attempt} ({expected!r}); refusing it")
    if task.kind in SECURE_STAGES and task.secure is None:
        raise BadDataError(f"{where}: a {task.kind} task without its 'secure' settings; refusing it")
    if task.kind == "evaluate" and task.secure is not None:
        raise BadDataError(f"{where}: an evaluate task with 'secure' settings; refusing it")
    return task


SIDES = {"site": "the site's operator and worker image (fedtrain site run)",
         "coordinator": "the coordinator's operator and worker image (fedtrain run)"}


def version_mismatch(found: object, where: str, reader: Literal["site", "coordinator"]) -> str | None:
    """Why a document of another protocol version is refused, naming the side to upgrade; None if it matches.

    Checked before any field: a field error ("attempt: extra inputs are not permitted") would hide
    that the two sides run different releases, and which of them is behind.
    """
    if found == PROTOCOL_VERSION and not isinstance(found, bool):
        return None
    writer = "coordinator" if reader == "site" else "site"
    said = f"{where}: protocol version {found!r}, this {reader} speaks {PROTOCOL_VERSION}"
    if isinstance(found, int) and not isinstance(found, bool) and found > PROTOCOL_VERSION:
        return f"{said}; this {reader} is older: upgrade {SIDES[reader]} to the {writer}'s release"
    return f"{said}; the {writer} is older: upgrade {SIDES[writer]} to protocol version {PROTOCOL_VERSION}"


def expected_task_id(task: SiteTask) -> str:
    """The id the coordinator's engine gives such a task: ``r0003-munich-a2``, ``e0003-munich-a1``, ``k0003-...``."""
    return f"{TASK_LETTERS[task.kind]}{task.round:04d}-{task.site}-a{task.attempt}"


def parse_posting(data: bytes, where: str = "task.json") -> Posting:
    """``task.json`` as written by the coordinator; its phase and message only as text to show, bounded."""
    value = _object(data, where)
    task = value.get("task")
    return Posting(showable(str(value.get("phase", "")))[:REASON_KEPT],
                   parse_task(task, where) if isinstance(task, dict) else None,
                   showable(str(value.get("message", "")))[:REASON_LIMIT])


@dataclass(frozen=True)
class ExampleBounds:
    """The most examples each client may claim in a round: ``default``, or a client's own bound in ``clients``."""

    default: int = DEFAULT_MAX_EXAMPLES
    clients: tuple[tuple[str, int], ...] = ()

    def of(self, client: str) -> int:
        """The bound of ``client``."""
        return dict(self.clients).get(client, self.default)


# --- what a site answers, parsed strictly ----------------------------------------------------------


class WireModel(BaseModel):
    """A document a site wrote: exact JSON types (no "1" for 1, no true for 1), nothing unknown, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class ResultDocument(WireModel):
    """``sites/<site>/results/<task id>.json`` as it must be; its ``output`` is checked by the task's kind."""

    task: Annotated[str, Field(pattern=TASK_ID_PATTERN)]
    site: Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
    state: ResultState
    exit_code: Annotated[int, Field(ge=0, le=255)] | None = None
    reason: Reason | None = None
    output: dict[str, Any] = {}
    version: int = PROTOCOL_VERSION  # checked first by `parse_result`, naming the side to upgrade


def _examples_bound(value: int, info: ValidationInfo) -> int:
    """Refuse a count past what the coordinator declared for this client (``context={"max_examples": n}``)."""
    bound = int((info.context or {}).get("max_examples", EXAMPLES_LIMIT))
    if value > bound:
        raise ValueError(f"claims {value} examples, more than the {bound} the coordinator allows this client "
                         "(clients.maxExamples, or clients.list[].maxExamples)")
    return value


class EvaluationOutput(WireModel):
    """A site's score of one global model: how many examples, the accuracy and the mean loss over them."""

    examples: Annotated[int, Field(ge=1, le=EXAMPLES_LIMIT)]
    accuracy: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    loss: Annotated[float, Field(ge=0.0, le=LOSS_LIMIT, allow_inf_nan=False)]

    _bounded = field_validator("examples")(_examples_bound)


class TrainOutput(WireModel):
    """What a site's training answer says of its update (the aggregator reads the update's own sidecar)."""

    num_examples: Annotated[int, Field(ge=1, le=EXAMPLES_LIMIT)]
    metrics: Annotated[dict[Annotated[str, Field(pattern=METRIC_NAME_PATTERN)], FiniteFloat],
                       Field(max_length=METRICS_LIMIT)] = {}
    sha256: Annotated[str, Field(pattern=SHA256_PATTERN)]
    evaluation: EvaluationOutput | None = None  # the model it trained from, scored first (`SiteTask.evaluate_base`)

    _bounded = field_validator("num_examples")(_examples_bound)


class SecureTrainOutput(WireModel):
    """What a site's masked training answer says: its metrics (nothing private) and its masked vector's length.

    No example count and no digest of an update: the count travels masked, and there is no update
    in the clear to name. The aggregation reads the masked vector with the bound its length sets.
    """

    metrics: Annotated[dict[Annotated[str, Field(pattern=METRIC_NAME_PATTERN)], FiniteFloat],
                       Field(max_length=METRICS_LIMIT)] = {}
    length: Annotated[int, Field(ge=1, le=MASKED_LENGTH_LIMIT)]
    evaluation: EvaluationOutput | None = None  # the model it trained from, scored first (`SiteTask.evaluate_base`)


class StageOutput(WireModel):
    """A site's answer to a key, share or unmask task: how many it shared with, whose shares it opened or refused.

    The coordinator reads the stage's message itself (`SiteRelay`); ``refused`` names each sender
    whose share failed authentication at the site, and why, for the round's Events.
    """

    recipients: Annotated[int, Field(ge=0, le=MAX_SHARE_SET)] | None = None
    opened: Annotated[list[Name], Field(max_length=MAX_SHARE_SET)] = []
    refused: Annotated[dict[Name, ShortReason], Field(max_length=MAX_SHARE_SET)] = {}


class EvaluationFile(EvaluationOutput):
    """``sites/<site>/round-N/evaluation.json``: the score, with per-class counts (no more classes than a model has)."""

    per_class_correct: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1000)] = []
    per_class_total: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1000)] = []
    round: Annotated[int, Field(ge=1)] | None = None
    split: Literal["test", "validation"] | None = None


class ScoresRecord(WireModel):
    """``round-NNNN/federated.json``: the site scores the coordinator accepted for one round's model.

    The coordinator writes it (sites may not) once the round's evaluation ended; finalize reads it,
    so that MLflow and the champion rule use exactly the scores the status shows.
    """

    round: Annotated[int, Field(ge=1)]
    sites: dict[Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)], EvaluationOutput] = {}
    combine: Combination = "weighted"  # how the engine combined them: finalize combines them the same way
    outlier_distance: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = DEFAULT_OUTLIER_DISTANCE

    def encode(self) -> bytes:
        """Stable bytes to store."""
        return (json.dumps(self.model_dump(), indent=1, sort_keys=True) + "\n").encode()


def parse_scores_record(data: bytes, where: str = "federated.json") -> ScoresRecord:
    """A round's accepted site scores; `BadDataError` naming the field when the file is not one."""
    try:
        return ScoresRecord.model_validate_json(data)
    except ValidationError as error:
        raise BadDataError(f"{where}: {problems(error)}") from error


def parse_result(data: bytes, where: str = "result") -> SiteResult:
    """A site's answer, strictly (types, patterns, a bounded reason); `BadDataError` naming the field otherwise.

    An answer of another protocol version is refused first, naming the side to upgrade.
    """
    try:
        found = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth: the strict parse says so
        found = None
    if isinstance(found, dict) and "version" in found:  # without one, the strict parse names what is wrong
        mismatch = version_mismatch(found["version"], where, reader="coordinator")
        if mismatch is not None:
            raise BadDataError(mismatch)
    try:
        document = ResultDocument.model_validate_json(data)
    except ValidationError as error:
        raise BadDataError(f"{where}: not a site result of protocol version {PROTOCOL_VERSION}: "
                           f"{problems(error)}") from error
    return SiteResult(document.task, document.site, document.state, document.exit_code, document.reason,
                      dict(document.output), document.version)


def _checked(model: type[WireModel], value: Mapping[str, Any], max_examples: int, where: str) -> Any:
    try:
        return model.model_validate(value, context={"max_examples": max_examples})
    except ValidationError as error:
        raise BadDataError(f"{where}: {problems(error)}") from error


def train_output(output: Mapping[str, Any], max_examples: int = EXAMPLES_LIMIT, where: str = "output"
                 ) -> TrainOutput:
    """A training answer's output, its example count at most ``max_examples``; `BadDataError` otherwise."""
    return _checked(TrainOutput, output, max_examples, where)


def secure_train_output(output: Mapping[str, Any], where: str = "output") -> SecureTrainOutput:
    """A masked training answer's output: finite metrics and a positive length; `BadDataError` otherwise."""
    return _checked(SecureTrainOutput, output, EXAMPLES_LIMIT, where)


def stage_output(output: Mapping[str, Any], where: str = "output") -> StageOutput:
    """A secure stage's answer: names that are DNS labels, bounded reasons; `BadDataError` otherwise."""
    return _checked(StageOutput, output, EXAMPLES_LIMIT, where)


def evaluation_output(output: Mapping[str, Any], max_examples: int = EXAMPLES_LIMIT, where: str = "output"
                      ) -> EvaluationOutput:
    """An evaluation answer's figures: accuracy in [0, 1], a finite loss, 1 to ``max_examples`` examples."""
    return _checked(EvaluationOutput, output, max_examples, where)


def parse_evaluation(data: bytes, max_examples: int = EXAMPLES_LIMIT, where: str = "evaluation.json"
                     ) -> EvaluationFile:
    """A site's ``evaluation.json``, strictly; `BadDataError` naming the field otherwise."""
    try:
        return EvaluationFile.model_validate_json(data, context={"max_examples": max_examples})
    except ValidationError as error:
        raise BadDataError(f"{where}: {problems(error)}") from error
