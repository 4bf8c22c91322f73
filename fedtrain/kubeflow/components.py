"""KFP v2 components. Each runs in the worker image and calls `fedtrain.kubeflow.steps`.

KFP reads the annotations (so no ``from __future__ import annotations`` here) and ships a
component's function source into its Pod, so each body imports what it needs itself.
``install_kfp_package=False``: the worker image has kfp already (nothing is installed at run time,
which an air-gapped cluster could not do anyway).
"""


from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Metrics, Output

from fedtrain.spec import DEFAULT_WORKER_IMAGE as WORKER_IMAGE


@dsl.component(base_image=WORKER_IMAGE, install_kfp_package=False)
def prepare_data(data_path: str, store_path: str, dataset_name: str, images_per_class: int,
                 test_images_per_class: int, seed: int) -> str:
    """Check the GTSRB tree at ``data_path``, or generate a synthetic one on the store; output its path."""
    from fedtrain.kubeflow.steps import prepare_data as prepare

    found = prepare(data_path, store_path, dataset_name, images_per_class, test_images_per_class, seed)
    print(f"data set {found['path']}: {found['train_images']} training and {found['test_images']} test images, "
          f"{found['classes']} classes")
    return str(found["path"])


@dsl.component(base_image=WORKER_IMAGE, install_kfp_package=False)
def launch_federated_training(
    training_name: str, run_name: str, data_path: str, store_path: str, store_claim: str, rounds: int,
    clients: int, strategy: str, architecture: str, image_size: int, local_epochs: int, worker_image: str,
    tracking_uri: str, experiment: str, registered_model_name: str, spec_overrides: dict, executor: str,
    timeout_hours: float, metrics: Output[Metrics],
) -> NamedTuple("Outputs", [("model_uri", str), ("accuracy", float), ("training", str)]):
    """Create a FederatedTraining from the inputs, wait for Succeeded or Failed, output metrics and the model URI.

    On a cluster the operator runs it in this Pod's namespace (``executor=kubernetes``, or ``auto`` in a
    Pod); elsewhere the local runner does (``executor=local``, or ``auto`` outside Kubernetes).
    """
    import asyncio
    from collections import namedtuple
    from pathlib import Path

    from fedtrain.kubeflow import steps

    where = steps.pick_executor(executor)
    name = steps.training_name(training_name, run_name)
    namespace = steps.pipeline_namespace() if where == "kubernetes" else "default"
    storage = ({"persistentVolumeClaim": {"claimName": store_claim}} if where == "kubernetes"
               else {"local": str(Path(store_path) / "runs" / name)})
    spec = {"rounds": rounds, "clients": {"count": clients}, "strategy": {"name": strategy},
            "model": {"architecture": architecture, "numClasses": 43, "imageSize": image_size},
            "dataset": {"path": data_path}, "training": {"localEpochs": local_epochs}, "storage": storage,
            "worker": {"image": worker_image},
            "mlflow": {"experiment": experiment, "promoteChampion": False,
                       **({"trackingUri": tracking_uri} if tracking_uri else {}),
                       **({"registeredModelName": registered_model_name} if registered_model_name else {})}}
    manifest = steps.training_manifest(name, namespace, run_name, spec, spec_overrides)
    if where == "kubernetes":
        result = asyncio.run(steps.launch_on_cluster(manifest, timeout_hours * 3600))
    else:
        result = steps.launch_locally(manifest, Path(storage["local"]))
    for record in result.rounds:
        if record["accuracy"] is not None:
            metrics.log_metric(f"round-{record['round']:03d}-accuracy", float(record["accuracy"]))
    metrics.log_metric("accuracy", result.accuracy)
    metrics.log_metric("rounds", float(len(result.rounds)))
    print(f"FederatedTraining {result.namespace}/{result.name} succeeded: accuracy {result.accuracy:.4f}, "
          f"model {result.model_uri}")
    outputs = namedtuple("Outputs", ["model_uri", "accuracy", "training"])
    return outputs(result.model_uri, result.accuracy, f"{result.namespace}/{result.name}")


@dsl.component(base_image=WORKER_IMAGE, install_kfp_package=False)
def evaluate_model(model_uri: str, data_path: str, tracking_uri: str, metrics: Output[Metrics]
                   ) -> NamedTuple("Outputs", [("accuracy", float), ("fingerprint", str)]):
    """Score a registered model (models:/NAME/VERSION) on the test split of the data set."""
    from collections import namedtuple

    from fedtrain.kubeflow.steps import evaluate_registered

    scored = evaluate_registered(model_uri, data_path, tracking_uri)
    metrics.log_metric("accuracy", scored["accuracy"])
    metrics.log_metric("loss", scored["loss"])
    metrics.log_metric("test_images", float(scored["test_images"]))
    print(f"{model_uri}: accuracy {scored['accuracy']:.4f} on {scored['test_images']} test images")
    return namedtuple("Outputs", ["accuracy", "fingerprint"])(scored["accuracy"], scored["fingerprint"])


@dsl.component(base_image=WORKER_IMAGE, install_kfp_package=False)
def promote_model(model_uri: str, accuracy: float, fingerprint: str, min_accuracy: float, data_path: str,
                  tracking_uri: str) -> bool:
    """Move the ``champion`` alias to the model if it reaches ``min_accuracy`` and beats the champion."""
    from fedtrain.kubeflow.steps import promote

    decided = promote(model_uri, accuracy, fingerprint, min_accuracy, data_path, tracking_uri)
    print(f"{model_uri}: {'promoted to champion' if decided['promoted'] else 'not promoted'} ({decided['why']})")
    return bool(decided["promoted"])
