"""The KFP pipeline: compiled YAML kept fresh, its shape, and a whole run with kfp.local on tiny data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtrain.kubeflow.pipeline import CHECKED_IN, compile_pipeline

ROOT = Path(__file__).parents[2]
STEPS = ("prepare-data", "launch-federated-training", "evaluate-model", "promote-model")


def test_checked_in_pipeline_is_fresh(tmp_path: Path) -> None:
    compile_pipeline(tmp_path / "pipeline.yaml")
    assert (ROOT / CHECKED_IN).read_text() == (tmp_path / "pipeline.yaml").read_text(), (
        "the checked-in pipeline is stale; run: python -m fedtrain.kubeflow.pipeline")


def _pipeline() -> tuple[dict[str, Any], dict[str, Any]]:
    documents = list(yaml.safe_load_all((ROOT / CHECKED_IN).read_text()))
    return documents[0], documents[1]


def test_pipeline_chains_the_four_steps_and_mounts_the_store() -> None:
    spec, platform = _pipeline()
    assert spec["pipelineInfo"]["name"] == "gtsrb-federated"
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == set(STEPS)
    assert tasks["launch-federated-training"]["dependentTasks"] == ["prepare-data"]
    assert set(tasks["evaluate-model"]["dependentTasks"]) == {"launch-federated-training", "prepare-data"}
    assert set(tasks["promote-model"]["dependentTasks"]) == {"evaluate-model", "launch-federated-training",
                                                             "prepare-data"}
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounted = {name for name, executor in executors.items() if executor.get("pvcMount")}
    assert mounted == {"exec-prepare-data", "exec-evaluate-model", "exec-promote-model"}
    for name in mounted:
        assert executors[name]["pvcMount"][0]["mountPath"] == "/store"
    for executor in spec["deploymentSpec"]["executors"].values():
        container = executor["container"]
        assert container["image"] == "ghcr.io/fedtrain/worker:0.1.0"
        assert "pip install" not in " ".join(container["command"])  # nothing is downloaded at run time


def _outputs(root: Path, step: str) -> dict[str, Any]:
    """What a kfp.local step wrote: its parameters and artifacts' metadata."""
    [found] = root.glob(f"*/{step}/executor_output.json")
    return dict(json.loads(found.read_text()))


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning")  # kfp: a non-Python base image, run here
def test_whole_pipeline_runs_locally_and_promotes_a_registered_model(tmp_path: Path, mlflow_server: str) -> None:
    from kfp import local
    from mlflow.tracking import MlflowClient

    from fedtrain.kubeflow.pipeline import gtsrb_federated
    from fedtrain.kubeflow.steps import promote

    root = tmp_path / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    gtsrb_federated(training_name="signs", images_per_class=6, test_images_per_class=2, data_seed=3,
                    store_path=str(tmp_path / "store"), rounds=2, clients=2, architecture="tiny_cnn", image_size=16,
                    tracking_uri=mlflow_server, experiment="kfp-local", registered_model_name="kfp-signs",
                    min_accuracy=0.0, executor="local",
                    spec_overrides={"worker": {"device": "cpu", "parallelism": 2}, "training": {"batchSize": 32}})

    launched = _outputs(root, "launch-federated-training")
    model_uri = launched["parameterValues"]["model_uri"]
    assert model_uri == "models:/kfp-signs/1"
    metrics = launched["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert set(metrics) == {"round-001-accuracy", "round-002-accuracy", "accuracy", "rounds"}
    assert metrics["rounds"] == 2 and metrics["accuracy"] == metrics["round-002-accuracy"]
    assert (tmp_path / "store" / "datasets" / "signs" / "fedtrain-synthetic.json").exists()

    scored = _outputs(root, "evaluate-model")["parameterValues"]
    # The registered model, loaded back from MLflow, scores what the training's last round measured.
    assert scored["accuracy"] == pytest.approx(launched["parameterValues"]["accuracy"], abs=1e-6)
    assert _outputs(root, "promote-model")["parameterValues"]["Output"] is True

    client = MlflowClient(mlflow_server, mlflow_server)
    champion = client.get_model_version_by_alias("kfp-signs", "champion")
    assert champion.version == "1" and "pipeline_accuracy" in champion.tags
    run = client.get_run(champion.run_id)
    assert run.data.tags["fedtrain.training"].startswith("signs-")  # lineage: the model's run names the training
    refused = promote(model_uri, 0.0, scored["fingerprint"], 0.5, str(tmp_path / "store" / "datasets" / "signs"),
                      mlflow_server)
    assert refused == {"promoted": False, "why": "accuracy 0.0000 is below min_accuracy 0.5000"}
