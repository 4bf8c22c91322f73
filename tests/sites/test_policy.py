"""The site's policy: each rule refuses on its own, names its policy field, and lets everything else through."""

from __future__ import annotations

import dataclasses

import pytest

from fedtrain.contract.sitetask import TrainSettings
from fedtrain.sites.participation import SitePolicy
from fedtrain.sites.policy import refusal, total_epsilon
from fedtrain.worker.strategies.privacy import epsilon
from tests.sites.documents import participation, private, secure, site_task


def policy(**fields: object) -> SitePolicy:
    return participation(policy=fields).policy


def test_the_default_policy_accepts_any_task() -> None:
    assert refusal(site_task(strategy="krum", train=TrainSettings(epochs=50)), policy()) is None


@pytest.mark.parametrize(("fields", "task", "field", "detail"), [
    ({"strategies": ["fedavg", "fedprox"]}, {"strategy": "krum"}, "spec.policy.strategies: fedavg, fedprox",
     "strategy krum"),
    ({"architectures": ["mobilenet_v3_small"]}, {}, "spec.policy.architectures: mobilenet_v3_small",
     "architecture tiny_cnn"),
    ({"maxRounds": 4}, {}, "spec.policy.maxRounds (4)", "5 rounds"),
    ({"maxLocalEpochs": 1}, {}, "spec.policy.maxLocalEpochs (1)", "2 local epochs"),
    ({"requirePrivacy": True}, {}, "spec.policy.requirePrivacy", "no differential privacy"),
    ({"requirePrivacy": True}, {"privacy": private(noise_multiplier=0.0)}, "spec.policy.requirePrivacy",
     "no differential privacy"),  # clipping without noise, as secure aggregation alone posts it
    ({"requireSecureAggregation": True}, {}, "spec.policy.requireSecureAggregation",
     "the round's update would leave the site in the clear: the training has no secure aggregation"),
])
def test_each_rule_refuses_naming_its_field(fields: dict[str, object], task: dict[str, object], field: str,
                                            detail: str) -> None:
    reason = refusal(site_task(**task), policy(**fields))
    assert reason is not None
    assert field in reason
    assert detail in reason


@pytest.mark.parametrize(("fields", "task"), [
    ({"strategies": ["fedavg"]}, {"strategy": "fedavg"}),
    ({"architectures": ["tiny_cnn"]}, {}),
    ({"maxRounds": 5}, {}),
    ({"maxLocalEpochs": 2}, {}),
    ({"requirePrivacy": True}, {"privacy": private()}),
    ({"requireSecureAggregation": True}, {"secure": secure()}),
])
def test_each_rule_accepts_what_it_allows(fields: dict[str, object], task: dict[str, object]) -> None:
    assert refusal(site_task(**task), policy(**fields)) is None


def test_local_epochs_bound_only_training() -> None:
    evaluate = site_task(id="e0003-munich-a1", kind="evaluate", train=None)
    assert refusal(evaluate, policy(maxLocalEpochs=1)) is None
    assert refusal(dataclasses.replace(evaluate, kind="train", train=TrainSettings(epochs=3)),
                   policy(maxLocalEpochs=1)) is not None


def test_secure_aggregation_is_required_of_training_only() -> None:
    """A site's scores leave it in any training; its update only masked, and each secure stage is masked too."""
    required = policy(requireSecureAggregation=True)
    assert refusal(site_task(id="e0003-munich-a1", kind="evaluate", train=None), required) is None
    for kind, letter in (("keys", "k"), ("shares", "s"), ("unmask", "u")):
        stage = site_task(id=f"{letter}0003-munich-a1", kind=kind, train=None, secure=secure())
        assert refusal(stage, required) is None


def test_max_epsilon_bounds_the_budget_after_all_rounds() -> None:
    task = site_task(privacy=private(noise_multiplier=1.0, sampling_rate=0.5))
    spent = epsilon(0.5, 1.0, 5, 1e-5)  # the training's 5 rounds, not the current round 3
    assert spent > epsilon(0.5, 1.0, 3, 1e-5)
    assert task.privacy is not None
    assert total_epsilon(task.privacy, task.total_rounds) == spent
    assert refusal(task, policy(requirePrivacy=True, maxEpsilon=spent * 1.01)) is None
    reason = refusal(task, policy(requirePrivacy=True, maxEpsilon=spent * 0.99))
    assert reason is not None
    assert "spec.policy.maxEpsilon" in reason
    assert f"{spent:.4g}" in reason


def test_no_noise_is_no_differential_privacy_whatever_the_budget() -> None:
    task = site_task(privacy=private(noise_multiplier=0.0))
    reason = refusal(task, policy(requirePrivacy=True, maxEpsilon=100.0))
    assert reason is not None
    assert "no differential privacy" in reason


def test_the_first_failing_rule_is_the_reason() -> None:
    reason = refusal(site_task(strategy="krum"), policy(strategies=["fedavg"], maxRounds=1))
    assert reason is not None
    assert "strategies" in reason
