"""The FederatedParticipation resource: one site's part in one training, as its own organisation declares it.

A site names the training it joins (the store and the training's folder in it), its own data, how
its worker runs, and its policy: what it accepts to run on that data. The same file drives a site
on one machine (``fedtrain site run``) and the site's operator on Kubernetes. Conventions are
those of `fedtrain.spec`: camelCase fields, unknown fields refused, each field's docstring its CRD
description, errors naming the field path. Kept free of torch: the site's operator imports it.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedtrain.contract.storage import s3_location
from fedtrain.engine.status import Condition, StatusModel
from fedtrain.spec import (
    API_VERSION,
    DNS_LABEL,
    MAX_CLIENT_NAME,
    STRATEGY_NAMES,
    Metadata,
    Model,
    ModelSpec,
    S3Spec,
    StrategyName,
    SyntheticSpec,
    describe_error,
    identity,
)

PARTICIPATION_KIND = "FederatedParticipation"
PARTICIPATION_PLURAL = "federatedparticipations"
PARTICIPATION_SINGULAR = "federatedparticipation"
PARTICIPATION_SHORT_NAME = "fp"

Architecture = Literal["mobilenet_v3_small", "mobilenet_v3_large", "tiny_cnn"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
assert get_args(ModelSpec.model_fields["architecture"].annotation) == ARCHITECTURES, "the spec's architectures"

# Withdrawn: the coordinator took back the task the site ran (its Job deleted); Deleted: the training is gone.
ParticipationPhase = Literal["Waiting", "Training", "Evaluating", "Withdrawn", "Refused", "Completed", "Failed",
                             "Deleted"]
EvaluationSplit = Literal["test", "validation"]
# A training's folder under the store's prefix: "<namespace>/<name>-<uid8>" as the coordinator's
# status.trainingId shows it, or "" when the store location is the training's folder itself.
TRAINING_ID = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class ParticipationError(ValueError):
    """A participation that cannot run; ``problems`` holds one line per field, each naming the field path."""

    def __init__(self, problems: list[str], source: str = "participation") -> None:
        self.problems = problems
        super().__init__(f"{source}: invalid {PARTICIPATION_KIND}:\n" + "\n".join(f"  - {p}" for p in problems))


class TrainingRef(Model):
    """Which training this site joins: its folder in the store (the coordinator tells it to the sites)."""

    id: Annotated[str, Field(pattern=TRAINING_ID, max_length=128)]
    """The training's folder under the store's prefix, ``<namespace>/<name>-<uid8>`` (the coordinator's
    status.trainingId); "" when the store itself is the training's folder."""
    name: Annotated[str, Field(max_length=128)] | None = None
    """A name to show in this site's status (for people; the id is what counts)."""


class SiteStore(Model):
    """The store the coordinator publishes tasks in: an S3-compatible bucket, or (one machine) a directory."""

    s3: S3Spec | None = None
    """The object store shared with the coordinator (credentials: this site's own key, see docs/sites.md)."""
    local: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    """A directory shared with the coordinator on one machine (fedtrain site run only)."""

    @model_validator(mode="after")
    def _one_kind(self) -> SiteStore:
        if (self.s3 is None) == (self.local is None):
            raise ValueError("store takes exactly one of s3 or local")
        return self


class SiteData(Model):
    """The site's own data: a GTSRB tree on one of its claims, in a local folder, or generated at the site."""

    claim_name: Annotated[str, Field(pattern=DNS_LABEL, max_length=253)] | None = None
    """The PersistentVolumeClaim, in the participation's namespace, that holds the data (mounted read-only)."""
    path: Annotated[str, Field(max_length=1024)] = ""
    """The GTSRB tree's folder inside the claim, relative to its root."""
    local_path: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    """A GTSRB tree on this machine (fedtrain site run only)."""
    synthetic: SyntheticSpec | None = None
    """Generate a synthetic GTSRB-like set at the site (demos and tests); the seed makes each site's set its own."""

    @model_validator(mode="after")
    def _one_source(self) -> SiteData:
        given = [name for name, value in (("claimName", self.claim_name), ("localPath", self.local_path),
                                          ("synthetic", self.synthetic)) if value is not None]
        if len(given) != 1:
            raise ValueError(f"data takes exactly one of claimName, localPath or synthetic, not {given or 'none'}")
        if self.path and self.claim_name is None:
            raise ValueError("data.path is the folder inside data.claimName; with localPath give the whole path there")
        if self.path.startswith("/") or ".." in PurePosixPath(self.path).parts:
            raise ValueError(f"data.path {self.path!r} must be relative to the claim's root, without '..'")
        return self


class SiteEvaluationSpec(Model):
    """Which of the site's own splits scores the global models it is asked to evaluate."""

    split: EvaluationSplit = "test"
    """test (the site's test images) or validation (the tracks it holds out of its training split)."""


class SiteWorkerSpec(Model):
    """How the site's tasks run: image and scheduling on Kubernetes, device everywhere.

    Not the training's `WorkerSpec`: the site chooses these for its own cluster, and a site's Job
    takes no parallelism, extra volumes or claims of the coordinator's; the fields are the subset
    its participation may set. (A participation's conditions are the training's `Condition` type.)
    """

    image: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    """The worker image the site's Jobs run (the site chooses it, not the coordinator); unset: its operator's."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """The worker container's image pull policy."""
    resources: dict[str, Any] | None = None
    """Resource requests and limits of the worker container."""
    node_selector: dict[str, str] | None = None
    """Node selector of the site's worker Pods."""
    tolerations: list[dict[str, Any]] | None = None
    """Tolerations of the site's worker Pods."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the site computes: auto (CUDA when present), cpu or cuda."""
    env: list[dict[str, Any]] | None = None
    """Extra environment of the worker container (Secrets of this namespace by reference)."""


class SitePolicy(Model):
    """What the site accepts to run on its data; any other task is refused, with the field that refused it."""

    strategies: Annotated[tuple[StrategyName, ...], Field(min_length=1)] = STRATEGY_NAMES  # type: ignore[assignment]
    """Aggregation strategies the site takes part in (default: all)."""
    architectures: Annotated[tuple[Architecture, ...], Field(min_length=1)] = ARCHITECTURES  # type: ignore[assignment]
    """Model architectures the site trains (default: all)."""
    max_rounds: Annotated[int, Field(ge=1, le=10000)] | None = None
    """Refuse a training of more rounds than this (none: any)."""
    max_local_epochs: Annotated[int, Field(ge=1, le=1000)] | None = None
    """Refuse a round asking for more local epochs than this (none: any)."""
    require_privacy: bool = False
    """Take part only in trainings with central differential privacy (the coordinator's spec.privacy)."""
    max_epsilon: Annotated[float, Field(gt=0)] | None = None
    """With requirePrivacy: refuse a training whose epsilon after all its rounds would exceed this."""
    require_secure_aggregation: bool = False
    """Train only with secure aggregation (privacy.secureAggregation): the update leaves the site masked."""

    @model_validator(mode="after")
    def _epsilon_needs_privacy(self) -> SitePolicy:
        if self.max_epsilon is not None and not self.require_privacy:
            raise ValueError("policy.maxEpsilon bounds a privacy budget: set policy.requirePrivacy to true as well")
        return self


class ParticipationSpec(Model):
    """One site's part in one training: where the training is, the site's data, worker and policy."""

    site: Annotated[str, Field(pattern=DNS_LABEL, max_length=MAX_CLIENT_NAME)]
    """This site's name in the coordinator's clients.list (a DNS label): its tasks and keys carry it."""
    training: TrainingRef
    """The training joined: its folder in the store."""
    store: SiteStore
    """The store the coordinator publishes in."""
    data: SiteData
    """The site's own data (it never leaves the site)."""
    evaluation: SiteEvaluationSpec = SiteEvaluationSpec()
    """Which split scores the global models."""
    validation_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    """Share of the site's training tracks held out for validation (split by track)."""
    worker: SiteWorkerSpec = SiteWorkerSpec()
    """How the site's tasks run."""
    policy: SitePolicy = SitePolicy()
    """What the site accepts."""
    poll_seconds: Annotated[int, Field(ge=1, le=300)] = 30
    """The longest wait between two looks at the site's task in the store: right after a task ended or the posting
    changed the site looks again within a fraction of a second, then less and less often up to this (one
    conditional request each)."""
    suspend: bool = False
    """Take no new task (a running one finishes); false resumes."""


class FederatedParticipation(Model):
    """A whole participation manifest, as ``kubectl apply`` and ``fedtrain site run`` read it."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    api_version: str = Field(API_VERSION, alias="apiVersion")
    kind: str = PARTICIPATION_KIND
    metadata: Metadata
    spec: ParticipationSpec

    @field_validator("api_version", "kind")
    @classmethod
    def _ours(cls, value: str, info: ValidationInfo) -> str:
        return identity(value, info, PARTICIPATION_KIND)


class ParticipationStatus(StatusModel):
    """What ``kubectl get fp`` and ``fedtrain site status`` show: where the site stands in the training."""

    phase: ParticipationPhase = "Waiting"
    training_phase: str | None = None  # the coordinator's phase, as the posting says
    rounds_done: int = 0  # train tasks this site finished
    last_task: str | None = None
    last_accuracy: float | None = None  # local validation accuracy of the last update, or the last evaluation's
    epsilon: float | None = None  # the privacy budget spent after the last round the site trained in
    last_refusal: str | None = None
    message: str = ""
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


def training_location(spec: ParticipationSpec) -> str:
    """The training's ``--workdir``: ``s3://bucket/prefix/<id>`` or ``<local>/<id>``."""
    if spec.store.s3 is not None:
        return s3_location(spec.store.s3.bucket, spec.store.s3.prefix, spec.training.id)
    assert spec.store.local is not None
    return str(Path(spec.store.local) / spec.training.id) if spec.training.id else spec.store.local


def _validate(model: type[BaseModel], data: Any, prefix: list[str], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ParticipationError([describe_error(e, prefix) for e in error.errors()], source) from None


def parse_participation_spec(data: Any, source: str = "spec") -> ParticipationSpec:
    """Validate a resource's ``.spec``, raising `ParticipationError` that names every bad field."""
    spec: ParticipationSpec = _validate(ParticipationSpec, data, ["spec"], source)
    return spec


def parse_participation(data: Any, source: str = "participation") -> FederatedParticipation:
    """Validate a whole manifest (apiVersion, kind, metadata, spec)."""
    if not isinstance(data, dict):
        raise ParticipationError(["the document must be a mapping with apiVersion, kind, metadata and spec"], source)
    manifest: FederatedParticipation = _validate(FederatedParticipation, data, [], source)
    return manifest


def load_participation(path: Path) -> FederatedParticipation:
    """Read and validate a FederatedParticipation YAML file; errors name the file and each bad field."""
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except FileNotFoundError:
        raise ParticipationError([f"file {path} does not exist"], str(path)) from None
    except yaml.YAMLError as error:
        raise ParticipationError([f"not valid YAML: {error}"], str(path)) from None
    if len(documents) != 1:
        raise ParticipationError([f"expected one YAML document, found {len(documents)}"], str(path))
    return parse_participation(documents[0], str(path))
