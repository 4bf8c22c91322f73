"""A coordinator with no data at all: two sites train and score round 1, finalize tracks the federated figures.

Site ``a`` holds a tree with a test split, site ``b`` one without (it scores its held-out tracks);
the coordinator aggregates without evaluating and finalizes with ``--no-central``, so the model's
accuracy and the champion rule come from the sites' scores alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtrain.contract.errors import EXIT_BAD_INPUT, EXIT_OK
from fedtrain.contract.federated import SiteScore, combine
from fedtrain.contract.layout import Layout, sidecar_of
from fedtrain.contract.sitetask import EVALUATION_LIMIT, ExampleBounds, ScoresRecord, evaluation_output
from fedtrain.contract.storage import DirectoryStore
from fedtrain.worker.data.synth import SynthConfig, generate
from fedtrain.worker.finalize import client_history, federated_rounds
from fedtrain.worker.tracking import Tracker, TrainingIdentity
from fedtrain.worker.weights import write_json
from tests.worker.test_site_task import MODEL, posted, site_task, worker

SITES = ("a", "b")


@pytest.fixture(scope="module")
def no_test_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Site b's own data: a small tree whose test folder is empty."""
    root = tmp_path_factory.mktemp("site-b")
    generate(root, SynthConfig(per_class=4, test_per_class=0, frames_per_track=2, seed=5, max_size=48))
    return root


@pytest.fixture(scope="module")
def finalized(synth_tree: Path, no_test_tree: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, dict[str, object], str]:
    """The whole federation through the CLI: init --no-data, two site rounds, aggregate, evaluations, finalize."""
    workdir = tmp_path_factory.mktemp("no-data-coordinator")
    data = {"a": synth_tree, "b": no_test_tree}
    assert worker("init", "--workdir", workdir, "--no-data", "--clients", 2, "--client-names", "a,b",
                  "--own-data-clients", "a,b", *MODEL)[0] == EXIT_OK
    for site in SITES:
        assert site_task(workdir, posted(workdir, "train", 1, site), data[site])[0] == EXIT_OK
    code, result = worker("aggregate", "--workdir", workdir, "--round", 1, "--sites", "a,b", "--no-evaluate",
                          "--termination-log", workdir / "termination", "--device", "cpu")
    assert code == EXIT_OK and result["accepted"] == list(SITES) and "accuracy" not in result
    assert "accuracy" not in json.loads((workdir / "termination").read_text())
    for site in SITES:
        assert site_task(workdir, posted(workdir, "evaluate", 1, site), data[site])[0] == EXIT_OK
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    code, summary = worker("finalize", "--workdir", workdir, "--round", 1, "--sites", "a,b", "--no-central",
                           "--tracking-uri", uri, "--registered-model-name", "signs", "--log-clients",
                           "--device", "cpu")
    assert code == EXIT_OK
    return workdir, summary, uri


def test_the_sites_scores_are_combined_into_the_final_accuracy(finalized: tuple[Path, dict[str, object], str]
                                                               ) -> None:
    workdir, summary, _ = finalized
    figures = {s: json.loads((workdir / Layout().site_evaluation(s, 1)).read_text()) for s in SITES}
    assert figures["a"]["split"] == "test" and figures["b"]["split"] == "validation"  # b has no test images
    expected = combine({s: SiteScore(f["examples"], f["accuracy"], f["loss"]) for s, f in figures.items()})
    assert expected is not None
    assert summary["federated_accuracy"] == pytest.approx(expected.accuracy)
    assert summary["accuracy"] == summary["federated_accuracy"]  # no central test set: the sites' figure
    assert summary["champion"] is True and summary["tracking_error"] is None
    assert (workdir / "final" / "plots" / "federated_accuracy.png").is_file()
    assert not (workdir / "final" / "plots" / "accuracy.png").exists()  # no central accuracy to plot


def test_mlflow_holds_the_federated_metrics_and_the_sites_fingerprint(
        finalized: tuple[Path, dict[str, object], str]) -> None:
    workdir, summary, uri = finalized
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, uri)
    run = str(summary["run_id"])
    figures = {s: json.loads((workdir / Layout().site_evaluation(s, 1)).read_text()) for s in SITES}
    for site in SITES:
        [metric] = client.get_metric_history(run, f"site_{site}_accuracy")
        assert metric.step == 1 and metric.value == pytest.approx(figures[site]["accuracy"])
    [federated] = client.get_metric_history(run, "federated_accuracy")
    assert federated.step == 1 and federated.value == pytest.approx(summary["federated_accuracy"])
    [worst] = client.get_metric_history(run, "federated_worst_accuracy")
    assert worst.value == pytest.approx(min(f["accuracy"] for f in figures.values()))
    tags = client.get_model_version("signs", str(summary["model_version"])).tags
    assert tags["test_fingerprint"] == "sites:a,b" and tags["evaluation"] == "federated"
    assert {r.data.tags.get("fedtrain.client") for r in client.search_runs(
        [client.get_run(run).info.experiment_id], f"tags.`mlflow.parentRunId` = '{run}'")} == set(SITES)


def test_a_champion_from_another_test_set_is_kept_without_one_to_score_it(
        finalized: tuple[Path, dict[str, object], str]) -> None:
    _, summary, uri = finalized
    tracker = Tracker(uri, "fedtrain", TrainingIdentity("t", "ns", "u", "fedavg", {}), None)
    champion = str(summary["model_version"])  # scored by sites a and b
    elsewhere = str(tracker.client.create_model_version("signs", source="file:///nowhere").version)
    promoted, reason = tracker.decide_champion("signs", elsewhere, 1.0, "sites:c", None)
    assert not promoted and "no test set here" in reason
    assert str(tracker.client.get_model_version_by_alias("signs", "champion").version) == champion
    assert tracker.client.get_model_version("signs", elsewhere).tags["champion_decision"] == reason
    better = str(tracker.client.create_model_version("signs", source="file:///nowhere").version)
    accuracy = float(tracker.client.get_model_version("signs", champion).tags["accuracy"])
    assert accuracy == pytest.approx(float(str(summary["federated_accuracy"])), abs=1e-6)
    assert not tracker.decide_champion("signs", better, accuracy, "sites:a,b", None)[0]  # equal: not better
    promoted, reason = tracker.decide_champion("signs", better, accuracy + 0.01, "sites:a,b", None)
    assert promoted and "beats the champion" in reason
    assert str(tracker.client.get_model_version_by_alias("signs", "champion").version) == better


def test_below_the_quorum_of_sites_the_model_is_registered_not_promoted(
        finalized: tuple[Path, dict[str, object], str], capsys: pytest.CaptureFixture[str]) -> None:
    """Two sites scored the last model; a training that needs three registers it and says why it is not champion."""
    workdir, _, _ = finalized
    uri = f"sqlite:///{workdir / 'quorum.db'}"
    code, summary = worker("finalize", "--workdir", workdir, "--round", 1, "--sites", "a,b", "--no-central",
                           "--min-site-scores", 3, "--tracking-uri", uri, "--registered-model-name", "signs",
                           "--termination-log", workdir / "termination-quorum", "--device", "cpu")
    assert code == EXIT_OK and summary["model_version"] == "1" and summary["champion"] is False
    assert summary["champion_reason"] == ("not promoted: 2 sites scored the model of round 1 (a, b), the champion "
                                          "needs scores from at least 3 (spec.evaluation.minSites)")
    from mlflow.tracking import MlflowClient

    assert not MlflowClient(uri, uri).get_registered_model("signs").aliases  # registered, no champion alias
    short = json.loads((workdir / "termination-quorum").read_text())
    assert short["champion"] is False and short["champion_reason"].startswith("not promoted: 2 sites")
    code, _ = worker("finalize", "--workdir", workdir, "--round", 1, "--sites", "a,b", "--no-central",
                     "--min-site-scores", 0, "--device", "cpu")
    assert code == EXIT_BAD_INPUT and "--min-site-scores must be >= 1" in capsys.readouterr().err


def test_finalize_combines_a_round_as_the_coordinators_record_says(tmp_path: Path) -> None:
    store, layout = DirectoryStore(tmp_path), Layout()
    figures = {"a": (10, 0.2), "b": (10, 0.5), "c": (1000, 0.9)}
    scores = {s: evaluation_output({"examples": n, "accuracy": a, "loss": 1.0}) for s, (n, a) in figures.items()}
    store.write_bytes(layout.federated_scores(1), ScoresRecord(round=1, sites=scores, combine="median").encode())
    for site, (n, a) in figures.items():  # round 2 has no record: the sites' files, combined as told
        for round_number in (1, 2):
            evaluation = {"examples": n, "accuracy": a, "loss": 1.0, "round": round_number, "split": "test"}
            store.write_bytes(layout.site_evaluation(site, round_number), json.dumps(evaluation).encode())
    found = federated_rounds(store, ("a", "b", "c"), 2, how="trimmed")
    assert found[1].combined.combination == "median" and found[1].combined.accuracy == 0.5  # not 0.886, weighted
    assert 2 not in found  # a training with records: a round without one never falls back to the sites' files
    older = DirectoryStore(tmp_path / "older")  # begun before records were kept: the files, combined as told
    for site, (n, a) in figures.items():
        evaluation = {"examples": n, "accuracy": a, "loss": 1.0, "round": 2, "split": "test"}
        older.write_bytes(layout.site_evaluation(site, 2), json.dumps(evaluation).encode())
    found = federated_rounds(older, ("a", "b", "c"), 2, how="trimmed")
    assert found[2].combined.combination == "trimmed" and found[2].combined.accuracy == 0.5  # a and c left out


def test_finalize_takes_the_scores_the_coordinator_accepted_not_the_sites_own_files(tmp_path: Path) -> None:
    """MLflow and the champion rule see the status's figures: a site's file never adds a score the engine refused."""
    store, layout = DirectoryStore(tmp_path), Layout()
    honest = {"examples": 10, "accuracy": 0.4, "loss": 1.0, "round": 1, "split": "test"}
    store.write_bytes(layout.site_evaluation("a", 1), json.dumps(honest).encode())
    store.write_bytes(layout.site_evaluation("b", 1), json.dumps({**honest, "accuracy": 7.0}).encode())
    store.write_bytes(layout.site_evaluation("c", 1), b"x" * (EVALUATION_LIMIT + 1))
    found = federated_rounds(store, ("a", "b", "c"), 2)  # no record (an older training): the files, checked
    assert found[1].sites == {"a": SiteScore(10, 0.4, 1.0)} and 2 not in found
    assert federated_rounds(store, ("a", "b"), 2, ExampleBounds(5)) == {}  # a claims more than it may

    accepted = {"b": evaluation_output({"examples": 30, "accuracy": 0.6, "loss": 0.5})}
    store.write_bytes(layout.federated_scores(1), ScoresRecord(round=1, sites=accepted).encode())
    store.write_bytes(layout.site_result("a", "e0002-a-a1"), b"{}")  # round 2: an answer, no evaluation.json
    store.write_bytes(layout.federated_scores(2), ScoresRecord(round=2, sites={}).encode())  # none accepted
    found = federated_rounds(store, ("a", "b", "c"), 2)
    assert found[1].sites == {"b": SiteScore(30, 0.6, 0.5)} and found[1].combined.accuracy == 0.6
    assert 2 not in found  # recorded without scores: no figures, whatever the files say


def test_the_client_history_reads_the_attempt_the_aggregation_accepted(tmp_path: Path) -> None:
    """A site's upload after the round and a stale in-cluster attempt both sit beside the accepted ones: ignored."""
    store, layout = DirectoryStore(tmp_path), Layout(sites=frozenset({"munich"}))
    written = {("munich", 1): 0.5, ("munich", 2): 0.9, ("hq", 1): 0.1, ("hq", 2): 0.7, ("junk", 1): 0.3}
    for (client, attempt), accuracy in written.items():
        write_json(store, sidecar_of(layout.client_update(1, client, attempt)),
                   {"num_examples": 5, "metrics": {"val_accuracy": accuracy, "loss": float("nan")}})
    results = [{"round": 1, "accepted": ["hq", "munich"], "attempts": {"hq": 2, "munich": 1, "junk": 1}}]
    assert client_history(store, results) == {"hq": [(1, {"val_accuracy": 0.7, "num_examples": 5.0})],
                                              "munich": [(1, {"val_accuracy": 0.5, "num_examples": 5.0})]}
