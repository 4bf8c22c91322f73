"""``fedtrain predict``: classify image files with a registered MLflow model or a local weights file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fedtrain.spec import SpecError

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


def _registered(uri: str, tracking_uri: str | None) -> tuple[Any, int]:
    """Load a registered model and the image size it was trained at (a version tag)."""
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    match = MODEL_URI.match(uri)
    if match is None:
        raise SpecError([f"--model {uri!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or a .safetensors file"])
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient()
    name = match["name"]
    version = (client.get_model_version_by_alias(name, match["alias"]) if match["alias"]
               else client.get_model_version(name, match["version"]))
    model = mlflow.pytorch.load_model(f"models:/{name}/{version.version}", map_location="cpu")
    return model, int(version.tags.get("image_size", 64))


def predict_images(model_ref: str, images: list[Path], tracking_uri: str | None) -> list[dict[str, Any]]:
    """Class id, sign name and probability for each image."""
    import torch

    from fedtrain.worker.jobs import classify, load_model_from_weights

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise SpecError([f"image {missing[0]} does not exist"])
    if model_ref.startswith("models:/"):
        model, size = _registered(model_ref, tracking_uri)
    else:
        model, config = load_model_from_weights(Path(model_ref))
        size = config.image_size
    return classify(model, size, images, torch.device("cpu"))
