"""The FederatedParticipation file: defaults, the training's location, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtrain.sites.participation import (
    ParticipationError,
    load_participation,
    parse_participation,
    parse_participation_spec,
    training_location,
)
from fedtrain.spec import STRATEGY_NAMES

SAMPLES = Path(__file__).parents[2] / "samples" / "sites"


def spec(**fields: object) -> dict[str, object]:
    return {"site": "munich", "training": {"id": "team/signs-1a2b3c4d"}, "store": {"local": "/srv/store"},
            "data": {"localPath": "/srv/gtsrb"}, **fields}


def problems(data: object) -> list[str]:
    with pytest.raises(ParticipationError) as caught:
        parse_participation_spec(data)
    return caught.value.problems


def test_defaults_accept_every_strategy() -> None:
    parsed = parse_participation_spec(spec())
    assert parsed.policy.strategies == STRATEGY_NAMES
    assert parsed.poll_seconds == 30
    assert parsed.evaluation.split == "test"


def test_location_of_the_training() -> None:
    assert training_location(parse_participation_spec(spec())) == "/srv/store/team/signs-1a2b3c4d"
    assert training_location(parse_participation_spec(spec(training={"id": ""}))) == "/srv/store"
    s3 = parse_participation_spec(spec(store={"s3": {"bucket": "fl-store", "prefix": "fed"}}))
    assert training_location(s3) == "s3://fl-store/fed/team/signs-1a2b3c4d"


@pytest.mark.parametrize(("fields", "expected"), [
    ({"store": {"local": "/a", "s3": {"bucket": "fl-store"}}}, "spec.store: store takes exactly one of s3 or local"),
    ({"data": {"localPath": "/a", "synthetic": {}}}, "spec.data: data takes exactly one of"),
    ({"policy": {"maxEpsilon": 3}}, "spec.policy.maxEpsilon bounds a privacy budget"),
    ({"policy": {"strategies": ["fedsgd"]}}, "spec.policy.strategies[0]: must be one of fedavg"),
    ({"pollSeconds": 0}, "spec.pollSeconds:"),
    ({"training": {"id": "../other"}}, "spec.training.id:"),
    ({"polcy": {}}, "spec.polcy: unknown field"),
])
def test_errors_name_the_field(fields: dict[str, object], expected: str) -> None:
    found = problems(spec(**fields))
    assert any(p.startswith(expected) for p in found), found


def test_a_manifest_needs_the_kind() -> None:
    with pytest.raises(ParticipationError, match="kind: must be FederatedParticipation"):
        parse_participation({"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedTraining",
                             "metadata": {"name": "munich"}, "spec": spec()})


@pytest.mark.parametrize("name", ["munich", "hamburg", "berlin"])
def test_the_samples_load(name: str) -> None:
    manifest = load_participation(SAMPLES / f"{name}.yaml")
    assert manifest.spec.site == name
    assert "fedavg" in manifest.spec.policy.strategies
