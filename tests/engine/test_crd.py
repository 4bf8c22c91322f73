"""The CRD: generated from the spec model, checked in fresh, installable, and admitting what a real API server would.

Admission runs through `tests.apiserver_rules`: strict decoding, defaults, the OpenAPI schema and every
CEL rule evaluated by a real CEL runtime, with the stored object for transition rules.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtrain.crd import definition, render
from fedtrain.spec import MAX_TRAINING_NAME, STORAGE_KINDS
from tests.apiserver_rules import CRD_FILE, Refused, admit, load_crd, root_schema, rules_of, schema_problems

ROOT = Path(__file__).parents[2]
PARTICIPATION_FILE = ROOT / "crds" / "federatedparticipations.fedtrain.io.yaml"
SAMPLES = sorted(p for p in (ROOT / "samples").rglob("*.yaml") if "kubeflow" not in p.parts)  # pipelines apart


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    """The checked-in CRD: what ``kubectl apply -k deploy/`` installs."""
    return load_crd()


def test_checked_in_crd_is_fresh() -> None:
    assert CRD_FILE.read_text() == render(), "run: python -m fedtrain.crd > crds/federatedtrainings.fedtrain.io.yaml"


def test_crd_is_accepted_by_the_api_server(crd: dict[str, Any]) -> None:
    """Only JSONSchemaProps keywords, a structural schema, defaults that pass their schema, rules that compile."""
    assert schema_problems(definition()) == []
    assert schema_problems(crd) == []


def schema_with(path: list[str], **node: Any) -> dict[str, Any]:
    """The generated CRD with ``node``'s keys set (``None``: removed) on the schema node at ``path``."""
    changed = definition()
    target = root_schema(changed)
    for name in path:
        target = target["properties"][name]
    target.update(node)
    for key in [k for k, v in node.items() if v is None]:
        del target[key]
    return changed


@pytest.mark.parametrize(("crd_changed", "fragment"), [
    (schema_with(["spec", "dataset", "format"], const="gtsrb"),
     'strict decoding error: unknown field "spec.versions[0].schema.openAPIV3Schema.properties.spec.properties.'
     'dataset.properties.format.const"'),
    (schema_with(["spec", "rounds"], type=None), "must not be empty for specified object fields"),
    (schema_with(["spec", "worker", "nodeSelector"], properties={"zone": {"type": "string"}}),
     "additionalProperties and properties are mutual exclusive"),
    (schema_with(["spec", "rounds"], default=0), "should be greater than or equal to 1"),
    (schema_with(["spec", "model"], default={"layers": 3}), "must not have unknown fields"),
    (schema_with(["spec", "clients"], default={}), "give clients.count or clients.list"),
    (schema_with(["spec", "worker", "env"], uniqueItems=True), "uniqueItems cannot be set to true"),
    (schema_with(["metadata"], properties={"name": {"type": "string"}, "labels": {"type": "object"}}),
     "must not specify anything other than name and generateName"),
    (schema_with(["spec", "worker", "tolerations"], items={
        "type": "object", "x-kubernetes-preserve-unknown-fields": True,
        "x-kubernetes-validations": [{"rule": "self == oldSelf"}]}),
     "oldSelf cannot be used on the uncorrelatable portion of the schema"),
    (schema_with(["spec", "storage"], **{"x-kubernetes-validations": [{"rule": "self.local ==", "message": "m"}]}),
     "compilation failed"),
], ids=["const", "no-type", "properties-and-additionalProperties", "bad-default", "unknown-field-in-default",
        "default-breaking-a-rule", "uniqueItems", "metadata-fields", "oldSelf-in-list-items", "rule-syntax"])
def test_schema_problems_finds_what_the_api_server_refuses(crd_changed: dict[str, Any], fragment: str) -> None:
    problems = schema_problems(crd_changed)
    assert any(fragment in p for p in problems), problems


def test_names_columns_and_subresource(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "federatedtrainings.fedtrain.io"
    assert crd["spec"]["names"]["shortNames"] == ["ft"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase", "Round", "Accuracy", "Federated", "Epsilon", "Training-ID", "Strategy", "Age"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    for column in version["additionalPrinterColumns"]:  # each status column reads a field the status has
        path = column["jsonPath"].split(".")
        if path[1] == "status":
            assert path[2] in status["properties"], path
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["clients"]
    assert spec["properties"]["strategy"]["properties"]["name"]["enum"][0] == "fedavg"
    assert {k: spec["properties"]["rounds"][k] for k in ("default", "minimum", "maximum", "type")} == \
        {"default": 10, "minimum": 1, "maximum": 10000, "type": "integer"}


def test_every_spec_field_is_described(crd: dict[str, Any]) -> None:
    """``kubectl explain federatedtraining.spec.<field>`` says what each field is."""
    spec = root_schema(crd)["properties"]["spec"]
    undescribed = [name for name, prop in spec["properties"].items() if not prop.get("description")]
    assert undescribed == []


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_samples_are_admitted_strictly(path: Path, crd: dict[str, Any]) -> None:
    manifest = yaml.safe_load(path.read_text())
    if manifest["kind"] == "FederatedParticipation":
        admitted = admit(load_crd(PARTICIPATION_FILE), manifest, field_validation="Strict")
        assert admitted["spec"]["site"] == manifest["spec"]["site"]
        return
    admitted = admit(crd, manifest, field_validation="Strict")
    assert admitted["spec"]["rounds"] == manifest["spec"].get("rounds", 10)


def sample(**spec: Any) -> dict[str, Any]:
    """The README's demo with top-level spec fields replaced (``None`` removes one)."""
    manifest = copy.deepcopy(yaml.safe_load((ROOT / "samples" / "gtsrb-fedavg-local.yaml").read_text()))
    for key, value in spec.items():
        if value is None:
            manifest["spec"].pop(key, None)
        else:
            manifest["spec"][key] = value
    return dict(manifest)


def named(name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest["metadata"]["name"] = name
    return manifest


@pytest.mark.parametrize(("manifest", "message"), [
    (sample(rounds=0),
     'FederatedTraining.fedtrain.io "gtsrb-fedavg-local" is invalid: spec.rounds: Invalid value: 0: '
     "spec.rounds in body should be greater than or equal to 1"),
    (sample(rounds="ten"),
     'spec.rounds: Invalid value: "string": spec.rounds in body must be of type integer: "string"'),
    (sample(strategy={"name": "fedsgd"}),
     'spec.strategy.name: Unsupported value: "fedsgd": supported values: "fedavg"'),
    (sample(model={"architecture": "resnet50"}), 'spec.model.architecture: Unsupported value: "resnet50"'),
    (sample(model={"imageSize": 8}), "spec.model.imageSize in body should be greater than or equal to 16"),
    (sample(training={"learningRate": 0}), "spec.training.learningRate in body should be greater than 0"),
    (sample(clients={"count": 1, "list": [{"name": "Bad_Name"}]}),
     "spec.clients.list[0].name in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"),
    (sample(partition={"scheme": "random"}), 'spec.partition.scheme: Unsupported value: "random"'),
    (sample(dataset={"format": "imagenet"}), 'spec.dataset.format: Unsupported value: "imagenet": supported values: '
                                             '"gtsrb"'),
    (sample(clients=None), "spec.clients: Required value"),
    ({"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedTraining", "metadata": {"name": "x"}},
     'FederatedTraining.fedtrain.io "x" is invalid: spec: Required value'),
    (named("Signs", sample()), 'metadata.name: Invalid value: "Signs": a lowercase RFC 1123 subdomain'),
], ids=["rounds-0", "rounds-string", "strategy", "architecture", "imageSize", "learningRate", "client-name",
        "scheme", "format", "no-clients", "no-spec", "upper-case-name"])
def test_bad_manifests_are_refused_as_the_api_server_words_it(manifest: dict[str, Any], message: str,
                                                              crd: dict[str, Any]) -> None:
    with pytest.raises(Refused) as refused:
        admit(crd, manifest, field_validation="Strict")
    assert refused.value.code == 422
    assert message in refused.value.message


def test_unknown_fields_are_refused_strictly_and_pruned_otherwise(crd: dict[str, Any]) -> None:
    manifest = sample(modell={"architecture": "tiny_cnn"})
    with pytest.raises(Refused) as refused:
        admit(crd, manifest, field_validation="Strict")
    assert refused.value.code == 400
    assert refused.value.message == ('FederatedTraining in version "v1alpha1" cannot be handled as a '
                                     'FederatedTraining: strict decoding error: unknown field "spec.modell"')
    warnings: list[str] = []
    assert "modell" not in admit(crd, manifest, field_validation="Warn", warnings=warnings)["spec"]
    assert warnings == ['unknown field "spec.modell"']


def test_defaults_fill_in_what_is_left_out(crd: dict[str, Any]) -> None:
    admitted = admit(crd, sample(model=None, strategy=None, rounds=None))
    assert admitted["spec"]["rounds"] == 10
    assert admitted["spec"]["model"]["architecture"] == "mobilenet_v3_small"  # default {} then its fields' defaults
    assert admitted["spec"]["strategy"]["name"] == "fedavg"


@dataclass
class RuleCase:
    """A change the CRD's CEL rules must refuse (``message`` at ``path``), and a close one they must let through."""

    path: str  # where the rule sits ("" is the root), as the API server names it
    message: str  # a fragment of the rule's message
    refused: dict[str, Any]
    allowed: dict[str, Any]
    old: dict[str, Any] | None = None  # the stored object, for transition rules


def storage(**kinds: Any) -> dict[str, Any]:
    return {kind: value for kind, value in kinds.items()}


S3 = {"bucket": "weights"}
SECURE = {"clipNorm": 5.0, "secureAggregation": {"threshold": 3}}
CASES = {
    "name-length": RuleCase("", f"at most {MAX_TRAINING_NAME} characters",
                            named("n" * (MAX_TRAINING_NAME + 1), sample()), named("n" * MAX_TRAINING_NAME, sample())),
    "clients-count-or-list": RuleCase("spec.clients", "give clients.count or clients.list",
                                      sample(clients={"maxRetries": 1}), sample(clients={"count": 2})),
    "clients-count-matches-list": RuleCase("spec.clients", "differs from the number of entries",
                                           sample(clients={"count": 3, "list": [{"name": "a"}, {"name": "b"}]}),
                                           sample(clients={"count": 2, "list": [{"name": "a"}, {"name": "b"}]})),
    "clients-per-round": RuleCase("spec.clients", "clients.perRound must be <= clients.count",
                                  sample(clients={"count": 2, "perRound": 3}),
                                  sample(clients={"count": 3, "perRound": 3})),
    "clients-per-round-of-list": RuleCase("spec.clients", "clients.perRound must be <= clients.count",
                                          sample(clients={"list": [{"name": "a"}], "perRound": 2}),
                                          sample(clients={"list": [{"name": "a"}], "perRound": 1})),
    "clients-min-successful": RuleCase("spec.clients", "clients.minSuccessful must be <= clients.perRound",
                                       sample(clients={"count": 4, "perRound": 2, "minSuccessful": 3}),
                                       sample(clients={"count": 4, "minSuccessful": 4})),
    "storage-one-kind": RuleCase("spec.storage", "not several",
                                 sample(storage={"create": {}, "local": "/tmp/x"}),
                                 sample(storage={"create": {}})),
    "storage-s3-and-create": RuleCase("spec.storage", "not several",
                                      sample(storage={"s3": S3, "create": {}}), sample(storage={"s3": S3})),
    "dataset-path-or-synthetic": RuleCase("spec.dataset", "give either dataset.path or dataset.synthetic",
                                          sample(dataset={"path": "/data", "synthetic": {}}),
                                          sample(dataset={"path": "/data"})),
    "model-architecture-changed": RuleCase("spec.model", "spec.model is immutable",
                                           sample(model={"architecture": "mobilenet_v3_large", "imageSize": 32}),
                                           sample(model={"architecture": "tiny_cnn", "imageSize": 32}),
                                           old=sample(model={"architecture": "tiny_cnn", "imageSize": 32})),
    "model-removed": RuleCase("spec.model", "spec.model is immutable", sample(model=None),
                              sample(model={"architecture": "tiny_cnn", "numClasses": 43, "imageSize": 32}),
                              old=sample()),
    "model-added": RuleCase("spec.model", "spec.model is immutable", sample(model={"architecture": "tiny_cnn"}),
                            sample(model={"architecture": "mobilenet_v3_small"}), old=sample(model=None)),
    "secure-aggregation-strategy": RuleCase(
        "spec", "strategy.name must be fedavg, fedprox",
        sample(strategy={"name": "krum", "parameters": {"f": 1}}, privacy=SECURE),
        sample(strategy={"name": "fedadam"}, privacy=SECURE)),
    "secure-aggregation-clients": RuleCase(
        "spec", "privacy.secureAggregation takes at most",
        sample(clients={"count": 200, "perRound": 129}, privacy=SECURE),
        sample(clients={"count": 200, "perRound": 128}, privacy=SECURE)),
    "secure-aggregation-threshold": RuleCase(
        "spec", "threshold must be <= the clients of a round",
        sample(clients={"count": 4, "perRound": 2}, privacy=SECURE), sample(clients={"count": 3}, privacy=SECURE)),
    "secure-aggregation-threshold-of-list": RuleCase(
        "spec", "threshold must be <= the clients of a round",
        sample(clients={"list": [{"name": "a"}, {"name": "b"}]}, privacy=SECURE),
        sample(clients={"list": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}, privacy=SECURE)),
    "secure-aggregation-neighbours": RuleCase(
        "spec", "threshold must be <= neighbours + 1",
        sample(clients={"count": 5}, privacy={**SECURE, "secureAggregation": {"threshold": 4, "neighbours": 2}}),
        sample(clients={"count": 5}, privacy={**SECURE, "secureAggregation": {"threshold": 3, "neighbours": 2}})),
    "privacy-changed": RuleCase("spec", "spec.privacy is immutable",
                                sample(privacy={**SECURE, "clipNorm": 1.0}), sample(privacy=SECURE),
                                old=sample(privacy=SECURE)),
    "privacy-added": RuleCase("spec", "spec.privacy is immutable", sample(privacy=SECURE), sample(privacy=None),
                              old=sample(privacy=None)),
    "strategy-added": RuleCase("spec.strategy", "spec.strategy is immutable", sample(strategy={"name": "fedprox"}),
                               sample(strategy={"name": "fedavg"}), old=sample(strategy=None)),
    "strategy-removed": RuleCase("spec.strategy", "spec.strategy is immutable",
                                 sample(strategy=None), sample(strategy={"name": "krum", "parameters": {"f": 1}}),
                                 old=sample(strategy={"name": "krum", "parameters": {"f": 1}})),
}


def refusal(crd: dict[str, Any], case: RuleCase, manifest: dict[str, Any]) -> str | None:
    """The API server's 422 message for ``manifest`` (an update of ``case.old`` when given), or None if admitted."""
    old = None if case.old is None else admit(crd, case.old, field_validation="Strict")
    if old is not None:
        manifest = {**manifest, "metadata": {**manifest["metadata"], "name": old["metadata"]["name"]}}
    try:
        admit(crd, manifest, old, field_validation="Strict")
    except Refused as refused:
        return refused.message
    return None


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_cel_rule_refuses_and_allows(case: RuleCase, crd: dict[str, Any]) -> None:
    message = refusal(crd, case, case.refused)
    assert message is not None, "admitted"
    assert f"{case.path or '<nil>'}: Invalid value: \"object\": " in message and case.message in message, message
    assert refusal(crd, case, case.allowed) is None


def test_every_cel_rule_has_a_case(crd: dict[str, Any]) -> None:
    """A rule added to the CRD without a case here fails this test: each rule's own message must be seen refusing."""
    seen = " ".join(filter(None, (refusal(crd, case, case.refused) for case in CASES.values())))
    rules = rules_of(crd)
    missing = [(path, rule["message"]) for path, rule in rules
               if f"{path or '<nil>'}: Invalid value: \"object\": {rule['message']}" not in seen]
    assert missing == []
    unmatched = [key for key, case in CASES.items()
                 if not any(path == case.path and case.message in rule["message"] for path, rule in rules)]
    assert unmatched == [], "cases whose rule is not in the CRD"


def test_storage_rule_names_every_storage_kind(crd: dict[str, Any]) -> None:
    """Any two storage kinds together are refused at admission, whichever they are."""
    values = {"persistentVolumeClaim": {"claimName": "c"}, "create": {}, "s3": S3, "local": "/tmp/x"}
    for first, second in itertools.pairwise(STORAGE_KINDS):
        case = RuleCase("spec.storage", "not several", sample(storage={first: values[first], second: values[second]}),
                        sample(storage={first: values[first]}))
        assert "not several" in (refusal(crd, case, case.refused) or ""), (first, second)


def participation(**spec: Any) -> dict[str, Any]:
    """A site's participation (munich, joining team-signs/signs-1a2b3c4d) with spec fields replaced."""
    base: dict[str, Any] = {"site": "munich", "training": {"id": "team-signs/signs-1a2b3c4d"},
                            "store": {"s3": {"bucket": "weights", "credentialsSecret": {"name": "munich-s3"}}},
                            "data": {"claimName": "munich-gtsrb", "path": "gtsrb"}}
    for key, value in spec.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return {"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedParticipation",
            "metadata": {"name": "signs", "namespace": "site-munich"}, "spec": base}


def test_participation_crd_is_fresh_and_accepted_by_the_api_server() -> None:
    from fedtrain.crd import participation_definition

    assert PARTICIPATION_FILE.read_text() == render("participation"), \
        "run: python -m fedtrain.crd participation > crds/federatedparticipations.fedtrain.io.yaml"
    assert schema_problems(participation_definition()) == []
    assert "federatedparticipations.fedtrain.io.yaml" in (ROOT / "crds" / "kustomization.yaml").read_text()


def test_participation_names_columns_and_defaults() -> None:
    crd = load_crd(PARTICIPATION_FILE)
    assert crd["spec"]["names"]["shortNames"] == ["fp"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Training", "Phase", "Rounds", "Accuracy",
                                                                        "Epsilon", "Age"]
    admitted = admit(crd, participation(), field_validation="Strict")
    assert admitted["spec"]["pollSeconds"] == 30
    # no list: every strategy and architecture
    assert admitted["spec"]["policy"] == {"requirePrivacy": False, "requireSecureAggregation": False}
    undescribed = [n for n, p in root_schema(crd)["properties"]["spec"]["properties"].items()
                   if not p.get("description")]
    assert undescribed == []


@pytest.mark.parametrize(("manifest", "message"), [
    (participation(site="Munich"), "spec.site in body should match"),
    (participation(policy={"strategies": ["fedsgd"]}), 'spec.policy.strategies[0]: Unsupported value: "fedsgd"'),
    (participation(pollSeconds=0), "spec.pollSeconds in body should be greater than or equal to 1"),
    (participation(store={"s3": {"bucket": "weights"}, "local": "/srv"}), "store takes exactly one of s3 or local"),
    (participation(data={"claimName": "c", "localPath": "/data"}), "data takes exactly one of claimName"),
    (participation(data={"localPath": "/data", "path": "x"}), "data.path is the folder inside data.claimName"),
    (participation(policy={"maxEpsilon": 3}), "set policy.requirePrivacy to true as well"),
    (participation(training=None), "spec.training: Required value"),
], ids=["site-name", "strategy", "poll", "store-both", "data-both", "path-without-claim", "epsilon", "no-training"])
def test_bad_participations_are_refused(manifest: dict[str, Any], message: str) -> None:
    with pytest.raises(Refused) as refused:
        admit(load_crd(PARTICIPATION_FILE), manifest, field_validation="Strict")
    assert refused.value.code == 422
    assert message in refused.value.message


def test_participation_unknown_fields_are_refused_strictly() -> None:
    with pytest.raises(Refused) as refused:
        admit(load_crd(PARTICIPATION_FILE), participation(polSeconds=3), field_validation="Strict")
    assert refused.value.code == 400
    assert 'unknown field "spec.polSeconds"' in refused.value.message
