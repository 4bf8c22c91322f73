"""The last task of a training: final model and plots in storage, then everything into MLflow.

Tracking failures never fail the task: the model and plots are already safe in storage, and the
report says what could not be logged (the engine turns that into a Degraded condition).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtrain.worker.data.gtsrb import GtsrbTree
from fedtrain.worker.jobs import Workspace
from fedtrain.worker.models import build_model
from fedtrain.worker.plots import plot_confusion, plot_per_round
from fedtrain.worker.storage import iterate_keys
from fedtrain.worker.tracking import Tracker, TrackingReport, TrainingIdentity
from fedtrain.worker.training import evaluate, load_numpy_state
from fedtrain.worker.weights import read_json, read_weights, sidecar_of, write_json

PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1"]


@dataclass(frozen=True)
class TrackingConfig:
    """Where and under which names to track; ``uri=None`` skips tracking."""

    uri: str | None
    experiment: str = "fedtrain"
    registered_model_name: str | None = None
    log_clients: bool = False
    promote: bool = True  # move the champion alias when the new version beats it


def test_fingerprint(tree: GtsrbTree) -> str:
    """Identifies a test set by its samples, labels and file sizes: equal fingerprints, same test set."""
    digest = hashlib.sha256()
    for sample in tree.test:
        digest.update(f"{sample.sample_id}:{sample.class_id}:{tree.path_of(sample).stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def finalize(workspace: Workspace, last_round: int, identity: TrainingIdentity, tracking: TrackingConfig,
             device: torch.device) -> dict[str, Any]:
    """Write ``final/`` (model, plots, summary) and track the training; return what the engine records."""
    layout, store = workspace.layout, workspace.store
    final = layout.final_dir
    source = layout.global_weights(last_round)
    store.write_bytes(f"{final}/model.json", store.read_bytes(sidecar_of(source)))  # sidecar first: its sha256
    store.write_bytes(f"{final}/model.safetensors", store.read_bytes(source))  # is checked against this copy
    results = [read_json(store, layout.result(r)) for r in range(1, last_round + 1) if store.exists(layout.result(r))]
    with tempfile.TemporaryDirectory(prefix="fedtrain-final-") as scratch:
        plots = _plots(Path(scratch), results)
        for plot in plots:
            store.upload(f"{final}/plots/{plot.name}", plot)
        store.download(f"{final}/model.json", Path(scratch) / "model.json")
        summary: dict[str, Any] = {"rounds": last_round, "model_path": store.describe(f"{final}/model.safetensors"),
                                   "accuracy": results[-1].get("accuracy") if results else None,
                                   "plots": [store.describe(f"{final}/plots/{p.name}") for p in plots]}
        if tracking.uri:
            report = _track(workspace, last_round, identity, tracking, results,
                            [*plots, Path(scratch) / "model.json"], device)
            summary.update({"run_id": report.run_id, "model_uri": report.model_uri,
                            "model_version": report.model_version, "champion": report.champion,
                            "not_logged": report.not_logged, "tracking_error": report.error})
    write_json(store, f"{final}/summary.json", summary)
    return summary


def _plots(folder: Path, results: list[dict[str, Any]]) -> list[Path]:
    rounds = [int(r["round"]) for r in results]
    plots = []
    if results and all("accuracy" in r for r in results):
        plots.append(plot_per_round(folder / "accuracy.png", rounds, [r["accuracy"] for r in results],
                                    "test accuracy", "Global model accuracy per round"))
        plots.append(plot_per_round(folder / "loss.png", rounds, [r["loss"] for r in results],
                                    "test loss", "Global model loss per round"))
    if results and "confusion" in results[-1]:
        plots.append(plot_confusion(folder / "confusion.png", results[-1]["confusion"],
                                    f"Confusion matrix after round {rounds[-1]}"))
    return plots


def _client_history(workspace: Workspace, last_round: int) -> dict[str, list[tuple[int, dict[str, float]]]]:
    history: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for round_number in range(1, last_round + 1):
        for key in iterate_keys(workspace.store, workspace.layout.client_dir(round_number), ".json"):
            meta = read_json(workspace.store, key)
            metrics = {k: v for k, v in meta.get("metrics", {}).items() if isinstance(v, int | float)}
            metrics["num_examples"] = float(meta.get("num_examples", 0))
            history.setdefault(key.rsplit("/", 1)[-1].removesuffix(".json"), []).append((round_number, metrics))
    return history


def _track(workspace: Workspace, last_round: int, identity: TrainingIdentity, tracking: TrackingConfig,
           results: list[dict[str, Any]], plots: list[Any], device: torch.device) -> TrackingReport:
    report = TrackingReport()
    assert tracking.uri is not None
    # An sqlite store keeps its artifacts beside its database file (the server's store decides otherwise).
    artifact_root = Path(tracking.uri.removeprefix("sqlite:///")).parent / "mlartifacts" \
        if tracking.uri.startswith("sqlite:///") else None
    try:
        tracker = Tracker(tracking.uri, tracking.experiment, identity, artifact_root)
        report.run_id = tracker.parent_run()
    except Exception as error:
        report.not_logged["run"] = _short(error)
        report.not_logged["metrics"] = "no run"
        report.not_logged["model"] = "no run"
        return report
    steps: list[tuple[str, Any]] = [
        ("metrics", lambda: tracker.round_metrics(report.run_id, results)),
        ("plots", lambda: tracker.artifacts(report.run_id, plots)),
    ]
    if tracking.log_clients:
        steps.append(("client runs", lambda: tracker.client_runs(report.run_id, _client_history(workspace,
                                                                                                 last_round))))
    for what, step in steps:
        try:
            step()
        except Exception as error:
            report.not_logged[what] = _short(error)
    try:
        _log_model(workspace, last_round, identity, tracking, tracker, report, results, device)
    except Exception as error:
        report.not_logged["model"] = _short(error)
    try:
        tracker.finish(report.run_id)
    except Exception as error:
        report.not_logged["run end"] = _short(error)
    return report


def _log_model(workspace: Workspace, last_round: int, identity: TrainingIdentity, tracking: TrackingConfig,
               tracker: Tracker, report: TrackingReport, results: list[dict[str, Any]], device: torch.device) -> None:
    weights, _ = read_weights(workspace.store, workspace.layout.global_weights(last_round))
    model = build_model(workspace.model)
    load_numpy_state(model, weights)
    model.eval()
    size = workspace.model.image_size
    example = np.zeros((2, 3, size, size), dtype=np.float32)  # batch 2: batch 1 would be exported as fixed
    tree = workspace.tree(need_test=True)
    fingerprint = test_fingerprint(tree)
    accuracy = float(results[-1]["accuracy"]) if results and "accuracy" in results[-1] else 0.0
    tags = {"training": identity.key, "strategy": identity.strategy, "rounds": str(last_round),
            "partition": str(identity.spec.get("partition", {}).get("scheme")), "test_fingerprint": fingerprint,
            "accuracy": f"{accuracy:.6f}", "architecture": workspace.model.architecture, "image_size": str(size),
            "num_classes": str(workspace.model.num_classes)}
    report.model_uri, report.model_version = tracker.model(report.run_id, model, example,
                                                           tracking.registered_model_name, tags, PIP_REQUIREMENTS)
    if tracking.registered_model_name and report.model_version and tracking.promote:
        def score_champion(uri: str) -> float:
            import mlflow.pytorch

            champion = mlflow.pytorch.load_model(uri, map_location="cpu")
            images, labels = workspace.arrays(tree, list(tree.test))
            return evaluate(champion, images, labels, workspace.model.num_classes, device=device).accuracy

        report.champion = tracker.promote(tracking.registered_model_name, report.model_version, accuracy,
                                          fingerprint, score_champion)


def _short(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
