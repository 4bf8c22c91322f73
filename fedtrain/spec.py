"""The FederatedTraining spec: one typed, validated model for YAML files and the custom resource.

Field names are the resource's camelCase; defaults live here and nowhere else. Validation errors
name the field path (``spec.clients.minSuccessful``) and say what is allowed. This module imports
neither torch nor the worker: the operator uses it as is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from fedtrain.worker.layout import client_names

API_VERSION = "fedtrain.io/v1alpha1"
KIND = "FederatedTraining"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# Strategy names and their parameters; kept equal to the worker's registry by a test, so that the
# operator can validate a spec without importing the worker.
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


class SpecError(ValueError):
    """A spec that cannot run; ``problems`` holds one line per field, each naming the field path."""

    def __init__(self, problems: list[str], source: str = "spec") -> None:
        self.problems = problems
        super().__init__(f"{source}: invalid FederatedTraining:\n" + "\n".join(f"  - {p}" for p in problems))


class Model(BaseModel):
    """Shared settings: camelCase names, unknown fields rejected, immutable."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ModelSpec(Model):
    """Which network, how many classes, which input size, and how it starts."""

    architecture: Literal["mobilenet_v3_small", "mobilenet_v3_large", "tiny_cnn"] = "mobilenet_v3_small"
    num_classes: Annotated[int, Field(ge=2, le=1000)] = 43
    image_size: Annotated[int, Field(ge=16, le=512)] = 64
    pretrained_weights: Annotated[str, Field(max_length=1024)] | None = None
    fine_tune: bool = True


class SyntheticSpec(Model):
    """Generate a synthetic GTSRB-like data set instead of reading one."""

    images_per_class: Annotated[int, Field(ge=1, le=5000)] = 60
    test_images_per_class: Annotated[int, Field(ge=1, le=5000)] = 20
    frames_per_track: Annotated[int, Field(ge=1, le=30)] = 5
    seed: int = 0


class DatasetSpec(Model):
    """Where the data is: a GTSRB tree at ``path``, or ``synthetic`` (the default when neither is given)."""

    format: Literal["gtsrb"] = "gtsrb"
    path: Annotated[str, Field(max_length=1024)] | None = None
    synthetic: SyntheticSpec | None = None
    roi_crop: bool = True
    validation_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if self.path is not None and self.synthetic is not None:
            raise ValueError("give either dataset.path or dataset.synthetic, not both")
        return self


class PartitionSpec(Model):
    """How the training split is dealt out among clients."""

    scheme: Literal["iid", "dirichlet", "classes", "quantity"] = "iid"
    alpha: Annotated[float, Field(gt=0)] = 0.5
    seed: int = 0


class TrainingOverride(Model):
    """Per-client changes to the training settings."""

    local_epochs: Annotated[int, Field(ge=1)] | None = None
    batch_size: Annotated[int, Field(ge=1)] | None = None
    learning_rate: Annotated[float, Field(gt=0)] | None = None


class ClientData(Model):
    """A client's own data set: a GTSRB tree on a claim of the client's namespace (``path`` inside it)."""

    claim_name: Annotated[str, Field(pattern=DNS_LABEL, max_length=253)]
    path: Annotated[str, Field(max_length=1024)] = ""

    @model_validator(mode="after")
    def _inside_the_claim(self) -> ClientData:
        if self.path.startswith("/") or ".." in self.path.split("/"):
            raise ValueError(f"data.path {self.path!r} must be relative to the claim's root, without '..'")
        return self


class ClientEntry(Model):
    """One named client with optional overrides (Kubernetes scheduling settings apply to its Jobs).

    With ``data``, the client trains on its own data set instead of a share of ``spec.dataset``;
    with ``namespace`` too, its Jobs run there, as that namespace's ``fedtrain-worker``, and only
    weights leave it, through the object store (``spec.storage.s3``).
    """

    name: Annotated[str, Field(pattern=DNS_LABEL, max_length=40)]
    namespace: Annotated[str, Field(pattern=DNS_LABEL, max_length=63)] | None = None
    data: ClientData | None = None
    training: TrainingOverride = TrainingOverride()
    resources: dict[str, Any] | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None


class ClientsSpec(Model):
    """How many clients, how many train each round, how many must succeed for the round to count."""

    count: Annotated[int, Field(ge=1, le=1000)] | None = None
    per_round: Annotated[int, Field(ge=1)] | None = None
    min_successful: Annotated[int, Field(ge=1)] | None = None
    max_retries: Annotated[int, Field(ge=0, le=10)] = 1
    entries: tuple[ClientEntry, ...] | None = Field(None, alias="list")

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
        """Clients that train on their own data set (not on a share of ``spec.dataset``)."""
        return [c.name for c in self.entries or () if c.data is not None]

    def namespaces(self) -> dict[str, str]:
        """Client name -> namespace, for clients that run in a namespace of their own."""
        return {c.name: c.namespace for c in self.entries or () if c.namespace is not None}


class TrainingSpec(Model):
    """How each client trains in each round."""

    local_epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    optimizer: Literal["sgd", "adam"] = "adam"
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 1e-3
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    scheduler: Literal["none", "cosine"] = "none"
    restart_epochs: Annotated[int, Field(ge=1)] = 1


class StrategySpec(Model):
    """How the server aggregates, with the strategy's own parameters."""

    name: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "trimmedmean", "krum",
                  "multikrum"] = "fedavg"
    parameters: Annotated[dict[str, float], Field(max_length=8)] = {}
    max_norm_ratio: Annotated[float, Field(ge=0)] = 10.0

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


class ClaimCreate(Model):
    """A claim the operator creates for the training."""

    size: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")] = "5Gi"
    storage_class_name: Annotated[str, Field(max_length=253)] | None = None


class SecretRef(Model):
    """A Secret of the namespace a Job runs in, and which of its keys hold the S3 access key and secret."""

    name: Annotated[str, Field(pattern=DNS_LABEL, max_length=253)]
    access_key_id_key: Annotated[str, Field(min_length=1, max_length=253)] = "AWS_ACCESS_KEY_ID"
    secret_access_key_key: Annotated[str, Field(min_length=1, max_length=253)] = "AWS_SECRET_ACCESS_KEY"


class ConfigMapKeyRef(Model):
    """One key of a ConfigMap (a CA bundle)."""

    name: Annotated[str, Field(pattern=DNS_LABEL, max_length=253)]
    key: Annotated[str, Field(min_length=1, max_length=253)] = "ca.crt"


class S3Tls(Model):
    """Trust for an endpoint with a private CA; ``insecureSkipVerify`` is for test endpoints only."""

    ca_config_map: ConfigMapKeyRef | None = None
    insecure_skip_verify: bool = False


class S3Spec(Model):
    """An S3-compatible object store (AWS S3, MinIO, Ceph RGW...): trainings live under ``prefix``.

    On Kubernetes the credentials come from ``credentialsSecret``, which must exist in the training's
    namespace and in every client namespace (each organisation holds its own key). ``fedtrain run``
    reads them from its environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``).
    """

    endpoint: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/.*)?$", max_length=512)] | None = None
    bucket: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9!_.*'()/-]*$", max_length=512)] = "fedtrain"
    region: Annotated[str, Field(max_length=64)] | None = None
    addressing_style: Literal["path", "virtual"] = "path"
    credentials_secret: SecretRef | None = None
    tls: S3Tls = S3Tls()


# The fields of `StorageSpec` of which one names where weights live (camelCase, as in a raw spec).
STORAGE_KINDS = ("persistentVolumeClaim", "create", "s3", "local")


class StorageSpec(Model):
    """Where weights live: an existing claim, a claim to create, an object store, or (local runs) a directory.

    ``reclaimPolicy`` says what deleting the resource does to the training's directory on an existing
    claim: ``Retain`` keeps it (the default: weights outlive the resource), ``Delete`` removes it
    before the resource goes. A claim the operator created is owned by the training and is deleted
    with it either way.
    """

    persistent_volume_claim: ClaimRef | None = None
    create: ClaimCreate | None = None
    s3: S3Spec | None = None
    local: Annotated[str, Field(max_length=1024)] | None = None
    reclaim_policy: Literal["Retain", "Delete"] = "Retain"

    @model_validator(mode="after")
    def _one_kind(self) -> StorageSpec:
        kinds = [k for k in ("persistent_volume_claim", "create", "s3", "local") if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError("storage takes one of persistentVolumeClaim, create, s3 or local, not several")
        return self


class WorkerSpec(Model):
    """How worker tasks run: image and scheduling on Kubernetes, device and parallelism everywhere."""

    image: Annotated[str, Field(max_length=512)] = "ghcr.io/fedtrain/worker:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    resources: dict[str, Any] | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    parallelism: Annotated[int, Field(ge=1, le=256)] = 2
    # Kubernetes only, passed to every worker Pod as they are: data and weights volumes (for example
    # a claim holding GTSRB at /data), and environment (secrets by reference, e.g. MLflow credentials).
    volumes: list[dict[str, Any]] | None = None
    volume_mounts: list[dict[str, Any]] | None = None
    env: list[dict[str, Any]] | None = None

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
    max_round_retries: Annotated[int, Field(ge=0, le=10)] = 1


class PrivacySpec(Model):
    """Central differential privacy for updates leaving clients: clip to ``clipNorm``, add Gaussian noise.

    Clients clip their update (L2 norm of weights minus the global model) before it leaves; the
    aggregator clips again, averages with equal weights and adds noise of std
    ``noiseMultiplier · clipNorm / m``. The budget ε spent so far (at ``delta``) is in status.
    """

    clip_norm: Annotated[float, Field(gt=0)]
    noise_multiplier: Annotated[float, Field(ge=0, le=100)] = 1.0
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5


class MlflowSpec(Model):
    """Tracking and registry: an embedded sqlite store in the work directory unless a URI is given."""

    tracking_uri: Annotated[str, Field(max_length=1024)] | None = None
    experiment: Annotated[str, Field(min_length=1, max_length=256)] = "fedtrain"
    registered_model_name: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    log_clients: bool = True
    # Move the `champion` alias to the new version when it beats the champion on the same test set.
    # False leaves promotion to someone else (the Kubeflow pipeline's promote-model step gates it).
    promote_champion: bool = True


class FederatedTrainingSpec(Model):
    """Everything a federated training needs; see the field classes for each part."""

    rounds: Annotated[int, Field(ge=1, le=10000)] = 10
    seed: int = 0
    model: ModelSpec = ModelSpec()
    dataset: DatasetSpec = DatasetSpec()
    partition: PartitionSpec = PartitionSpec()
    clients: ClientsSpec
    training: TrainingSpec = TrainingSpec()
    strategy: StrategySpec = StrategySpec()
    storage: StorageSpec = StorageSpec()
    worker: WorkerSpec = WorkerSpec()
    round_deadline_seconds: Annotated[int, Field(ge=10, le=7 * 24 * 3600)] = 1800
    stragglers: StragglerSpec = StragglerSpec()
    mlflow: MlflowSpec = MlflowSpec()
    privacy: PrivacySpec | None = None
    suspend: bool = False

    @model_validator(mode="after")
    def _cross_field(self) -> FederatedTrainingSpec:
        shared = self.clients.total - len(self.clients.own_data())
        if self.partition.scheme == "classes" and shared > self.model.num_classes:
            raise ValueError(f"partition.scheme=classes needs clients.count ({shared}) <= "
                             f"model.numClasses ({self.model.num_classes})")
        if self.dataset.synthetic is not None and self.model.num_classes != 43:
            raise ValueError("dataset.synthetic generates the 43 GTSRB classes: set model.numClasses to 43")
        if self.privacy is not None and self.strategy.name not in ("fedavg", "fedprox"):
            raise ValueError(f"privacy needs strategy.name fedavg or fedprox, not {self.strategy.name}: the noise is "
                             "calibrated to a mean of clipped updates (robust strategies are the other defence)")
        for index, entry in enumerate(self.clients.entries or ()):
            if entry.namespace is not None and entry.data is None:
                raise ValueError(f"clients.list[{index}].data is required: a client in namespace {entry.namespace} "
                                 "trains on its own data there; name its claim (data.claimName) and the tree "
                                 "inside it (data.path)")
            if entry.namespace is not None and self.storage.s3 is None:
                raise ValueError(f"clients.list[{index}].namespace needs storage.s3: a claim cannot be shared across "
                                 "namespaces, so weights travel through an object store")
        return self


class Metadata(Model):
    """The part of ``metadata`` a training uses."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)
    name: Annotated[str, Field(pattern=DNS_LABEL, max_length=40)]
    namespace: str = "default"


class FederatedTraining(Model):
    """A whole manifest, as ``kubectl apply`` and ``fedtrain run`` read it."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    api_version: Literal["fedtrain.io/v1alpha1"] = Field("fedtrain.io/v1alpha1", alias="apiVersion")
    kind: Literal["FederatedTraining"] = "FederatedTraining"
    metadata: Metadata
    spec: FederatedTrainingSpec


def _describe(error: Any, inside_spec: bool) -> str:
    """One line per problem: the field path from the document's root, then what is wrong."""
    parts = [str(p) for p in error["loc"] if not str(p).startswith(("function-after", "tagged"))]
    path = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", ".".join((["spec"] if inside_spec else []) + parts))
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
        raise SpecError([_describe(e, inside_spec=True) for e in error.errors()], source) from None


def parse_manifest(data: Any, source: str = "manifest") -> FederatedTraining:
    """Validate a whole manifest (apiVersion, kind, metadata, spec)."""
    if not isinstance(data, dict):
        raise SpecError(["the document must be a mapping with apiVersion, kind, metadata and spec"], source)
    try:
        return FederatedTraining.model_validate(data)
    except ValidationError as error:
        raise SpecError([_describe(e, inside_spec=False) for e in error.errors()], source) from None


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
