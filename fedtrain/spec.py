"""The FederatedTraining spec: one typed, validated model for YAML files and the custom resource.

Field names are the resource's camelCase; defaults live here and nowhere else. Validation errors
name the field path (``spec.clients.minSuccessful``) and say what is allowed. Each field's
docstring becomes its description in the CRD (what ``kubectl explain`` shows). This module is the
one source of the resource's names (group, version, kind), its storage kinds and strategy names:
the CRD, its CEL rules and the operator derive theirs from here. It imports neither torch nor the
worker's heavy parts: the operator uses it as is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from fedtrain import __version__
from fedtrain.contract.layout import client_names
from fedtrain.contract.sitetask import (
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_MAX_WEIGHT_OVER_MEDIAN,
    DEFAULT_OUTLIER_DISTANCE,
    EXAMPLES_LIMIT,
    PER_UPDATE_STRATEGIES,
    SUM_STRATEGIES,
    Combination,
    ExampleBounds,
)

GROUP = "fedtrain.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FederatedTraining"
PLURAL = "federatedtrainings"
SINGULAR = "federatedtraining"
SHORT_NAME = "ft"
# The images a release publishes (deploy/images/build tags them with the version). Trainings that name no
# worker image run the operator's default, WORKER_IMAGE_ENV in its Deployment (deploy/kustomization.yaml
# sets it in one place), else this one.
IMAGE_REGISTRY = "ghcr.io/fedtrain"
DEFAULT_WORKER_IMAGE = f"{IMAGE_REGISTRY}/worker:{__version__}"
WORKER_IMAGE_ENV = "FEDTRAIN_WORKER_IMAGE"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A training's name prefixes the names of its Jobs and claim and is a label value on each of them;
# 40 leaves room for the task id in a Job name. The CRD refuses longer names at admission.
MAX_TRAINING_NAME = 40
MAX_CLIENT_NAME = 40
# Secure aggregation's rounds: every client holds a share of its neighbours' secrets and a task posts the
# round's roster, so a secure round is bounded (SecAgg+ with privacy.secureAggregation.neighbours scales further
# in cost than in roster).
SECURE_MAX_CLIENTS = 128  # also keeps a site's unmask task (an inbox entry per member) within one argument

StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "trimmedmean", "krum",
                       "multikrum"]
STRATEGY_NAMES: tuple[str, ...] = get_args(StrategyName)
# Each strategy's parameters; kept equal to the worker's registry by a test, so that the operator
# can validate a spec without importing the worker.
STRATEGY_PARAMETERS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedprox": ("mu",),
    "fedadam": ("eta", "beta1", "beta2", "tau"),
    "fedyogi": ("eta", "beta1", "beta2", "tau"),
    "fedadagrad": ("eta", "beta1", "tau"),
    "fedmedian": (),
    "trimmedmean": ("beta",),
    "krum": ("f",),
    "multikrum": ("f", "m"),
}
assert tuple(STRATEGY_PARAMETERS) == STRATEGY_NAMES, "every strategy name has its parameters, in the same order"
assert set(SUM_STRATEGIES) | set(PER_UPDATE_STRATEGIES) == set(STRATEGY_NAMES), "secure aggregation knows each"


class SpecError(ValueError):
    """A spec that cannot run; ``problems`` holds one line per field, each naming the field path."""

    def __init__(self, problems: list[str], source: str = "spec") -> None:
        self.problems = problems
        super().__init__(f"{source}: invalid FederatedTraining:\n" + "\n".join(f"  - {p}" for p in problems))


class Model(BaseModel):
    """Shared settings: camelCase names, unknown fields rejected, immutable, docstrings as descriptions."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
                              use_attribute_docstrings=True)


class ModelSpec(Model):
    """Which network, how many classes, which input size, and how it starts. Immutable once created."""

    architecture: Literal["mobilenet_v3_small", "mobilenet_v3_large", "tiny_cnn"] = "mobilenet_v3_small"
    """The network: torchvision's MobileNetV3 (small or large), or a tiny CNN for tests and demos."""
    num_classes: Annotated[int, Field(ge=2, le=1000)] = 43
    """Number of output classes (43 for GTSRB)."""
    image_size: Annotated[int, Field(ge=16, le=512)] = 64
    """Images are resized to imageSize x imageSize pixels."""
    pretrained_weights: Annotated[str, Field(max_length=1024)] | None = None
    """A safetensors file of ImageNet weights to start from (a path the worker can read); none: random init."""
    fine_tune: bool = True
    """Train all layers (true) or only the classifier head (false)."""


class SyntheticSpec(Model):
    """Generate a synthetic GTSRB-like data set instead of reading one."""

    images_per_class: Annotated[int, Field(ge=1, le=5000)] = 60
    """Training images generated per class."""
    test_images_per_class: Annotated[int, Field(ge=1, le=5000)] = 20
    """Test images generated per class."""
    frames_per_track: Annotated[int, Field(ge=1, le=30)] = 5
    """Frames per track (views of one physical sign), as in GTSRB's tracks of 30."""
    seed: int = 0
    """Seed of the generator: the same seed gives the same images."""


class DatasetSpec(Model):
    """Where the data is: a GTSRB tree at ``path``, or ``synthetic`` (the default when neither is given)."""

    format: Literal["gtsrb"] = "gtsrb"
    """The data set's layout: the official GTSRB tree (or torchvision's)."""
    path: Annotated[str, Field(max_length=1024)] | None = None
    """Where the GTSRB tree is, as the worker sees it (mount it with worker.volumes)."""
    synthetic: SyntheticSpec | None = None
    """Generate a synthetic GTSRB-like data set instead of reading one."""
    roi_crop: bool = True
    """Crop each image to the sign's region of interest given in the annotations."""
    validation_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    """Share of each client's tracks held out for validation (split by track, so frames never leak)."""

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if self.path is not None and self.synthetic is not None:
            raise ValueError("give either dataset.path or dataset.synthetic, not both")
        return self


class PartitionSpec(Model):
    """How the training split is dealt out among clients."""

    scheme: Literal["iid", "dirichlet", "classes", "quantity"] = "iid"
    """iid (equal random shares), dirichlet (label skew), classes (disjoint classes) or quantity (size skew)."""
    alpha: Annotated[float, Field(gt=0)] = 0.5
    """Concentration of the dirichlet and quantity schemes: smaller is more skewed."""
    seed: int = 0
    """Seed of the partition."""


class TrainingOverride(Model):
    """Per-client changes to the training settings."""

    local_epochs: Annotated[int, Field(ge=1)] | None = None
    """This client's local epochs per round."""
    batch_size: Annotated[int, Field(ge=1)] | None = None
    """This client's batch size."""
    learning_rate: Annotated[float, Field(gt=0)] | None = None
    """This client's learning rate."""


class ClientData(Model):
    """A client's own data set: a GTSRB tree on a claim of the client's namespace (``path`` inside it)."""

    claim_name: Annotated[str, Field(pattern=DNS_LABEL, max_length=253)]
    """The PersistentVolumeClaim, in the client's namespace, that holds the data (mounted read-only)."""
    path: Annotated[str, Field(max_length=1024)] = ""
    """The GTSRB tree's folder inside the claim, relative to its root."""

    @model_validator(mode="after")
    def _inside_the_claim(self) -> ClientData:
        if self.path.startswith("/") or ".." in self.path.split("/"):
            raise ValueError(f"data.path {self.path!r} must be relative to the claim's root, without '..'")
        return self


class SiteRef(Model):
    """A client that is another organisation's site: it runs nothing here and is reached only through the store.

    The coordinator posts the site's tasks into ``spec.storage``; the site's own operator (or
    ``fedtrain site run``) checks them against its policy, trains on its own data and answers there.
    """

    evaluate: bool = True
    """Take part in federated evaluation: score each evaluated global model on the site's own test split."""


class ClientEntry(Model):
    """One named client with optional overrides (Kubernetes scheduling settings apply to its Jobs).

    With ``data``, the client trains on its own data set instead of a share of ``spec.dataset``;
    with ``namespace`` too, its Jobs run there, as that namespace's ``fedtrain-worker``, and only
    weights leave it, through the object store (``spec.storage.s3``). With ``site``, it is another
    organisation's site (see docs/sites.md): nothing runs for it here.
    """

    name: Annotated[str, Field(pattern=DNS_LABEL, max_length=MAX_CLIENT_NAME)]
    """The client's name (a DNS label): it names the client's Jobs and update files."""
    namespace: Annotated[str, Field(pattern=DNS_LABEL, max_length=63)] | None = None
    """Run this client's Jobs in this namespace (which must opt in with fedtrain.io/accept-trainings)."""
    data: ClientData | None = None
    """The client's own data set, instead of a share of spec.dataset."""
    site: SiteRef | None = None
    """This client is a remote site, reached only through spec.storage (its data and Jobs are its own)."""
    max_examples: Annotated[int, Field(ge=1, le=EXAMPLES_LIMIT)] | None = None
    """The most examples this client's update or evaluation may claim (what it declared it holds), instead of
    clients.maxExamples."""
    training: TrainingOverride = TrainingOverride()
    """Changes to spec.training for this client."""
    resources: dict[str, Any] | None = None
    """Resource requests and limits of this client's worker container (overrides worker.resources)."""
    node_selector: dict[str, str] | None = None
    """Node selector of this client's Pods (overrides worker.nodeSelector)."""
    tolerations: list[dict[str, Any]] | None = None
    """Tolerations of this client's Pods (overrides worker.tolerations)."""


class ClientsSpec(Model):
    """How many clients, how many train each round, how many must succeed for the round to count."""

    count: Annotated[int, Field(ge=1, le=1000)] | None = None
    """Number of clients (named client-00, client-01...), each training on a share of spec.dataset."""
    per_round: Annotated[int, Field(ge=1)] | None = None
    """Clients sampled (without replacement, seeded) to train each round; default: all."""
    min_successful: Annotated[int, Field(ge=1)] | None = None
    """Updates a round needs to be aggregated; default: all sampled clients."""
    max_retries: Annotated[int, Field(ge=0, le=10)] = 1
    """How often a failed task is started again before it counts as failed."""
    max_examples: Annotated[int, Field(ge=1, le=EXAMPLES_LIMIT)] = DEFAULT_MAX_EXAMPLES
    """The most examples one client's update (or a site's evaluation) may claim in a round: an update claiming more
    is refused, an evaluation left out, so that no client weighs more than this in an example-weighted mean."""
    max_weight_over_median: Annotated[float, Field(ge=1, le=EXAMPLES_LIMIT, allow_inf_nan=False)] = (
        DEFAULT_MAX_WEIGHT_OVER_MEDIAN)
    """The most an accepted update weighs in an example-weighted mean, as a multiple of the median example count of
    the round's accepted updates (when there are three or more): an update claiming more still counts, weighted as
    this multiple of the median (the round's result and a Warning Event say so), so that no client outweighs the
    others by more than this whatever it claims within maxExamples."""
    entries: tuple[ClientEntry, ...] | None = Field(None, alias="list")
    """Named clients, with their own settings, data or namespace (instead of, or matching, count)."""

    @model_validator(mode="after")
    def _consistent(self) -> ClientsSpec:
        if self.entries is not None:
            names = [c.name for c in self.entries]
            if len(set(names)) != len(names):
                raise ValueError("clients.list has duplicate names")
            if self.count is not None and self.count != len(names):
                raise ValueError(f"clients.count ({self.count}) differs from the {len(names)} entries of clients.list")
        elif self.count is None:
            raise ValueError("give clients.count or clients.list")
        if self.per_round is not None and self.per_round > self.total:
            raise ValueError(f"clients.perRound ({self.per_round}) must be <= clients.count ({self.total})")
        if self.min_successful is not None and self.min_successful > self.round_size:
            raise ValueError(f"clients.minSuccessful ({self.min_successful}) must be <= clients.perRound "
                             f"({self.round_size})")
        return self

    @property
    def total(self) -> int:
        """How many clients there are."""
        return len(self.entries) if self.entries is not None else int(self.count or 0)

    @property
    def round_size(self) -> int:
        """How many clients train in each round (default: all)."""
        return self.per_round or self.total

    @property
    def quorum(self) -> int:
        """How many must succeed for a round to be aggregated (default: all selected)."""
        return self.min_successful or self.round_size

    def names(self) -> list[str]:
        """Client names: from the list, or ``client-00``, ``client-01``... as the worker's partition names them."""
        if self.entries is not None:
            return [c.name for c in self.entries]
        return client_names(self.total)

    def entry(self, name: str) -> ClientEntry | None:
        """The list entry of a client, if it has one."""
        return next((c for c in self.entries or () if c.name == name), None)

    def own_data(self) -> list[str]:
        """Clients that train on their own data set (not on a share of ``spec.dataset``): sites too."""
        return [c.name for c in self.entries or () if c.data is not None or c.site is not None]

    def sites(self) -> list[str]:
        """Clients that are remote sites, in the order of the list."""
        return [c.name for c in self.entries or () if c.site is not None]

    def evaluating_sites(self) -> list[str]:
        """Sites that take part in federated evaluation."""
        return [c.name for c in self.entries or () if c.site is not None and c.site.evaluate]

    def example_bounds(self) -> ExampleBounds:
        """The most examples each client may claim: clients.maxExamples, or its list entry's maxExamples."""
        own = tuple((c.name, c.max_examples) for c in self.entries or () if c.max_examples is not None)
        return ExampleBounds(self.max_examples, own)

    def max_examples_of(self, name: str) -> int:
        """The most examples client ``name`` may claim."""
        return self.example_bounds().of(name)

    def namespaces(self) -> dict[str, str]:
        """Client name -> namespace, for clients that run in a namespace of their own."""
        return {c.name: c.namespace for c in self.entries or () if c.namespace is not None}


class TrainingSpec(Model):
    """How each client trains in each round."""

    local_epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    """Passes over the client's data per round."""
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    """Images per optimiser step."""
    optimizer: Literal["sgd", "adam"] = "adam"
    """The client's optimiser (its state starts fresh each round)."""
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 1e-3
    """The client optimiser's learning rate."""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """SGD momentum (sgd only)."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """L2 weight decay."""
    scheduler: Literal["none", "cosine"] = "none"
    """Learning-rate schedule within a round: none, or cosine annealing with warm restarts."""
    restart_epochs: Annotated[int, Field(ge=1)] = 1
    """Epochs between the cosine schedule's restarts."""


class StrategySpec(Model):
    """How the server aggregates, with the strategy's own parameters. Immutable once created."""

    name: StrategyName = "fedavg"
    """The aggregation strategy (see docs/strategies.md)."""
    parameters: Annotated[dict[str, float], Field(max_length=8)] = {}
    """The strategy's parameters: mu (fedprox); eta, beta1, beta2, tau (fedadam, fedyogi, fedadagrad); beta
    (trimmedmean); f (krum); f, m (multikrum)."""
    max_norm_ratio: Annotated[float, Field(ge=0)] = 10.0
    """Reject an update whose norm exceeds this multiple of the round's median norm (0: no check)."""

    @model_validator(mode="after")
    def _known_parameters(self) -> StrategySpec:
        allowed = STRATEGY_PARAMETERS[self.name]
        unknown = sorted(set(self.parameters) - set(allowed))
        if unknown:
            raise ValueError(f"strategy.parameters.{unknown[0]} is not a parameter of {self.name} "
                             f"(allowed: {', '.join(allowed) or 'none'})")
        return self


class ClaimRef(Model):
    """An existing PersistentVolumeClaim."""

    claim_name: Annotated[str, Field(pattern=DNS_LABEL, max_length=253)]
    """The claim's name, in the training's namespace (ReadWriteMany when Jobs run on several nodes)."""


class ClaimCreate(Model):
    """A claim the operator creates for the training."""

    size: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")] = "5Gi"
    """The claim's storage request, e.g. 5Gi."""
    storage_class_name: Annotated[str, Field(max_length=253)] | None = None
    """The claim's storage class; none: the cluster's default."""


class SecretRef(Model):
    """A Secret of the namespace a Job runs in, and which of its keys hold the S3 access key and secret."""

    name: Annotated[str, Field(pattern=DNS_LABEL, max_length=253)]
    """The Secret's name."""
    access_key_id_key: Annotated[str, Field(min_length=1, max_length=253)] = "AWS_ACCESS_KEY_ID"
    """The key that holds the access key id."""
    secret_access_key_key: Annotated[str, Field(min_length=1, max_length=253)] = "AWS_SECRET_ACCESS_KEY"
    """The key that holds the secret access key."""


class ConfigMapKeyRef(Model):
    """One key of a ConfigMap (a CA bundle)."""

    name: Annotated[str, Field(pattern=DNS_LABEL, max_length=253)]
    """The ConfigMap's name."""
    key: Annotated[str, Field(min_length=1, max_length=253)] = "ca.crt"
    """The key that holds the PEM bundle."""


class S3Tls(Model):
    """Trust for an endpoint with a private CA; ``insecureSkipVerify`` is for test endpoints only."""

    ca_config_map: ConfigMapKeyRef | None = None
    """A ConfigMap key holding the CA bundle that signed the endpoint's certificate."""
    insecure_skip_verify: bool = False
    """Do not verify the endpoint's certificate (test endpoints only)."""


class S3Spec(Model):
    """An S3-compatible object store (AWS S3, MinIO, Ceph RGW...): trainings live under ``prefix``.

    On Kubernetes the credentials come from ``credentialsSecret``, which must exist in the training's
    namespace and in every client namespace (each organisation holds its own key). ``fedtrain run``
    reads them from its environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``).
    """

    endpoint: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/.*)?$", max_length=512)] | None = None
    """The store's URL (http:// or https://); none: AWS S3."""
    bucket: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]
    """The bucket (it must exist)."""
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9!_.*'()/-]*$", max_length=512)] = "fedtrain"
    """Key prefix under which trainings live: <prefix>/<namespace>/<training>-<uid8>/."""
    region: Annotated[str, Field(max_length=64)] | None = None
    """The bucket's region, where the store needs one."""
    addressing_style: Literal["path", "virtual"] = "path"
    """path (endpoint/bucket/key, MinIO's default) or virtual (bucket.endpoint/key)."""
    credentials_secret: SecretRef | None = None
    """The Secret with the access key and secret (required on Kubernetes)."""
    tls: S3Tls = S3Tls()
    """Trust settings for an https endpoint."""


# The fields of `StorageSpec` of which one names where weights live (camelCase, as in a raw spec).
STORAGE_KINDS = ("persistentVolumeClaim", "create", "s3", "local")


def one_of(names: tuple[str, ...]) -> str:
    """``a, b, c or d``: how messages list alternatives."""
    return f"{', '.join(names[:-1])} or {names[-1]}"


class StorageSpec(Model):
    """Where weights live: an existing claim, a claim to create, an object store, or (local runs) a directory.

    ``reclaimPolicy`` says what deleting the resource does to the training's directory on an existing
    claim: ``Retain`` keeps it (the default: weights outlive the resource), ``Delete`` removes it
    before the resource goes. A claim the operator created is owned by the training and is deleted
    with it either way.
    """

    persistent_volume_claim: ClaimRef | None = None
    """An existing claim to keep weights on."""
    create: ClaimCreate | None = None
    """A claim the operator creates for this training (deleted with it)."""
    s3: S3Spec | None = None
    """An S3-compatible object store (needed for clients in other namespaces)."""
    local: Annotated[str, Field(max_length=1024)] | None = None
    """A local directory (fedtrain run only)."""
    reclaim_policy: Literal["Retain", "Delete"] = "Retain"
    """What deleting the training does to its weights on a given claim or bucket: keep them, or delete them."""

    @model_validator(mode="after")
    def _one_kind(self) -> StorageSpec:
        given = {info.alias for name, info in type(self).model_fields.items() if getattr(self, name) is not None}
        kinds = [kind for kind in STORAGE_KINDS if kind in given]
        if len(kinds) > 1:
            raise ValueError(f"storage takes one of {one_of(STORAGE_KINDS)}, not several")
        return self


class WorkerSpec(Model):
    """How worker tasks run: image and scheduling on Kubernetes, device and parallelism everywhere."""

    image: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    """The worker image every Job runs; unset: the namespace's ``workerImage`` default, else the operator's."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """The worker container's image pull policy."""
    resources: dict[str, Any] | None = None
    """Resource requests and limits of the worker container."""
    node_selector: dict[str, str] | None = None
    """Node selector of worker Pods."""
    tolerations: list[dict[str, Any]] | None = None
    """Tolerations of worker Pods."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where workers compute: auto (CUDA when present), cpu or cuda."""
    parallelism: Annotated[int, Field(ge=1, le=256)] = 2
    """How many tasks run at once (fedtrain run); on Kubernetes the scheduler decides."""
    volumes: list[dict[str, Any]] | None = None
    """Extra volumes of every worker Pod (Kubernetes only), e.g. a claim holding GTSRB."""
    volume_mounts: list[dict[str, Any]] | None = None
    """Where worker containers mount worker.volumes (not /store or /tmp)."""
    env: list[dict[str, Any]] | None = None
    """Extra environment of worker containers (Secrets by reference, e.g. MLflow credentials)."""

    @model_validator(mode="after")
    def _own_namespace_only(self) -> WorkerSpec:
        for field_name, items in (("volumes", self.volumes), ("env", self.env)):
            for index, item in enumerate(items or []):
                found = _namespace_key(item, f"worker.{field_name}[{index}]")
                if found:
                    raise ValueError(f"{found} is not allowed: a training may only use claims and secrets of "
                                     "its own namespace; remove the namespace, or copy the object into the "
                                     "training's namespace")
        return self

    @model_validator(mode="after")
    def _volumes(self) -> WorkerSpec:
        names = [v.get("name") for v in self.volumes or []]
        if "store" in names or "tmp" in names:
            raise ValueError("worker.volumes: the names store and tmp are the operator's own; rename the volume")
        for mount in self.volume_mounts or []:
            if mount.get("name") not in names:
                raise ValueError(f"worker.volumeMounts: {mount.get('name')!r} is not in worker.volumes; declare the "
                                 "volume there or fix the name")
            if str(mount.get("mountPath", "")).rstrip("/") in ("", "/store", "/tmp"):
                raise ValueError("worker.volumeMounts: mountPath must be set and not /store or /tmp (the operator "
                                 "mounts the training's storage and scratch space there)")
        return self


def _namespace_key(value: Any, path: str) -> str | None:
    """The path of the first ``namespace`` key inside a volume or env entry (which must stay in its namespace)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "namespace":
                return f"{path}.namespace"
            found = _namespace_key(inner, f"{path}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found = _namespace_key(inner, f"{path}[{index}]")
            if found:
                return found
    return None


class StragglerSpec(Model):
    """What happens when the round deadline passes with clients still training.

    Late clients are dropped if the quorum holds; otherwise the round fails the training
    (``fail``) or starts again (``retry``, at most ``maxRoundRetries`` times).
    """

    on_missed_quorum: Literal["fail", "retry"] = "fail"
    """When too few clients finish by the deadline: fail the training, or retry the round."""
    max_round_retries: Annotated[int, Field(ge=0, le=10)] = 1
    """How often a round may be retried (onMissedQuorum: retry)."""


class SecureAggregationSpec(Model):
    """Secure aggregation (SecAgg+): the coordinator and its store learn the sum of a round's updates, never one.

    Each round adds three stages to the clients' training: they advertise per-round X25519 keys,
    send encrypted Shamir shares of their mask secrets to their neighbours, upload masked, fixed-point
    updates, and the survivors reveal the shares that remove the masks of the sum only (docs/privacy.md).
    """

    threshold: Annotated[int, Field(ge=2, le=SECURE_MAX_CLIENTS)]
    """How many of a client's share set (itself and its neighbours) must survive to the last stage: a round
    completes while at most (clients in the round - threshold) drop, and fewer than threshold colluding
    parties learn nothing of one update."""
    neighbours: Annotated[int, Field(ge=2, le=SECURE_MAX_CLIENTS)] | None = None
    """How many other clients each one shares its secrets with and masks against (SecAgg+); unset: all of the
    round's clients (SecAgg). Fewer neighbours cost less as rounds grow past tens of clients."""


class PrivacySpec(Model):
    """Update privacy: clipping to ``clipNorm``, central differential privacy, secure aggregation.

    Clients clip their update (L2 norm of weights minus the global model) before it leaves. With
    noise (``noiseMultiplier`` > 0) the aggregator clips again, averages with equal weights and adds
    noise of std ``noiseMultiplier · clipNorm / m``; the budget ε spent so far (at ``delta``) is in
    status. With ``secureAggregation`` clients mask their clipped updates and the aggregator only ever
    sees their sum; ``clipNorm`` then also sets the range of the masked fixed-point values.
    """

    clip_norm: Annotated[float, Field(gt=0, le=1e6)]
    """The L2 bound C on each client's update (weights minus the global model)."""
    noise_multiplier: Annotated[float, Field(ge=0, le=100)] | None = None
    """The noise's standard deviation in units of clipNorm (on the sum of updates); 0 adds none. Default: 1, or 0
    with secureAggregation (noise is then asked for by name)."""
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    """The delta at which the privacy budget epsilon is reported."""
    secure_aggregation: SecureAggregationSpec | None = None
    """Mask every update so that only the round's sum is ever seen (fedavg, fedprox and the server optimisers)."""

    @property
    def noise(self) -> float:
        """The noise multiplier in force: noiseMultiplier, else 1 without secure aggregation and 0 with it."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        return 0.0 if self.secure_aggregation is not None else 1.0

    @property
    def differential(self) -> bool:
        """Whether the aggregate gets noise (central DP: equal weights, a privacy budget in status)."""
        return self.noise > 0 or self.secure_aggregation is None


class EvaluationSpec(Model):
    """Where each round's global model is scored: centrally on spec.dataset's test split, at the sites, or both.

    Federated evaluation asks every site with ``site.evaluate`` to score the new global model on its
    own held-out split and send back metrics only; status and MLflow show the example-weighted
    accuracy and loss, the worst and best site, and each site's figures.
    """

    central: bool = True
    """Score each global model on spec.dataset's test split (false: the coordinator holds no test data)."""
    every_rounds: Annotated[int, Field(ge=1, le=10000)] = 1
    """Sites evaluate the global model every this many rounds, and always after the last."""
    combine: Combination = "weighted"
    """How the sites' scores are combined: weighted (by examples, as one evaluation over all their data), median
    (the median site's accuracy and loss), or trimmed (without the highest and lowest site, weighted; three sites
    or more). median and trimmed keep one site's score from moving the figure and the champion."""
    outlier_distance: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = DEFAULT_OUTLIER_DISTANCE
    """A site whose accuracy is further than this from the median site's (of three or more) is named an outlier in
    the round's status and a Warning Event."""
    min_sites: Annotated[int, Field(ge=1, le=10000)] | None = None
    """With central false: the champion alias moves only on scores from at least this many sites in the last round
    (fewer: the model is registered, not promoted, and the status says why). Default: clients.minSuccessful, at most
    the number of evaluating sites (every evaluating site without minSuccessful)."""


class MlflowSpec(Model):
    """Tracking and registry: an embedded sqlite store in the work directory unless a URI is given."""

    tracking_uri: Annotated[str, Field(max_length=1024)] | None = None
    """The MLflow tracking server; none: sqlite in the training's directory."""
    experiment: Annotated[str, Field(min_length=1, max_length=256)] = "fedtrain"
    """The MLflow experiment of the training's runs."""
    registered_model_name: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """Register the final model under this name; none: log it without registering."""
    log_clients: bool = True
    """Log one nested run per client."""
    promote_champion: bool = True
    """Move the champion alias to the new version when it beats the champion on the same test set (false: leave
    promotion to a pipeline step)."""


class FederatedTrainingSpec(Model):
    """What to train, on which data, with which clients and strategy (`kubectl explain` describes each field)."""

    rounds: Annotated[int, Field(ge=1, le=10000)] = 10
    """Federated rounds: each trains the sampled clients, then aggregates their updates."""
    seed: int = 0
    """Seed of client sampling, initial weights and local training."""
    model: ModelSpec = ModelSpec()
    """The network (immutable)."""
    dataset: DatasetSpec = DatasetSpec()
    """The data set the clients share out and the test split."""
    partition: PartitionSpec = PartitionSpec()
    """How the training split is dealt out among clients."""
    clients: ClientsSpec
    """The clients: how many, or a list, and the round's quorum."""
    training: TrainingSpec = TrainingSpec()
    """Local training settings."""
    strategy: StrategySpec = StrategySpec()
    """Server-side aggregation (immutable)."""
    storage: StorageSpec = StorageSpec()
    """Where weights live."""
    worker: WorkerSpec = WorkerSpec()
    """How worker tasks run."""
    round_deadline_seconds: Annotated[int, Field(ge=10, le=7 * 24 * 3600)] = 1800
    """Seconds a round's clients have; late clients are dropped if the quorum holds."""
    stragglers: StragglerSpec = StragglerSpec()
    """What a missed quorum does."""
    mlflow: MlflowSpec = MlflowSpec()
    """Tracking and model registry."""
    privacy: PrivacySpec | None = None
    """Central differential privacy (fedavg and fedprox)."""
    evaluation: EvaluationSpec = EvaluationSpec()
    """Central and federated evaluation of the global models."""
    suspend: bool = False
    """Hold the training at the next stage boundary; false resumes it."""

    @model_validator(mode="after")
    def _cross_field(self) -> FederatedTrainingSpec:
        shared = self.clients.total - len(self.clients.own_data())
        if self.partition.scheme == "classes" and shared > self.model.num_classes:
            raise ValueError(f"partition.scheme=classes needs clients.count ({shared}) <= "
                             f"model.numClasses ({self.model.num_classes})")
        if self.dataset.synthetic is not None and self.model.num_classes != 43:
            raise ValueError("dataset.synthetic generates the 43 GTSRB classes: set model.numClasses to 43")
        self._privacy_fits()
        for index, entry in enumerate(self.clients.entries or ()):
            if entry.namespace is not None and entry.data is None:
                raise ValueError(f"clients.list[{index}].data is required: a client in namespace {entry.namespace} "
                                 "trains on its own data there; name its claim (data.claimName) and the tree "
                                 "inside it (data.path)")
            if entry.namespace is not None and self.storage.s3 is None:
                raise ValueError(f"clients.list[{index}].namespace needs storage.s3: a claim cannot be shared across "
                                 "namespaces, so weights travel through an object store")
            if entry.site is not None and (entry.namespace is not None or entry.data is not None):
                raise ValueError(f"clients.list[{index}].site cannot have namespace or data: a site runs in its own "
                                 "cluster on its own data, which its FederatedParticipation names")
        evaluating = len(self.clients.evaluating_sites())
        if self.evaluation.min_sites is not None and self.evaluation.min_sites > max(evaluating, 1):
            raise ValueError(f"evaluation.minSites ({self.evaluation.min_sites}) is more than the {evaluating} sites "
                             "that evaluate (clients.list[].site): lower it, or add evaluating sites")
        if not self.evaluation.central and not self.clients.evaluating_sites():
            raise ValueError("evaluation.central is false and no site evaluates: set evaluation.central to true, or "
                             "add sites (clients.list[].site) that evaluate")
        return self

    def _privacy_fits(self) -> None:
        """Noise needs a plain mean; secure aggregation needs a strategy of the sum and a roster that meets it."""
        privacy, name = self.privacy, self.strategy.name
        if privacy is None:
            return
        secure = privacy.secure_aggregation
        if secure is not None and name in PER_UPDATE_STRATEGIES:
            raise ValueError(f"privacy.secureAggregation cannot run strategy.name {name}: it reads each update, and "
                             f"secure aggregation shows only their sum; use {one_of(SUM_STRATEGIES)}")
        if privacy.differential and name not in ("fedavg", "fedprox"):
            raise ValueError(f"privacy needs strategy.name fedavg or fedprox, not {name}: the noise is calibrated to "
                             "a mean of clipped updates (robust strategies are the other defence; secure aggregation "
                             "without noise runs the server optimisers too)")
        if secure is None:
            return
        if secure.threshold > self.clients.round_size:
            raise ValueError(f"privacy.secureAggregation.threshold ({secure.threshold}) is more than the "
                             f"{self.clients.round_size} clients of a round (clients.perRound, default clients.count): "
                             "lower it, or add clients")
        if self.clients.round_size > SECURE_MAX_CLIENTS:
            raise ValueError(f"privacy.secureAggregation takes at most {SECURE_MAX_CLIENTS} clients per round "
                             f"(clients.perRound is {self.clients.round_size})")
        if secure.neighbours is not None and secure.threshold > secure.neighbours + 1:
            raise ValueError(f"privacy.secureAggregation.threshold ({secure.threshold}) is more than a client's share "
                             f"set (itself and {secure.neighbours} neighbours): lower it, or raise neighbours")

    def champion_sites(self) -> int:
        """How many sites must score the last model for it to be promoted on federated scores (evaluation.minSites)."""
        if self.evaluation.min_sites is not None:
            return self.evaluation.min_sites
        return max(1, min(self.clients.quorum, len(self.clients.evaluating_sites())))

    def evaluates_round(self, round_number: int) -> bool:
        """Whether the sites evaluate the global model after ``round_number``."""
        every = self.evaluation.every_rounds
        return bool(self.clients.evaluating_sites()) and (round_number % every == 0 or round_number == self.rounds)

    def needs_data(self) -> bool:
        """Whether the coordinator reads spec.dataset at all (not when sites train and evaluate everything)."""
        return self.evaluation.central or len(self.clients.own_data()) < self.clients.total


class Metadata(Model):
    """The part of ``metadata`` a training uses."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)
    name: Annotated[str, Field(pattern=DNS_LABEL, max_length=MAX_TRAINING_NAME)]
    namespace: str = "default"


class FederatedTraining(Model):
    """A whole manifest, as ``kubectl apply`` and ``fedtrain run`` read it."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    api_version: str = Field(API_VERSION, alias="apiVersion")
    kind: str = KIND
    metadata: Metadata
    spec: FederatedTrainingSpec

    @field_validator("api_version", "kind")
    @classmethod
    def _ours(cls, value: str, info: ValidationInfo) -> str:
        return identity(value, info, KIND)


def identity(value: str, info: ValidationInfo, kind: str) -> str:
    """``apiVersion`` and ``kind`` of a manifest must be this package's: the field's value, or what it must be."""
    wanted = {"api_version": API_VERSION, "kind": kind}[str(info.field_name)]
    if value != wanted:
        raise ValueError(f"must be {wanted}")
    return value


def describe_error(error: Any, prefix: list[str]) -> str:
    """One line per problem: the field path from the document's root, then what is wrong.

    ``prefix`` is ["spec"] when only a spec is validated. Every resource this package validates uses
    it, so all name their fields alike.
    """
    parts = [str(p) for p in error["loc"] if not str(p).startswith(("function-after", "tagged"))]
    path = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", ".".join(prefix + parts))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field (check its spelling; fields are camelCase)"
    elif error["type"] == "literal_error":
        message = "must be one of " + error["ctx"]["expected"].replace("'", "")
    elif error["type"] == "value_error" and re.match(r"^[a-z][A-Za-z]*\.[A-Za-z.\[\]0-9]+ ", message):
        return f"spec.{message}"  # a cross-field rule names its fields itself, relative to the spec
    return f"{path or '(document)'}: {message}"


def parse_spec(data: Any, source: str = "spec") -> FederatedTrainingSpec:
    """Validate a spec mapping (a resource's ``.spec``), raising `SpecError` that names every bad field."""
    try:
        return FederatedTrainingSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError([describe_error(e, ["spec"]) for e in error.errors()], source) from None


def parse_manifest(data: Any, source: str = "manifest") -> FederatedTraining:
    """Validate a whole manifest (apiVersion, kind, metadata, spec)."""
    if not isinstance(data, dict):
        raise SpecError(["the document must be a mapping with apiVersion, kind, metadata and spec"], source)
    try:
        return FederatedTraining.model_validate(data)
    except ValidationError as error:
        raise SpecError([describe_error(e, []) for e in error.errors()], source) from None


def load_manifest(path: Path) -> FederatedTraining:
    """Read and validate a FederatedTraining YAML file; errors name the file and each bad field."""
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except FileNotFoundError:
        raise SpecError([f"file {path} does not exist"], str(path)) from None
    except yaml.YAMLError as error:
        raise SpecError([f"not valid YAML: {error}"], str(path)) from None
    if len(documents) != 1:
        raise SpecError([f"expected one YAML document, found {len(documents)}"], str(path))
    return parse_manifest(documents[0], str(path))
