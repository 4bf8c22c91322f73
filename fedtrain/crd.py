"""The FederatedTraining CustomResourceDefinition, generated from the spec model.

The OpenAPI v3 schema comes from `fedtrain.spec` (bounds, enums, defaults, required fields), so the
API server refuses what the Python model refuses. CEL rules add the cross-field checks a schema
cannot express. Regenerate the checked-in file with::

    python -m fedtrain.crd > crds/federatedtrainings.fedtrain.io.yaml

``tests/engine/test_crd.py`` fails when that file is stale.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from fedtrain.spec import FederatedTrainingSpec

GROUP, VERSION, KIND, PLURAL, SINGULAR = "fedtrain.io", "v1alpha1", "FederatedTraining", "federatedtrainings", \
    "federatedtraining"

# Rules the schema cannot say, each on the object it reads (names as in the resource).
CEL_RULES: dict[str, list[dict[str, str]]] = {
    "clients": [
        {"rule": "has(self.count) || has(self.list)", "message": "give clients.count or clients.list"},
        {"rule": "!has(self.count) || !has(self.list) || self.count == size(self.list)",
         "message": "clients.count differs from the number of entries of clients.list"},
        {"rule": "!has(self.perRound) || (has(self.list) ? self.perRound <= size(self.list) : "
                 "self.perRound <= self.count)",
         "message": "clients.perRound must be <= clients.count"},
        {"rule": "!has(self.minSuccessful) || (has(self.perRound) ? self.minSuccessful <= self.perRound : "
                 "(has(self.list) ? self.minSuccessful <= size(self.list) : self.minSuccessful <= self.count))",
         "message": "clients.minSuccessful must be <= clients.perRound (which defaults to clients.count)"},
    ],
    "storage": [
        {"rule": "[has(self.persistentVolumeClaim), has(self.create), has(self.local)].filter(x, x).size() <= 1",
         "message": "storage takes one of persistentVolumeClaim, create or local, not several"},
    ],
    "dataset": [
        {"rule": "!(has(self.path) && has(self.synthetic))",
         "message": "give either dataset.path or dataset.synthetic, not both"},
    ],
    # A training's model and strategy cannot change under it: delete and recreate it instead.
    "model": [{"rule": "self == oldSelf", "message": "spec.model is immutable; create a new training"}],
    "strategy": [{"rule": "self == oldSelf", "message": "spec.strategy is immutable; create a new training"}],
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Round", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Accuracy", "type": "number", "format": "float", "jsonPath": ".status.accuracy"},
    {"name": "Epsilon", "type": "number", "format": "float", "jsonPath": ".status.privacyEpsilon", "priority": 1},
    {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy.name"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _structural(node: Any, definitions: dict[str, Any]) -> Any:
    """Turn pydantic's JSON Schema into a Kubernetes structural schema, recursively."""
    if isinstance(node, list):
        return [_structural(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        resolved = copy.deepcopy(definitions[node["$ref"].rsplit("/", 1)[1]])
        return _structural({**resolved, **{k: v for k, v in node.items() if k != "$ref"}}, definitions)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o != {"type": "null"}]
        if len(options) == 1 and len(options) < len(node["anyOf"]):
            merged = {**{k: v for k, v in node.items() if k != "anyOf"}, **options[0], "nullable": True}
            return _structural(merged, definitions)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs") or (key == "additionalProperties" and value is False):
            continue
        if key == "default" and (value is None or isinstance(value, dict | list)):
            continue  # objects default through their fields; null is no default
        if key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
            continue
        if key == "properties":
            out[key] = {name: _structural(prop, definitions) for name, prop in value.items()}
            continue
        out[key] = _structural(value, definitions)
    if out.get("type") == "object" and "properties" not in out and out.get("additionalProperties") in (None, True, {}):
        out.pop("additionalProperties", None)
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def spec_schema() -> dict[str, Any]:
    """The OpenAPI v3 schema of ``.spec``, with CEL rules attached."""
    raw = FederatedTrainingSpec.model_json_schema(by_alias=True, mode="validation")
    schema = _structural(raw, raw.get("$defs", {}))
    for field, rules in CEL_RULES.items():
        schema["properties"][field]["x-kubernetes-validations"] = rules
    return schema


def status_schema() -> dict[str, Any]:
    """The printed status fields typed; the rest kept as written (the operator owns it)."""
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {
        "phase": {"type": "string"}, "progress": {"type": "string"}, "accuracy": {"type": "number"},
        "privacyEpsilon": {"type": "number"}, "privacyDelta": {"type": "number"},
        "currentRound": {"type": "integer"}, "observedGeneration": {"type": "integer"},
        "conditions": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    }}


def definition() -> dict[str, Any]:
    """The whole CustomResourceDefinition."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": SINGULAR, "shortNames": ["ft"],
                      "categories": ["fedtrain"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object", "required": ["spec"],
                    "description": "A federated training: rounds of client training Jobs and one aggregation Job each.",
                    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "metadata": {"type": "object"}, "spec": spec_schema(),
                                   "status": status_schema()},
                }},
            }],
        },
    }


def render() -> str:
    """The CRD as YAML, with a header saying where it comes from."""
    header = "# Generated by `python -m fedtrain.crd` from fedtrain/spec.py; do not edit by hand.\n"
    return header + yaml.safe_dump(definition(), sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render())
