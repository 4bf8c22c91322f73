"""A hostile site against `fedtrain run`: each answer it writes with its own keys is refused, the training goes on.

Two in-cluster clients train honestly; the site ``evil`` answers every task it is posted, writing
only where a site may write (``sites/evil/``), each time with another kind of lie: an update that
claims 10^9 examples, an answer whose output is a list, wrong types, an accuracy of 7.0 over 10^18
examples, a NaN accuracy, an answer far over its size limit. The coordinator must refuse each one
with its reason and finish the training on the honest clients' updates alone. In the last round
the site claims the most examples maxExamples allows (a thousand times the honest clients'): its
update counts, weighted as 10 times the round's median count, no more.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedtrain.contract.layout import Layout
from fedtrain.contract.sitetask import (
    DEFAULT_MAX_EXAMPLES,
    PROTOCOL_VERSION,
    RESULT_LIMIT,
    SiteTask,
    parse_posting,
    parse_scores_record,
)
from fedtrain.contract.storage import DirectoryStore
from fedtrain.worker.weights import read_weights, save_weights

pytestmark = pytest.mark.timeout(600)  # about 20 s on two busy cores: the cases, kept in the default suite
EVIL = "evil"
LAYOUT = Layout(sites=frozenset({EVIL}))


def manifest() -> dict[str, Any]:
    return {"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedTraining", "metadata": {"name": "hostile"},
            "spec": {"rounds": 4, "seed": 3, "model": {"architecture": "tiny_cnn", "imageSize": 16},
                     "dataset": {"synthetic": {"imagesPerClass": 4, "testImagesPerClass": 2, "framesPerTrack": 2}},
                     "clients": {"list": [{"name": "a"}, {"name": "b"}, {"name": EVIL, "site": {}}],
                                 "minSuccessful": 2},
                     "training": {"localEpochs": 1, "learningRate": 0.01}, "roundDeadlineSeconds": 120,
                     "worker": {"parallelism": 2, "device": "cpu"}}}


def answer(task: SiteTask, output: object, **fields: object) -> bytes:
    return json.dumps({"task": task.id, "site": EVIL, "state": "succeeded", "exit_code": 0, "reason": None,
                       "output": output, "version": PROTOCOL_VERSION, **fields}).encode()


def claimed_update(store: DirectoryStore, task: SiteTask) -> bytes:
    """An update of the right shape, from the right base, that claims to stand for 10^9 examples."""
    weights, meta = read_weights(store, task.global_key)
    moved = {k: (v - 0.5).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in weights.items()}
    digest = save_weights(store, LAYOUT.client_update(task.round, EVIL, task.attempt), moved,
                          {"client": EVIL, "round": task.round, "num_examples": 10**9, "base_sha256": meta["sha256"]})
    return answer(task, {"num_examples": 100, "metrics": {}, "sha256": digest})


def largest_claim(store: DirectoryStore, task: SiteTask) -> bytes:
    """A small, well-formed update that claims maxExamples: within every absolute bound, far past its peers'."""
    weights, meta = read_weights(store, task.global_key)
    moved = {k: (v - 1e-3).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in weights.items()}
    digest = save_weights(store, LAYOUT.client_update(task.round, EVIL, task.attempt), moved,
                          {"client": EVIL, "round": task.round, "num_examples": DEFAULT_MAX_EXAMPLES,
                           "base_sha256": meta["sha256"]})
    return answer(task, {"num_examples": DEFAULT_MAX_EXAMPLES, "metrics": {}, "sha256": digest})


def with_figures(make: Callable[[DirectoryStore, SiteTask], bytes], figures: dict[str, Any]
                 ) -> Callable[[DirectoryStore, SiteTask], bytes]:
    """A training answer that also carries (lying) figures of the model it trained from."""
    def lie(store: DirectoryStore, task: SiteTask) -> bytes:
        document = json.loads(make(store, task))
        document["output"]["evaluation"] = figures
        return json.dumps(document).encode()
    return lie


# Rounds 1 to 3's models are scored by the next round's training answers (each lie there fails the training,
# and with it the score it carried, or only the score); round 4's, the last, by an evaluation task of its own.
LIES: dict[str, Callable[[DirectoryStore, SiteTask], bytes]] = {
    "r0001": claimed_update,
    "r0002": lambda store, task: answer(task, [1, 2, 3]),
    "r0003": lambda store, task: b" " * (50 * RESULT_LIMIT) + answer(task, {"num_examples": 5, "metrics": {},
                                                                           "sha256": "a" * 64}),
    "r0004": with_figures(largest_claim, {"examples": 40, "accuracy": float("nan"), "loss": 0.1}),
    "e0004": lambda store, task: answer(task, {"examples": 10**18, "accuracy": 7.0, "loss": 0.0}),
}
REASONS = {
    "r0002": "output: Input should be an object", "r0003": "bytes allowed for it; refused without reading it",
    "e0001": "output: Input should be an object", "e0002": "bytes allowed for it; refused without reading it",
    "e0003": "accuracy: Input should be a finite number",
    "e0004": "accuracy: Input should be less than or equal to 1",
}


def play_evil(store: DirectoryStore, stop: threading.Event, answered: list[str]) -> None:
    """Answer each posted task once, with the lie of its kind and round; also claim 7.0 in its own evaluation file."""
    while not stop.wait(0.2):
        try:
            task = parse_posting(store.read_bytes(LAYOUT.site_task(EVIL))).task
        except Exception:  # not posted yet
            continue
        if task is None or task.id in answered:
            continue
        scored = task.round if task.kind == "evaluate" else task.round - 1 if task.evaluate_base else None
        if scored is not None:
            figures = {"examples": 10**18, "accuracy": 7.0, "loss": 0.0, "round": scored, "split": "test"}
            store.write_bytes(LAYOUT.site_evaluation(EVIL, scored), json.dumps(figures).encode())
        store.write_bytes(LAYOUT.site_result(EVIL, task.id), LIES[task.id[:5]](store, task))
        answered.append(task.id)


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, subprocess.CompletedProcess[str],
                                                                            list[str]]]:
    root = tmp_path_factory.mktemp("hostile")
    (root / "ft.yaml").write_text(yaml.safe_dump(manifest()))
    workdir = root / "w"
    stop, answered = threading.Event(), []
    site = threading.Thread(target=play_evil, args=(DirectoryStore(workdir), stop, answered), daemon=True)
    site.start()
    try:
        done = subprocess.run([sys.executable, "-m", "fedtrain.cli", "run", str(root / "ft.yaml"), "--workdir",
                               str(workdir)], capture_output=True, text=True, timeout=540)
    finally:
        stop.set()
        site.join(timeout=10)
    yield workdir, done, answered


def test_the_training_succeeds_and_every_lie_is_refused_with_its_reason(
        hostile_run: tuple[Path, subprocess.CompletedProcess[str], list[str]]) -> None:
    workdir, done, answered = hostile_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(answered) == sorted(f"{k}-{EVIL}-a1" for k in LIES)  # refusals are not retried
    status = json.loads((workdir / "status.json").read_text())
    assert status["phase"] == "Succeeded", status["message"]
    rounds = {r["round"]: r for r in status["rounds"]}
    assert "claims 1000000000 examples, more than the 1000000" in rounds[1]["rejected"][EVIL]
    for number in (2, 3):
        evil = rounds[number]["clients"][EVIL]
        assert evil["state"] == "failed" and evil["exitCode"] == 3, evil
        assert REASONS[f"r{number:04d}"] in evil["reason"] and "evil's answer was refused" in evil["reason"]
    for number in (1, 2, 3, 4):
        evaluation = rounds[number]["evaluations"][EVIL]
        assert evaluation["state"] == "failed" and REASONS[f"e{number:04d}"] in evaluation["reason"], evaluation
        assert rounds[number].get("carried", False) == (number < 4)
        assert "federated" not in rounds[number] and rounds[number].get("siteScores", {}) == {}
        assert rounds[number]["clients"]["a"]["state"] == rounds[number]["clients"]["b"]["state"] == "succeeded"
    assert 0 <= status["bestAccuracy"] <= 1 and "federatedAccuracy" not in status
    assert status["accuracy"] == pytest.approx(rounds[4]["accuracy"], rel=1e-3)  # the central test split's
    assert f"UpdatesCapped: round 4: {EVIL}: claims {DEFAULT_MAX_EXAMPLES} examples; weighted as" in done.stdout


def test_the_model_is_the_honest_clients_mean(
        hostile_run: tuple[Path, subprocess.CompletedProcess[str], list[str]]) -> None:
    workdir = hostile_run[0]
    store = DirectoryStore(workdir)
    for number in (1, 2, 3):
        result = json.loads((workdir / LAYOUT.result(number)).read_text())
        assert result["accepted"] == ["a", "b"] and result["capped"] == {}
        base, _ = read_weights(store, LAYOUT.global_weights(number - 1))
        model, _ = read_weights(store, LAYOUT.global_weights(number))
        updates = [read_weights(store, LAYOUT.client_update(number, c, result["attempts"][c])) for c in ("a", "b")]
        total = sum(meta["num_examples"] for _, meta in updates)
        for name, array in ((n, a) for n, a in model.items() if a.dtype.kind == "f"):
            mean = base[name] + sum(meta["num_examples"] * (w[name] - base[name]) for w, meta in updates) / total
            assert np.isfinite(array).all()
            np.testing.assert_allclose(array, mean, atol=1e-5)


def test_the_largest_claim_counts_as_ten_times_the_rounds_median_and_no_more(
        hostile_run: tuple[Path, subprocess.CompletedProcess[str], list[str]]) -> None:
    workdir = hostile_run[0]
    store = DirectoryStore(workdir)
    result = json.loads((workdir / LAYOUT.result(4)).read_text())
    assert sorted(result["accepted"]) == ["a", "b", EVIL]
    updates = {c: read_weights(store, LAYOUT.client_update(4, c, result["attempts"][c])) for c in ("a", "b", EVIL)}
    median = sorted(meta["num_examples"] for _, meta in updates.values())[1]  # the larger honest count
    assert updates[EVIL][1]["num_examples"] == DEFAULT_MAX_EXAMPLES > 100 * median
    assert result["capped"] == {EVIL: f"claims {DEFAULT_MAX_EXAMPLES} examples; weighted as {10 * median} (10 x the "
                                      f"round's median {median}, clients.maxWeightOverMedian)"}
    weights = {c: 10 * median if c == EVIL else meta["num_examples"] for c, (_, meta) in updates.items()}
    assert weights[EVIL] / sum(weights.values()) < 10 / 11  # uncapped: 99.99%
    base, _ = read_weights(store, LAYOUT.global_weights(3))
    model, _ = read_weights(store, LAYOUT.global_weights(4))
    for name, array in ((n, a) for n, a in model.items() if a.dtype.kind == "f"):
        step = sum(weights[c] * (w[name] - base[name]) for c, (w, _) in updates.items()) / sum(weights.values())
        np.testing.assert_allclose(array, base[name] + step, atol=1e-5)


def test_finalize_reads_only_the_scores_the_coordinator_accepted(
        hostile_run: tuple[Path, subprocess.CompletedProcess[str], list[str]]) -> None:
    workdir = hostile_run[0]
    for number in (1, 2, 3, 4):  # the site's own evaluation.json claims 7.0: the record says nothing was accepted
        assert parse_scores_record((workdir / LAYOUT.federated_scores(number)).read_bytes()).sites == {}
    summary = json.loads((workdir / "final" / "summary.json").read_text())
    assert summary["federated_accuracy"] is None and summary["federated"] is None
    assert 0 <= summary["accuracy"] <= 1
