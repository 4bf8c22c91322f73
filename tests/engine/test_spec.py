"""The spec model: defaults in one place, errors that name the field, the same model for files and resources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedtrain.sites.participation import load_participation
from fedtrain.spec import STRATEGY_PARAMETERS, SpecError, load_manifest, parse_spec
from fedtrain.worker.strategies import STRATEGIES

SAMPLES = sorted(p for p in Path(__file__).parents[2].joinpath("samples").rglob("*.yaml")
                 if "kubeflow" not in p.parts)  # compiled pipelines are not FederatedTrainings


def test_defaults_fill_a_minimal_spec() -> None:
    spec = parse_spec({"clients": {"count": 4}})
    assert spec.rounds == 10 and spec.model.architecture == "mobilenet_v3_small" and spec.strategy.name == "fedavg"
    assert spec.clients.round_size == 4 and spec.clients.quorum == 4
    assert spec.clients.names() == ["client-00", "client-01", "client-02", "client-03"]
    assert spec.dataset.path is None and spec.dataset.synthetic is None  # synthetic data by default


def test_explicit_client_list_with_overrides() -> None:
    spec = parse_spec({"clients": {"list": [{"name": "munich", "training": {"localEpochs": 3}},
                                            {"name": "berlin"}], "minSuccessful": 1}})
    assert spec.clients.names() == ["munich", "berlin"] and spec.clients.total == 2
    assert spec.clients.entry("munich").training.local_epochs == 3  # type: ignore[union-attr]


@pytest.mark.parametrize(("data", "expected"), [
    ({"clients": {"count": 3}, "rounds": "many"}, "spec.rounds: Input should be a valid integer"),
    ({"clients": {"count": 3}, "modell": {}}, "spec.modell: unknown field"),
    ({"clients": {"count": 3, "perRound": 2, "minSuccessful": 3}},
     "spec.clients.minSuccessful (3) must be <= clients.perRound (2)"),
    ({"clients": {"count": 3, "perRound": 5}}, "spec.clients.perRound (5) must be <= clients.count (3)"),
    ({"clients": {}}, "spec.clients: give clients.count or clients.list"),
    ({"clients": {"count": 3}, "strategy": {"name": "fedsgd"}}, "spec.strategy.name: must be one of fedavg"),
    ({"clients": {"count": 3}, "strategy": {"name": "fedprox", "parameters": {"beta": 1}}},
     "spec.strategy.parameters.beta is not a parameter of fedprox (allowed: mu)"),
    ({"clients": {"count": 3}, "storage": {"local": "/x", "create": {}}},
     "storage takes one of persistentVolumeClaim, create, s3 or local"),
    ({"clients": {"count": 3}, "dataset": {"path": "/d", "synthetic": {}}},
     "give either dataset.path or dataset.synthetic"),
    ({"clients": {"list": [{"name": "a"}, {"name": "a"}]}}, "clients.list has duplicate names"),
    ({"clients": {"list": [{"name": "Munich"}]}}, "spec.clients.list[0].name: String should match pattern"),
    ({"clients": {"count": 50}, "partition": {"scheme": "classes"}}, "needs clients.count (50) <="),
    ({"clients": {"count": 3}, "training": {"optimizer": "rmsprop"}}, "spec.training.optimizer: must be one of"),
    ({"clients": {"list": [{"name": "a", "namespace": "team-b"}]}, "storage": {"s3": {"bucket": "weights"}}},
     "spec.clients.list[0].data is required: a client in namespace team-b trains on its own data there"),
    ({"clients": {"list": [{"name": "a", "namespace": "team-b", "data": {"claimName": "signs"}}]}},
     "spec.clients.list[0].namespace needs storage.s3"),
    ({"clients": {"list": [{"name": "a", "data": {"claimName": "signs", "path": "../other"}}]}},
     "must be relative to the claim's root"),
    ({"clients": {"count": 2}, "storage": {"s3": {"bucket": "Weights!"}}}, "spec.storage.s3.bucket: String should"),
    ({"clients": {"count": 2}, "storage": {"s3": {"bucket": "w1", "endpoint": "minio:9000"}}},
     "spec.storage.s3.endpoint: String should match pattern"),
])
def test_bad_specs_name_the_field(data: dict, expected: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems


def test_clients_in_their_own_namespaces() -> None:
    spec = parse_spec({"clients": {"list": [
        {"name": "munich", "namespace": "city-munich", "data": {"claimName": "signs", "path": "gtsrb"}},
        {"name": "shared"}]}, "storage": {"s3": {"bucket": "fedtrain-weights", "credentialsSecret": {"name": "s3"}}}})
    assert spec.clients.own_data() == ["munich"] and spec.clients.namespaces() == {"munich": "city-munich"}
    assert spec.storage.s3 is not None and spec.storage.s3.prefix == "fedtrain"
    assert spec.storage.s3.credentials_secret is not None
    assert spec.storage.s3.credentials_secret.access_key_id_key == "AWS_ACCESS_KEY_ID"


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec({"clients": {"count": 3}, "rounds": 0, "training": {"batchSize": 0}})
    assert len(caught.value.problems) == 2


def test_strategy_table_matches_the_worker_registry() -> None:
    assert {name: tuple(r.parameters) for name, r in STRATEGIES.items()} == STRATEGY_PARAMETERS


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_samples_are_valid(path: Path) -> None:
    if "kind: FederatedParticipation" in path.read_text():
        participation = load_participation(path)  # a site's side (samples/sites, samples/k8s/sites)
        assert participation.metadata.name and participation.spec.site
        return
    manifest = load_manifest(path)
    assert manifest.kind == "FederatedTraining" and manifest.metadata.name


def test_yaml_problems_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match=r"broken.yaml: invalid FederatedTraining:\n  - not valid YAML"):
        load_manifest(broken)
    with pytest.raises(SpecError, match="does not exist"):
        load_manifest(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("worker", "path"), [
    ({"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k", "namespace": "x"}}}]},
     "spec.worker.env[0].valueFrom.secretKeyRef.namespace"),
    ({"volumes": [{"name": "data", "csi": {"driver": "d", "nodePublishSecretRef": {"name": "s", "namespace": "x"}}}]},
     "spec.worker.volumes[0].csi.nodePublishSecretRef.namespace"),
])
def test_objects_of_other_namespaces_are_refused(worker: dict, path: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec({"clients": {"count": 2}, "worker": worker})
    assert raised.value.problems == [f"{path} is not allowed: a training may only use claims and secrets of its own "
                                     "namespace; remove the namespace, or copy the object into the training's "
                                     "namespace"]


def test_every_spec_field_has_a_description_for_kubectl_explain() -> None:
    from fedtrain.crd import spec_schema

    def undescribed(node: dict[str, Any], path: str) -> list[str]:
        missing = [] if node.get("description") else [path]
        for name, child in (node.get("properties") or {}).items():
            missing += undescribed(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict) and node["items"].get("properties"):
            missing += undescribed(node["items"], f"{path}[]")
        return missing

    assert undescribed(spec_schema(), "spec") == []
