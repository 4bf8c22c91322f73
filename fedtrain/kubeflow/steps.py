"""What the Kubeflow pipeline's steps do, as plain functions (the KFP components only call these).

Kept apart from ``kfp`` so that they are tested directly, and so that a step does the same thing in
a Kubeflow Pod and under ``kfp.local``. ``launch`` runs a FederatedTraining either through the
operator (``executor="kubernetes"``: create the resource in the pipeline's namespace, wait for its
``Succeeded`` or ``Failed`` condition) or on this machine through the local runner
(``executor="local"``), which is what ``kfp.local.SubprocessRunner`` uses.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtrain.engine.status import TrainingStatus
from fedtrain.spec import API_VERSION, KIND, SpecError, parse_manifest

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
LABEL_PIPELINE_RUN = "fedtrain.io/pipeline-run"
SYNTH_MARKER = "fedtrain-synthetic.json"


class TrainingFailed(RuntimeError):
    """The training ended Failed: the message is the resource's (reason and what went wrong)."""


@dataclass
class LaunchResult:
    """What a finished training gives the pipeline."""

    name: str
    namespace: str
    model_uri: str
    accuracy: float
    rounds: list[dict[str, Any]] = field(default_factory=list)  # {"round", "accuracy", "loss"}


def training_name(base: str, run: str) -> str:
    """``<base>-<hash of the pipeline run>``: one resource per run, the same one when a step is retried."""
    digest = hashlib.sha256(run.encode()).hexdigest()[:8]
    return f"{base[:31].rstrip('-')}-{digest}"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def training_manifest(name: str, namespace: str, run: str, spec: dict[str, Any],
                      overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A validated FederatedTraining manifest; a bad input raises `SpecError` naming the field."""
    manifest = {"apiVersion": API_VERSION, "kind": KIND,
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {LABEL_PIPELINE_RUN: hashlib.sha256(run.encode()).hexdigest()[:16]}},
                "spec": _merge(spec, overrides or {})}
    parse_manifest(manifest, f"FederatedTraining {namespace}/{name}")
    return manifest


def pipeline_namespace() -> str:
    """The namespace this Pod runs in (a Kubeflow profile's), else the kubeconfig's, else ``default``."""
    if SERVICE_ACCOUNT_NAMESPACE.exists():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    try:
        import kubernetes

        _, active = kubernetes.config.list_kube_config_contexts()
        return str(active["context"].get("namespace") or "default")
    except Exception:  # no kubeconfig: a local run
        return "default"


def pick_executor(executor: str) -> str:
    """``auto``: the operator when running in a cluster Pod, else this machine."""
    if executor not in ("auto", "kubernetes", "local"):
        raise SpecError([f"executor: {executor!r} is not one of auto, kubernetes, local"])
    if executor != "auto":
        return executor
    return "kubernetes" if os.environ.get("KUBERNETES_SERVICE_HOST") else "local"


def result_from(name: str, namespace: str, status: TrainingStatus, registered_name: str | None) -> LaunchResult:
    """A finished status as pipeline outputs (the registered version's URI when there is one)."""
    if status.phase != "Succeeded":
        raise TrainingFailed(f"FederatedTraining {namespace}/{name} ended {status.phase}"
                             f"{f' ({status.reason})' if status.reason else ''}: {status.message}")
    if registered_name and status.model_version:
        uri = f"models:/{registered_name}/{status.model_version}"
    else:
        uri = status.model_uri or ""
    rounds = [{"round": r.round, "accuracy": r.accuracy, "loss": r.loss} for r in status.rounds]
    last = rounds[-1]["accuracy"] if rounds else None  # full precision; status.accuracy is rounded for display
    return LaunchResult(name, namespace, uri, float(last if last is not None else status.accuracy or 0.0), rounds)


def launch_locally(manifest: dict[str, Any], workdir: Path) -> LaunchResult:
    """Run the training on this machine (the local runner: same engine, same worker commands)."""
    from fedtrain.local.runner import RunOptions, run_training

    parsed = parse_manifest(manifest)
    result = run_training(parsed, RunOptions(workdir=workdir))
    return result_from(parsed.metadata.name, parsed.metadata.namespace, result.status,
                       parsed.spec.mlflow.registered_model_name)


async def launch_on_cluster(manifest: dict[str, Any], timeout_s: float, poll_s: float = 5.0,
                            report: Callable[[str], None] = print) -> LaunchResult:
    """Create the FederatedTraining (or find this run's), then wait for ``Succeeded`` or ``Failed``."""
    from fedtrain.operator.kube import ApiError, Kube, Paths

    meta = manifest["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    kube = Kube.from_environment()
    try:
        try:
            await kube.create(Paths.training(namespace), manifest)
            report(f"created FederatedTraining {namespace}/{name}")
        except ApiError as error:
            if error.status != 409:
                raise
            existing = await kube.get(Paths.training(namespace, name))
            if (existing["metadata"].get("labels") or {}).get(LABEL_PIPELINE_RUN) != meta["labels"][LABEL_PIPELINE_RUN]:
                raise SpecError([f"training_name: a FederatedTraining {namespace}/{name} exists and belongs to "
                                 "another run; choose another training_name"]) from None
            report(f"found FederatedTraining {namespace}/{name} from an earlier attempt of this run; waiting for it")
        deadline, shown = time.monotonic() + timeout_s, ("", "")
        while True:
            resource = await kube.get(Paths.training(namespace, name))
            status = TrainingStatus.model_validate(resource.get("status") or {})
            if (status.phase, status.progress) != shown:
                shown = (status.phase, status.progress)
                report(f"{status.phase} round {status.progress}: {status.message}")
            if finished(status):
                return result_from(name, namespace, status, manifest["spec"].get("mlflow", {})
                                   .get("registeredModelName"))
            if time.monotonic() > deadline:
                raise TrainingFailed(f"FederatedTraining {namespace}/{name} did not finish within {timeout_s:.0f} s "
                                     f"(last: {status.phase} {status.progress}); it goes on running: delete it or "
                                     "raise timeout_hours")
            await asyncio.sleep(poll_s)
    finally:
        kube.close()


def finished(status: TrainingStatus) -> bool:
    """Whether the ``Succeeded`` or ``Failed`` condition is True."""
    return any(c.type in ("Succeeded", "Failed") and c.status == "True" for c in status.conditions)


def prepare_data(data_path: str, store_path: str, dataset_name: str, images_per_class: int,
                 test_images_per_class: int, seed: int) -> dict[str, Any]:
    """A GTSRB tree to train on: ``data_path`` checked as is, or a synthetic one made (once) on the store."""
    from fedtrain.worker.data.gtsrb import load_tree
    from fedtrain.worker.data.synth import SynthConfig, generate

    if data_path:
        root = Path(data_path)
        if not root.is_dir():
            raise SpecError([f"data_path: {data_path} is not a directory; give a GTSRB tree, or leave it empty to "
                             "generate synthetic data"])
    else:
        root = Path(store_path) / "datasets" / dataset_name
        config = SynthConfig(images_per_class, test_images_per_class, seed=seed)
        wanted = {"imagesPerClass": images_per_class, "testImagesPerClass": test_images_per_class, "seed": seed}
        marker = root / SYNTH_MARKER
        if not marker.exists() or json.loads(marker.read_text()) != wanted:
            generate(root, config)
            marker.write_text(json.dumps(wanted))
    tree = load_tree(root, need_test=True)
    return {"path": str(root), "train_images": len(tree.train), "test_images": len(tree.test),
            "classes": len({s.class_id for s in tree.train})}


def _registered_version(client: Any, model_uri: str) -> Any:
    from fedtrain.local.predict import MODEL_URI

    match = MODEL_URI.match(model_uri)
    if match is None or not match["version"]:
        raise SpecError([f"model_uri: {model_uri!r} is not models:/NAME/VERSION (register the model: set "
                         "registered_model_name)"])
    return client.get_model_version(match["name"], match["version"])


def evaluate_registered(model_uri: str, data_path: str, tracking_uri: str) -> dict[str, Any]:
    """Score a registered model on the test split of ``data_path``: accuracy, loss and the test set's fingerprint."""
    import mlflow.pytorch
    import torch
    from mlflow.tracking import MlflowClient

    from fedtrain.worker.data.gtsrb import load_tree
    from fedtrain.worker.data.images import load_samples
    from fedtrain.worker.finalize import test_fingerprint
    from fedtrain.worker.training import evaluate

    client = MlflowClient(tracking_uri, tracking_uri)
    version = _registered_version(client, model_uri)
    tags = version.tags or {}
    num_classes, size = int(tags.get("num_classes", 43)), int(tags.get("image_size", 64))
    tree = load_tree(Path(data_path), num_classes, need_test=True)
    images, labels = load_samples(tree, list(tree.test), size, True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    model = mlflow.pytorch.load_model(f"models:/{version.name}/{version.version}", map_location="cpu")
    scored = evaluate(model, images, labels, num_classes, device=torch.device("cpu"))
    return {"accuracy": float(scored.accuracy), "loss": float(scored.loss), "fingerprint": test_fingerprint(tree),
            "test_images": len(tree.test)}


def promote(model_uri: str, accuracy: float, fingerprint: str, min_accuracy: float, data_path: str,
            tracking_uri: str) -> dict[str, Any]:
    """Move ``champion`` to the model if it reaches ``min_accuracy`` and beats the champion on the same test set."""
    from mlflow.tracking import MlflowClient

    from fedtrain.worker.tracking import promote_champion

    client = MlflowClient(tracking_uri, tracking_uri)
    version = _registered_version(client, model_uri)
    if accuracy < min_accuracy:
        return {"promoted": False, "why": f"accuracy {accuracy:.4f} is below min_accuracy {min_accuracy:.4f}"}
    client.set_model_version_tag(version.name, version.version, "pipeline_accuracy", f"{accuracy:.6f}")

    def score_champion(uri: str) -> float:
        return float(evaluate_registered(uri, data_path, tracking_uri)["accuracy"])

    promoted = promote_champion(client, version.name, str(version.version), accuracy, fingerprint, score_champion)
    why = "it beats the champion" if promoted else "the champion scores at least as well on the same test set"
    return {"promoted": promoted, "why": why}
