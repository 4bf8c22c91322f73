"""The sample pipeline ``gtsrb-federated``: data → federated training → evaluation → promotion.

Compile it (the checked-in YAML is this command's output; a test fails when it is stale)::

    python -m fedtrain.kubeflow.pipeline samples/kubeflow/gtsrb-federated.yaml

The steps that read or write files mount the profile's claim (``store_claim``, by default the
``fedtrain-store`` claim the operator provisions) at ``/store``, where the training's worker Pods
find it too; keep ``store_path`` at ``/store`` on a cluster.
"""


import sys
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from fedtrain.kubeflow.components import (
    WORKER_IMAGE,
    evaluate_model,
    launch_federated_training,
    prepare_data,
    promote_model,
)

STORE_MOUNT = "/store"
CHECKED_IN = Path("samples/kubeflow/gtsrb-federated.yaml")


@dsl.pipeline(name="gtsrb-federated",
              description="Federated training of a GTSRB traffic-sign classifier with FedTrain, then evaluation "
                          "and promotion of the champion model.")
def gtsrb_federated(
    training_name: str = "gtsrb-federated",
    data_path: str = "",
    images_per_class: int = 60,
    test_images_per_class: int = 20,
    data_seed: int = 0,
    store_claim: str = "fedtrain-store",
    store_path: str = STORE_MOUNT,
    rounds: int = 10,
    clients: int = 4,
    strategy: str = "fedavg",
    architecture: str = "mobilenet_v3_small",
    image_size: int = 64,
    local_epochs: int = 1,
    worker_image: str = WORKER_IMAGE,
    tracking_uri: str = "http://mlflow.kubeflow.svc.cluster.local:5000",
    experiment: str = "gtsrb-federated",
    registered_model_name: str = "gtsrb-signs",
    min_accuracy: float = 0.5,
    spec_overrides: dict = {},  # noqa: B006  (a KFP default, never mutated)
    executor: str = "auto",
    timeout_hours: float = 24.0,
) -> None:
    """Prepare data, train across clients, evaluate the registered model, promote it if it is better."""
    data = prepare_data(data_path=data_path, store_path=store_path, dataset_name=training_name,
                        images_per_class=images_per_class, test_images_per_class=test_images_per_class,
                        seed=data_seed).set_caching_options(False)
    training = launch_federated_training(
        training_name=training_name, run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, data_path=data.output,
        store_path=store_path, store_claim=store_claim, rounds=rounds, clients=clients, strategy=strategy,
        architecture=architecture, image_size=image_size, local_epochs=local_epochs, worker_image=worker_image,
        tracking_uri=tracking_uri, experiment=experiment, registered_model_name=registered_model_name,
        spec_overrides=spec_overrides, executor=executor, timeout_hours=timeout_hours,
    ).set_caching_options(False)
    scored = evaluate_model(model_uri=training.outputs["model_uri"], data_path=data.output,
                            tracking_uri=tracking_uri).set_caching_options(False)
    promoted = promote_model(model_uri=training.outputs["model_uri"], accuracy=scored.outputs["accuracy"],
                             fingerprint=scored.outputs["fingerprint"], min_accuracy=min_accuracy,
                             data_path=data.output, tracking_uri=tracking_uri).set_caching_options(False)
    for task in (data, scored, promoted):
        kubernetes.mount_pvc(task, pvc_name=store_claim, mount_path=STORE_MOUNT)


def compile_pipeline(path: Path) -> None:
    """Write the pipeline's YAML (what the KFP UI uploads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(gtsrb_federated, str(path))


if __name__ == "__main__":
    compile_pipeline(Path(sys.argv[1]) if len(sys.argv) > 1 else CHECKED_IN)
