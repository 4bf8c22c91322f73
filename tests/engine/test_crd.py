"""The CRD: generated from the spec model, checked in fresh, and refusing what the spec model refuses."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from fedtrain.crd import CEL_RULES, definition, render

ROOT = Path(__file__).parents[2]
CHECKED_IN = ROOT / "crds" / "federatedtrainings.fedtrain.io.yaml"
SAMPLES = sorted(p for p in (ROOT / "samples").rglob("*.yaml") if "kubeflow" not in p.parts)  # pipelines apart


def as_json_schema(node: Any) -> Any:
    """Kubernetes OpenAPI v3 -> JSON Schema draft 4 (nullable becomes a null type; x- keys dropped)."""
    if isinstance(node, list):
        return [as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes") and k != "nullable"}
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # what `kubectl apply` (strict field validation) refuses
    return out


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft4Validator:
    schema = definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(as_json_schema(schema))


def test_checked_in_crd_is_fresh() -> None:
    assert CHECKED_IN.read_text() == render(), "run: python -m fedtrain.crd > crds/federatedtrainings.fedtrain.io.yaml"


def test_names_columns_subresource_and_rules() -> None:
    crd = yaml.safe_load(CHECKED_IN.read_text())
    assert crd["metadata"]["name"] == "federatedtrainings.fedtrain.io"
    assert crd["spec"]["names"]["shortNames"] == ["ft"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Round", "Accuracy", "Epsilon",
                                                                        "Strategy", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for field, rules in CEL_RULES.items():
        assert spec["properties"][field]["x-kubernetes-validations"] == rules
    assert spec["required"] == ["clients"]
    assert spec["properties"]["strategy"]["properties"]["name"]["enum"][0] == "fedavg"
    assert spec["properties"]["rounds"] == {"default": 10, "maximum": 10000, "minimum": 1, "type": "integer"}


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_samples_pass_the_schema(path: Path, validator: jsonschema.Draft4Validator) -> None:
    errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
    assert errors == []


def patched(**spec: Any) -> dict[str, Any]:
    manifest = yaml.safe_load((ROOT / "samples" / "gtsrb-fedavg-local.yaml").read_text())
    manifest = copy.deepcopy(manifest)
    manifest["spec"].update(spec)
    return manifest


@pytest.mark.parametrize(("manifest", "fragment"), [
    (patched(rounds=0), "less than the minimum of 1"),
    (patched(rounds="ten"), "is not of type"),
    (patched(strategy={"name": "fedsgd"}), "is not one of"),
    (patched(model={"architecture": "resnet50"}), "is not one of"),
    (patched(model={"imageSize": 8}), "less than the minimum of 16"),
    (patched(training={"learningRate": 0}), "less than or equal to the minimum of 0"),
    (patched(clients={"count": 2, "list": [{"name": "Bad_Name"}]}), "does not match"),
    (patched(partition={"scheme": "random"}), "is not one of"),
    (patched(modell={}), "Additional properties are not allowed"),
    ({"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedTraining", "metadata": {"name": "x"}},
     "'spec' is a required property"),
    (patched(clients={"perRound": 2}) | {"spec": {"rounds": 1}}, "'clients' is a required property"),
])
def test_bad_manifests_are_refused(manifest: dict[str, Any], fragment: str,
                                   validator: jsonschema.Draft4Validator) -> None:
    messages = [e.message for e in validator.iter_errors(manifest)]
    assert any(fragment in m for m in messages), messages
