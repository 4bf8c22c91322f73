"""Remote sites in the engine: their training tasks, refusals, and the federated evaluation stage."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedtrain.contract.errors import EXIT_REFUSED
from fedtrain.contract.federated import SiteScore, combine
from fedtrain.engine import Observation, Task
from fedtrain.engine.status import Reason
from fedtrain.operator.jobs import kubernetes_problems
from fedtrain.spec import FederatedTrainingSpec, SpecError, parse_spec
from tests.engine.test_engine import Simulation

SITE_SCORES = {"munich": (10, 0.8, 0.5), "hamburg": (30, 0.4, 1.0)}


def sites_spec(**overrides: Any) -> FederatedTrainingSpec:
    data: dict[str, Any] = {
        "rounds": 2, "roundDeadlineSeconds": 100,
        "clients": {"list": [{"name": "hq"}, {"name": "munich", "site": {}}, {"name": "hamburg", "site": {}}]},
        "evaluation": {"central": False},
    }
    data.update(overrides)
    return parse_spec(data)


def answer(task: Task, now: float) -> Observation:
    """An executor and two sites that do their work: aggregation without central scores, sites evaluate."""
    if task.kind == "evaluate":
        examples, accuracy, loss = SITE_SCORES[task.client or ""]
        return Observation("succeeded", 0, {"examples": examples, "accuracy": accuracy, "loss": loss})
    if task.kind == "aggregate":
        return Observation("succeeded", 0, {"accepted": ["hq", "munich", "hamburg"], "rejected": {}})
    if task.kind == "finalize":
        return Observation("succeeded", 0, {"model_uri": "models:/signs/1"})
    if task.kind == "train" and task.client in SITE_SCORES and task.round > 1:  # scores the model it trains from
        examples, accuracy, loss = SITE_SCORES[task.client or ""]
        return Observation("succeeded", 0, {"evaluation": {"examples": examples, "accuracy": accuracy, "loss": loss}})
    return Observation("succeeded", 0)


def test_sites_evaluate_every_round_and_the_status_shows_the_federation() -> None:
    sim = Simulation(sites_spec(), answer)
    status = sim.run()
    assert status.phase == "Succeeded", status.message
    # Round 1's model is scored by the sites' training tasks of round 2; only the last round has its own stage.
    assert [i for i in sim.launched if i.startswith("e")] == ["e0002-hamburg-a1", "e0002-munich-a1"]
    first = status.round(1)
    assert first is not None and first.carried and first.federated is not None
    assert first.federated.accuracy == pytest.approx(0.5) and set(first.site_scores) == {"hamburg", "munich"}
    record = status.round(2)
    assert record is not None and record.federated is not None
    # (10 * 0.8 + 30 * 0.4) / 40: weighted by examples, not a plain mean of sites (0.6)
    assert record.federated.accuracy == pytest.approx(0.5)
    assert record.federated.loss == pytest.approx((10 * 0.5 + 30 * 1.0) / 40)
    assert (record.federated.worst_site, record.federated.best_site) == ("hamburg", "munich")
    assert record.site_scores["munich"].examples == 10
    assert status.federated_accuracy == 0.5 and status.accuracy == 0.5  # no central test set: federated
    assert status.best_round == 1  # equal accuracy later does not move the best round
    assert any("federated accuracy 0.5000 over 2 sites (worst hamburg" in e for e in sim.events)
    assert any(e.startswith("RoundEvaluated: round 1: federated accuracy 0.5000") for e in sim.events)


def test_a_carried_evaluation_arrives_before_the_next_aggregation_and_in_the_round_that_made_the_model() -> None:
    sim = Simulation(sites_spec(rounds=3), answer)
    for _ in range(200):
        sim.tick()
        if "r0002-aggregate-a1" in sim.launched:
            break
    first = sim.status.round(1)
    assert first is not None and first.scored and first.federated is not None, "scored before round 2 aggregates"
    assert sim.status.round(2).federated is None  # type: ignore[union-attr]
    assert sim.status.federated_accuracy == 0.5 and sim.status.best_round == 1


def test_a_site_that_does_not_train_in_the_next_round_evaluates_in_a_task_of_its_own() -> None:
    the_spec = sites_spec(rounds=3, clients={"list": [{"name": "hq"}, {"name": "munich", "site": {}},
                                                      {"name": "hamburg", "site": {}}], "perRound": 2})
    sim = Simulation(the_spec, answer)
    status = sim.run(200)
    assert status.phase == "Succeeded", status.message
    for record in status.rounds[:-1]:
        following = status.round(record.round + 1)
        assert following is not None
        apart = {s for s in ("munich", "hamburg") if s not in following.selected}
        launched = {i.split("-")[1] for i in sim.launched if i.startswith(f"e{record.round:04d}-")}
        assert launched == apart, (record.round, following.selected)
        assert record.federated is not None and record.federated.sites == 2


def test_a_failed_training_fails_the_evaluation_it_carried() -> None:
    def failing(task: Task, now: float) -> Observation:
        if task.kind == "train" and task.client == "hamburg" and task.round == 2:
            return Observation("failed", 3, None, "its data went away")
        return answer(task, now)

    the_spec = sites_spec(clients={"list": [{"name": "hq"}, {"name": "munich", "site": {}},
                                            {"name": "hamburg", "site": {}}], "minSuccessful": 2})
    sim = Simulation(the_spec, failing)
    status = sim.run()
    first = status.round(1)
    assert status.phase == "Succeeded" and first is not None and first.evaluations is not None
    assert first.evaluations["hamburg"].state == "failed"
    assert "its training task, which carried the evaluation, failed" in (first.evaluations["hamburg"].reason or "")
    assert first.federated is not None and first.federated.sites == 1


def test_central_accuracy_stays_the_headline_when_both_are_measured() -> None:
    def central(task: Task, now: float) -> Observation:
        seen = answer(task, now)
        if task.kind == "aggregate":
            return Observation("succeeded", 0, {**(seen.output or {}), "accuracy": 0.9, "loss": 0.2})
        return seen

    status = Simulation(sites_spec(evaluation={"central": True, "everyRounds": 2}, rounds=3), central).run()
    assert status.phase == "Succeeded"
    assert status.accuracy == 0.9 and status.federated_accuracy == 0.5
    evaluated = [r.round for r in status.rounds if r.federated is not None]
    assert evaluated == [2, 3]  # every second round, and always the last


def test_a_refusing_site_fails_at_once_and_the_round_goes_on_with_the_quorum() -> None:
    def refuse(task: Task, now: float) -> Observation:
        if task.kind == "train" and task.client == "munich":
            return Observation("failed", EXIT_REFUSED, None, "strategy fedavg is not accepted (spec.policy."
                                                              "strategies: fedprox)")
        return answer(task, now)

    sim = Simulation(sites_spec(clients={"list": [{"name": "hq"}, {"name": "munich", "site": {}},
                                                  {"name": "hamburg", "site": {}}], "minSuccessful": 2}), refuse)
    status = sim.run()
    assert status.phase == "Succeeded"
    assert "r0001-munich-a2" not in sim.launched  # a refusal is not retried
    munich = status.round(2).clients["munich"]  # type: ignore[union-attr]
    assert munich.state == "failed" and "refused by the site" in (munich.reason or "")
    assert "spec.policy.strategies" in (munich.reason or "")


def test_refusals_of_every_site_name_the_cause() -> None:
    def refuse(task: Task, now: float) -> Observation:
        if task.kind == "train" and task.client != "hq":
            return Observation("failed", EXIT_REFUSED, None, "architecture tiny_cnn is not accepted")
        return answer(task, now)

    status = Simulation(sites_spec(), refuse).run()
    assert status.phase == "Failed" and status.reason == Reason.SITE_REFUSED
    assert "munich" in status.message and "hamburg" in status.message


def test_a_silent_site_is_left_out_of_the_federated_figures_at_the_deadline() -> None:
    def silent(task: Task, now: float) -> Observation | None:
        return None if task.kind == "evaluate" and task.client == "hamburg" else answer(task, now)

    sim = Simulation(sites_spec(rounds=1), silent)
    for _ in range(30):
        sim.tick(10)
        if sim.status.phase == "Succeeded":
            break
    record = sim.status.round(1)
    assert sim.status.phase == "Succeeded" and record is not None and record.federated is not None
    assert record.federated.sites == 1 and record.federated.accuracy == pytest.approx(0.8)
    assert record.evaluations is not None and record.evaluations["hamburg"].state == "dropped"
    assert "e0001-hamburg-a1" in sim.cancelled


def test_an_answer_without_figures_is_a_failed_evaluation() -> None:
    def empty(task: Task, now: float) -> Observation:
        if task.kind == "evaluate" and task.client == "munich":
            return Observation("succeeded", 0, {"examples": 0, "accuracy": 1.0, "loss": 0.0})
        return answer(task, now)

    sim = Simulation(sites_spec(rounds=1), empty)
    status = sim.run()
    record = status.round(1)
    assert record is not None and record.evaluations is not None
    assert record.evaluations["munich"].state == "failed"
    assert record.federated is not None and record.federated.sites == 1
    assert any(e.startswith(Reason.SITE_EVALUATION_FAILED) for e in sim.events)


@pytest.mark.parametrize(("figures", "said"), [
    ({"examples": 10**18, "accuracy": 7.0, "loss": 0.1}, "accuracy: Input should be less than or equal to 1"),
    ({"examples": 10, "accuracy": float("nan"), "loss": 0.1}, "accuracy: Input should be a finite number"),
    ({"examples": 10, "accuracy": 0.9, "loss": -1.0}, "loss: Input should be greater than or equal to 0"),
    ({"examples": 50, "accuracy": 0.9, "loss": 0.1}, "claims 50 examples, more than the 40"),
    ({"examples": 10.0, "accuracy": 0.9, "loss": 0.1}, "examples: Input should be a valid integer"),
])
def test_an_invalid_score_never_reaches_the_figures(figures: dict[str, Any], said: str) -> None:
    """The engine checks every score itself, whatever its executor checked: 7.0 or NaN never becomes the best."""
    def hostile(task: Task, now: float) -> Observation:
        if task.kind == "evaluate" and task.client == "munich":
            return Observation("succeeded", 0, figures)
        return answer(task, now)

    entries = [{"name": "hq"}, {"name": "munich", "site": {}, "maxExamples": 40}, {"name": "hamburg", "site": {}}]
    sim = Simulation(sites_spec(rounds=1, clients={"list": entries}), hostile)
    status = sim.run()
    assert status.phase == "Succeeded"
    record = status.round(1)
    assert record is not None and record.evaluations is not None and record.federated is not None
    munich = record.evaluations["munich"]
    assert munich.state == "failed" and said in (munich.reason or "") and "munich's evaluation" in (munich.reason or "")
    assert "munich" not in record.site_scores and record.federated.sites == 1
    assert status.best_accuracy == status.accuracy == pytest.approx(0.4)  # hamburg's alone
    json.dumps(status.to_json(), allow_nan=False)
    assert any(e.startswith(Reason.SITE_EVALUATION_FAILED) and "munich" in e for e in sim.events)


def test_non_finite_aggregation_figures_are_left_out_of_the_status() -> None:
    """A NaN in a status makes the API server refuse the whole patch: figures that are not finite stay out."""
    def diverged(task: Task, now: float) -> Observation:
        if task.kind == "aggregate":
            return Observation("succeeded", 0, {"accepted": ["hq"], "accuracy": 0.1, "loss": float("nan"),
                                                "epsilon": float("inf"), "dp_delta": 1e-5})
        return answer(task, now)

    status = Simulation(sites_spec(rounds=1, evaluation={"central": True}), diverged).run()
    assert status.phase == "Succeeded"
    record = status.round(1)
    assert record is not None and record.accuracy == 0.1 and record.loss is None
    assert status.privacy_epsilon is None
    json.dumps(status.to_json(), allow_nan=False)


def test_combine_breaks_ties_by_name() -> None:
    same = {"b": SiteScore(5, 0.5, 1.0), "a": SiteScore(5, 0.5, 1.0)}
    combined = combine(same)
    assert combined is not None and combined.worst_site == "a" and combined.best_site == "a"
    assert combine({}) is None


# Four sites, one lying: 0.99 over many examples against honest 0.5, 0.55 and 0.6.
FOUR = {"a": SiteScore(100, 0.5, 1.0), "b": SiteScore(100, 0.55, 0.9), "c": SiteScore(100, 0.6, 0.8),
        "liar": SiteScore(10_000, 0.99, 0.01)}


@pytest.mark.parametrize(("how", "accuracy", "loss"), [
    ("weighted", (50 + 55 + 60 + 9900) / 10_300, (100 + 90 + 80 + 100) / 10_300),
    ("median", (0.55 + 0.6) / 2, (0.9 + 0.8) / 2),  # of four: the mean of the middle two, unweighted
    ("trimmed", (55 + 60) / 200, (90 + 80) / 200),  # without the lowest (a) and the highest (liar)
])
def test_combine_by_each_rule(how: str, accuracy: float, loss: float) -> None:
    combined = combine(FOUR, how)  # type: ignore[arg-type]
    assert combined is not None and combined.combination == how
    assert combined.accuracy == pytest.approx(accuracy) and combined.loss == pytest.approx(loss)
    assert combined.examples == 10_300 and combined.sites == 4  # every site counts here, whatever the rule
    assert (combined.worst_site, combined.best_site) == ("a", "liar")


def test_trimmed_with_fewer_than_three_sites_is_the_weighted_mean() -> None:
    two = {"a": SiteScore(10, 0.2, 1.0), "b": SiteScore(30, 0.6, 1.0)}
    combined = combine(two, "trimmed")
    assert combined is not None and combined.accuracy == pytest.approx((10 * 0.2 + 30 * 0.6) / 40)


@pytest.mark.parametrize(("distance", "named"), [(0.2, ("liar",)), (0.5, ()), (0.04, ("a", "liar"))])
def test_an_outlier_is_a_site_further_than_the_distance_from_the_median(distance: float, named: tuple[str, ...]
                                                                        ) -> None:
    combined = combine(FOUR, "weighted", distance)  # median 0.575: a is 0.075 off, liar 0.415
    assert combined is not None and combined.outliers == named


def test_two_sites_have_no_outlier() -> None:
    combined = combine({"a": SiteScore(1, 0.0, 1.0), "b": SiteScore(1, 1.0, 1.0)}, "weighted", 0.1)
    assert combined is not None and combined.outliers == ()


def test_the_spec_combination_reaches_the_round_and_an_outlier_is_named_in_an_event() -> None:
    scores = {"munich": (10, 0.8, 0.5), "hamburg": (30, 0.4, 1.0), "berlin": (20, 0.75, 0.6)}

    def three(task: Task, now: float) -> Observation:
        if task.kind == "evaluate":
            examples, accuracy, loss = scores[task.client or ""]
            return Observation("succeeded", 0, {"examples": examples, "accuracy": accuracy, "loss": loss})
        return answer(task, now)

    the_spec = sites_spec(clients={"list": [{"name": "munich", "site": {}}, {"name": "hamburg", "site": {}},
                                            {"name": "berlin", "site": {}}]},
                          evaluation={"central": False, "combine": "median", "outlierDistance": 0.3})
    sim = Simulation(the_spec, three)
    status = sim.run()
    record = status.round(2)
    assert status.phase == "Succeeded" and record is not None and record.federated is not None
    assert record.federated.accuracy == pytest.approx(0.75) and record.federated.combination == "median"
    assert record.federated.outliers == ["hamburg"]  # 0.35 from the median 0.75
    assert status.federated is not None and status.federated.outliers == ["hamburg"]
    assert status.to_json()["rounds"][-1]["federated"]["outliers"] == ["hamburg"]
    assert any(e.startswith("SiteScoreOutlier: round 2: accuracy further than 0.3 from the sites' median 0.75: "
                            "hamburg 0.4") for e in sim.events)


def test_the_champion_decision_reaches_the_status_and_an_event() -> None:
    def finalized(task: Task, now: float) -> Observation:
        if task.kind == "finalize":
            return Observation("succeeded", 0, {"model_uri": "models:/signs/3", "model_version": "3",
                                                "champion": False, "champion_reason": "not promoted: 1 site"})
        return answer(task, now)

    sim = Simulation(sites_spec(), finalized)
    status = sim.run()
    assert status.champion is False and status.champion_reason == "not promoted: 1 site"
    assert "ChampionDecided: model version 3: not promoted: 1 site" in sim.events


@pytest.mark.parametrize(("evaluation", "clients", "sites"), [
    ({}, {}, 2),  # no minSuccessful: every evaluating site
    ({}, {"minSuccessful": 1}, 1),
    ({"minSites": 1}, {"minSuccessful": 3}, 1),
])
def test_the_champion_needs_scores_from_a_quorum_of_sites(evaluation: dict[str, Any], clients: dict[str, Any],
                                                          sites: int) -> None:
    the_spec = sites_spec(evaluation={"central": False, **evaluation},
                          clients={"list": [{"name": "hq"}, {"name": "munich", "site": {}},
                                            {"name": "hamburg", "site": {}}], **clients})
    assert the_spec.champion_sites() == sites


@pytest.mark.parametrize(("change", "field"), [
    ({"clients": {"list": [{"name": "m", "site": {}, "data": {"claimName": "d"}}]}}, "clients.list[0].site"),
    ({"clients": {"count": 2}, "evaluation": {"central": False}}, "evaluation.central"),
    ({"clients": {"list": [{"name": "m", "site": {}}]}, "evaluation": {"minSites": 2}}, "evaluation.minSites"),
    ({"clients": {"count": 2}, "evaluation": {"combine": "mean"}}, "evaluation.combine"),
    ({"clients": {"count": 2}, "evaluation": {"outlierDistance": 0}}, "evaluation.outlierDistance"),
])
def test_site_specs_that_cannot_run_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec({"rounds": 1, **change})
    assert field in str(error.value)


def test_sites_on_kubernetes_need_an_object_store() -> None:
    problems = kubernetes_problems(sites_spec(storage={"persistentVolumeClaim": {"claimName": "fl"}}))
    assert any(p.startswith("spec.storage.s3: remote sites") for p in problems)


def test_a_carried_evaluation_waits_through_a_suspension_between_the_rounds() -> None:
    sim = Simulation(sites_spec(), answer)
    for _ in range(100):
        sim.tick()
        if "r0001-aggregate-a1" in sim.launched:
            break
    sim.spec = sites_spec(suspend=True)
    sim.tick()
    sim.tick(500)  # held after round 1, far past roundDeadlineSeconds
    assert sim.status.phase == "Suspended" and sim.status.current_round == 1
    sim.spec = sites_spec()
    status = sim.run()
    first = status.round(1)
    assert status.phase == "Succeeded" and first is not None and first.evaluations is not None
    assert {s: t.state for s, t in first.evaluations.items()} == {"hamburg": "succeeded", "munich": "succeeded"}


def test_a_carried_evaluation_waits_for_the_secure_stages_before_its_training() -> None:
    the_spec = sites_spec(clients={"list": [{"name": "hq"}, {"name": "munich", "site": {}},
                                            {"name": "hamburg", "site": {}}], "minSuccessful": 2},
                          privacy={"clipNorm": 5.0, "secureAggregation": {"threshold": 2}})

    sim = Simulation(the_spec, answer)
    for _ in range(400):
        sim.tick(60)  # each stage within its deadline (100 s), keys and shares together past one after round 1
        if sim.status.phase in ("Succeeded", "Failed"):
            break
    first = sim.status.round(1)
    assert sim.status.phase == "Succeeded", sim.status.message
    assert first is not None and first.evaluations is not None
    assert {s: t.state for s, t in first.evaluations.items()} == {"hamburg": "succeeded", "munich": "succeeded"}
