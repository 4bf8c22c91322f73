"""A site's policy applied to a task: the one place that says why a site will not run it.

Each rule names the policy field that refused the task and what it allows, so that the
coordinator's status (which shows the site's reason) tells both organisations what to change.
Nothing here touches the site's data: a task is judged before it is run. Kept free of torch and
numpy at import time (the site's operator imports it); the privacy accountant is loaded only for a
policy that bounds epsilon.
"""

from __future__ import annotations

from fedtrain.contract.sitetask import PrivacySettings, SiteTask
from fedtrain.sites.participation import SitePolicy


def refusal(task: SiteTask, policy: SitePolicy) -> str | None:
    """Why ``policy`` refuses ``task``, naming the policy field; None when the site accepts it."""
    for rule in (_strategy, _architecture, _rounds, _epochs, _privacy, _secure_aggregation):
        reason = rule(task, policy)
        if reason is not None:
            return reason
    return None


def _listed(values: tuple[str, ...]) -> str:
    return ", ".join(values)


def _strategy(task: SiteTask, policy: SitePolicy) -> str | None:
    if task.strategy in policy.strategies:
        return None
    return f"strategy {task.strategy} is not accepted (spec.policy.strategies: {_listed(policy.strategies)})"


def _architecture(task: SiteTask, policy: SitePolicy) -> str | None:
    if task.architecture in policy.architectures:
        return None
    return (f"architecture {task.architecture} is not accepted "
            f"(spec.policy.architectures: {_listed(policy.architectures)})")


def _rounds(task: SiteTask, policy: SitePolicy) -> str | None:
    if policy.max_rounds is None or task.total_rounds <= policy.max_rounds:
        return None
    return f"the training has {task.total_rounds} rounds, more than spec.policy.maxRounds ({policy.max_rounds})"


def _epochs(task: SiteTask, policy: SitePolicy) -> str | None:
    if policy.max_local_epochs is None or task.kind != "train" or task.train is None:
        return None
    if task.train.epochs <= policy.max_local_epochs:
        return None
    return (f"the round asks for {task.train.epochs} local epochs, more than spec.policy.maxLocalEpochs "
            f"({policy.max_local_epochs})")


def _privacy(task: SiteTask, policy: SitePolicy) -> str | None:
    if not policy.require_privacy:
        return None
    if task.privacy is None or task.privacy.noise_multiplier <= 0:  # clipping alone (as under secure aggregation)
        return "the training has no differential privacy and spec.policy.requirePrivacy is true"  # is no DP
    if policy.max_epsilon is None:
        return None
    spent = total_epsilon(task.privacy, task.total_rounds)
    if spent <= policy.max_epsilon:
        return None
    return (f"the training's epsilon after its {task.total_rounds} rounds would be {spent:.4g} (delta "
            f"{task.privacy.delta:g}), more than spec.policy.maxEpsilon ({policy.max_epsilon:g})")


def _secure_aggregation(task: SiteTask, policy: SitePolicy) -> str | None:
    """A round's update leaves the site only masked; evaluations send scores, never an update, and pass."""
    if not policy.require_secure_aggregation or task.kind == "evaluate" or task.secure is not None:
        return None
    return ("the round's update would leave the site in the clear: the training has no secure aggregation and "
            "spec.policy.requireSecureAggregation is true")


def total_epsilon(privacy: PrivacySettings, rounds: int) -> float:
    """The privacy budget epsilon (at the training's delta) after ``rounds`` rounds of the coordinator's DP."""
    # Imported here: the accountant brings numpy and scipy, which a policy without maxEpsilon never needs.
    from fedtrain.worker.strategies.privacy import epsilon

    return epsilon(privacy.sampling_rate, privacy.noise_multiplier, rounds, privacy.delta)
