"""The CustomResourceDefinitions, generated from the spec models: FederatedTraining and FederatedParticipation.

The OpenAPI v3 schemas come from `fedtrain.spec` and `fedtrain.sites.participation` (bounds, enums,
defaults, required fields), so the API server refuses what the Python models refuse. CEL rules add
the cross-field checks a schema cannot express. Regenerate the checked-in files with::

    python -m fedtrain.crd > crds/federatedtrainings.fedtrain.io.yaml
    python -m fedtrain.crd participation > crds/federatedparticipations.fedtrain.io.yaml

``tests/engine/test_crd.py`` fails when either file is stale.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from pydantic import BaseModel

from fedtrain.contract.sitetask import PER_UPDATE_STRATEGIES, SUM_STRATEGIES
from fedtrain.sites.participation import (
    PARTICIPATION_KIND,
    PARTICIPATION_PLURAL,
    PARTICIPATION_SHORT_NAME,
    PARTICIPATION_SINGULAR,
    ParticipationSpec,
)
from fedtrain.spec import (
    GROUP,
    KIND,
    MAX_TRAINING_NAME,
    PLURAL,
    SECURE_MAX_CLIENTS,
    SHORT_NAME,
    SINGULAR,
    STORAGE_KINDS,
    VERSION,
    FederatedTrainingSpec,
    one_of,
)

# Rules on the whole object. Kubernetes lets CEL read metadata.name (and generateName) at the root only.
ROOT_RULES: list[dict[str, str]] = [
    {"rule": f"size(self.metadata.name) <= {MAX_TRAINING_NAME}",
     "message": f"metadata.name must be at most {MAX_TRAINING_NAME} characters: it prefixes the names of the "
                "training's Jobs and claim and labels each of them"},
]
# Fields that may not change once the training exists. Each gets the default {} as well as its rule: a
# transition rule runs only where the old and the new object both have the field, so without the
# default, removing the field (or adding it to a training created without it) would bypass the rule.
IMMUTABLE = ("model", "strategy")
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
        {"rule": "[" + ", ".join(f"has(self.{kind})" for kind in STORAGE_KINDS) + "].filter(x, x).size() <= 1",
         "message": f"storage takes one of {one_of(STORAGE_KINDS)}, not several"},
    ],
    "dataset": [
        {"rule": "!(has(self.path) && has(self.synthetic))",
         "message": "give either dataset.path or dataset.synthetic, not both"},
    ],
    # A training's model and strategy cannot change under it: delete and recreate it instead.
    **{field: [{"rule": "self == oldSelf", "message": f"spec.{field} is immutable; create a new training"}]
       for field in IMMUTABLE},
}

_SECURE = "has(self.privacy) && has(self.privacy.secureAggregation)"
_ROUND_SIZE = ("(has(self.clients.perRound) ? self.clients.perRound : (has(self.clients.list) ? "
               "size(self.clients.list) : (has(self.clients.count) ? self.clients.count : 0)))")
# Rules across the spec's fields (secure aggregation against the strategy and the roster).
SPEC_RULES: list[dict[str, str]] = [
    {"rule": f"!({_SECURE}) || !has(self.strategy.name) || !(self.strategy.name in "
             f"[{', '.join(repr(n) for n in PER_UPDATE_STRATEGIES)}])",
     "message": "privacy.secureAggregation shows the aggregator only the sum of the updates: strategy.name must be "
                f"{one_of(SUM_STRATEGIES)} (a median, a trimmed mean and Krum read each update)"},
    {"rule": f"!({_SECURE}) || {_ROUND_SIZE} <= {SECURE_MAX_CLIENTS}",
     "message": f"privacy.secureAggregation takes at most {SECURE_MAX_CLIENTS} clients per round (clients.perRound, "
                "default clients.count)"},
    {"rule": f"!({_SECURE}) || self.privacy.secureAggregation.threshold <= {_ROUND_SIZE}",
     "message": "privacy.secureAggregation.threshold must be <= the clients of a round (clients.perRound, default "
                "clients.count): a round could never complete"},
    {"rule": f"!({_SECURE}) || !has(self.privacy.secureAggregation.neighbours) || "
             "self.privacy.secureAggregation.threshold <= self.privacy.secureAggregation.neighbours + 1",
     "message": "privacy.secureAggregation.threshold must be <= neighbours + 1 (a client shares its secrets with "
                "itself and its neighbours only)"},
    # Not in IMMUTABLE: privacy has no default to give it ({} would lack clipNorm), so the rule is on the spec.
    {"rule": "has(self.privacy) == has(oldSelf.privacy) && (!has(self.privacy) || self.privacy == oldSelf.privacy)",
     "message": "spec.privacy is immutable; create a new training (rounds in flight mask, clip and add noise by "
                "it, and the privacy budget is counted under it)"},
]

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Round", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Accuracy", "type": "number", "jsonPath": ".status.accuracy"},
    {"name": "Federated", "type": "number", "jsonPath": ".status.federatedAccuracy", "priority": 1},
    {"name": "Epsilon", "type": "number", "jsonPath": ".status.privacyEpsilon", "priority": 1},
    {"name": "Training-ID", "type": "string", "jsonPath": ".status.trainingId", "priority": 1},
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
        if key == "const":  # apiextensions v1 has no const: a one-value enum says the same
            out["enum"] = [value]
            continue
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


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A pydantic model's validation schema as a Kubernetes structural schema."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return dict(_structural(raw, raw.get("$defs", {})))


def spec_schema() -> dict[str, Any]:
    """The OpenAPI v3 schema of ``.spec``, with CEL rules attached."""
    schema = model_schema(FederatedTrainingSpec)
    schema["x-kubernetes-validations"] = SPEC_RULES
    for field, rules in CEL_RULES.items():
        schema["properties"][field]["x-kubernetes-validations"] = rules
    for field in IMMUTABLE:
        schema["properties"][field]["default"] = {}
    return schema


def status_schema() -> dict[str, Any]:
    """The printed status fields typed; the rest kept as written (the operator owns it)."""
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {
        "phase": {"type": "string"}, "progress": {"type": "string"}, "accuracy": {"type": "number"},
        "privacyEpsilon": {"type": "number"}, "privacyDelta": {"type": "number"},
        "federatedAccuracy": {"type": "number"}, "trainingId": {"type": "string"},
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
            "names": {"kind": KIND, "plural": PLURAL, "singular": SINGULAR, "shortNames": [SHORT_NAME],
                      "categories": ["fedtrain"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object", "required": ["spec"],
                    "description": "A federated training: rounds of client training Jobs and one aggregation Job each.",
                    "x-kubernetes-validations": ROOT_RULES,
                    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "metadata": {"type": "object"}, "spec": spec_schema(),
                                   "status": status_schema()},
                }},
            }],
        },
    }


# A participation's cross-field rules (its model's validators), each on the object it reads.
PARTICIPATION_RULES: dict[str, list[dict[str, str]]] = {
    "store": [{"rule": "has(self.s3) != has(self.local)", "message": "store takes exactly one of s3 or local"}],
    "data": [
        {"rule": "[has(self.claimName), has(self.localPath), has(self.synthetic)].filter(x, x).size() == 1",
         "message": "data takes exactly one of claimName, localPath or synthetic"},
        {"rule": "!has(self.path) || self.path == '' || has(self.claimName)",
         "message": "data.path is the folder inside data.claimName; with localPath give the whole path there"},
    ],
    "policy": [{"rule": "!has(self.maxEpsilon) || (has(self.requirePrivacy) && self.requirePrivacy)",
                "message": "policy.maxEpsilon bounds a privacy budget: set policy.requirePrivacy to true as well"}],
}
# Objects whose fields all have defaults: defaulted to {} so that the stored object shows what applies.
PARTICIPATION_DEFAULTED = ("evaluation", "worker", "policy")
PARTICIPATION_COLUMNS = [
    {"name": "Training", "type": "string", "jsonPath": ".spec.training.id"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Rounds", "type": "integer", "jsonPath": ".status.roundsDone"},
    {"name": "Accuracy", "type": "number", "jsonPath": ".status.lastAccuracy"},
    {"name": "Epsilon", "type": "number", "jsonPath": ".status.epsilon"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def participation_status_schema() -> dict[str, Any]:
    """The printed status fields typed; the rest kept as written (the site's operator owns it)."""
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {
        "phase": {"type": "string"}, "trainingPhase": {"type": "string"}, "roundsDone": {"type": "integer"},
        "lastTask": {"type": "string"}, "lastAccuracy": {"type": "number"}, "epsilon": {"type": "number"},
        "lastRefusal": {"type": "string"}, "message": {"type": "string"}, "observedGeneration": {"type": "integer"},
        "conditions": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    }}


def participation_definition() -> dict[str, Any]:
    """The FederatedParticipation CustomResourceDefinition: one site's part in one training."""
    schema = model_schema(ParticipationSpec)
    for field, rules in PARTICIPATION_RULES.items():
        schema["properties"][field]["x-kubernetes-validations"] = rules
    for field in PARTICIPATION_DEFAULTED:
        schema["properties"][field]["default"] = {}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PARTICIPATION_PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": PARTICIPATION_KIND, "plural": PARTICIPATION_PLURAL, "singular": PARTICIPATION_SINGULAR,
                      "shortNames": [PARTICIPATION_SHORT_NAME], "categories": ["fedtrain"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PARTICIPATION_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object", "required": ["spec"],
                    "description": "A site's part in a federated training run elsewhere: the training it joins "
                                   "through the object store, its own data, worker and policy.",
                    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "metadata": {"type": "object"}, "spec": schema,
                                   "status": participation_status_schema()},
                }},
            }],
        },
    }


def render(kind: str = "training") -> str:
    """A CRD as YAML (``training`` or ``participation``), with a header saying where it comes from."""
    if kind == "participation":
        header = ("# Generated by `python -m fedtrain.crd participation` from fedtrain/sites/participation.py; "
                  "do not edit by hand.\n")
        return header + yaml.safe_dump(participation_definition(), sort_keys=False, width=120)
    header = "# Generated by `python -m fedtrain.crd` from fedtrain/spec.py; do not edit by hand.\n"
    return header + yaml.safe_dump(definition(), sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render(sys.argv[1] if len(sys.argv) > 1 else "training"))
