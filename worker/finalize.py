"""The last task of a training: final model and plots in storage, then everything into MLflow.

Tracking failures never fail the task: the model and plots are already safe in storage, and the
report says what could not be logged (the engine turns that into a Degraded condition).

Rounds scored by sites (federated evaluation) take the scores the coordinator's engine accepted,
as the coordinator recorded them (``round-NNNN/federated.json``), combined with
`federated.combine`: the same scores and the same arithmetic as the status. A round without a
record has no federated figures: the sites' own ``evaluation.json`` files are read only for a
training started before the coordinator kept records (then within `EVALUATION_LIMIT`, checked as
strictly as an answer; a file that is not a valid score is left out, not failing the last step).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtrain.contract.errors import BadDataError
from fedtrain.contract.federated import FederatedScore, SiteScore, combine
from fedtrain.contract.layout import Layout, is_number
from fedtrain.contract.sitetask import (
    EVALUATION_LIMIT,
    SIDECAR_LIMIT,
    Combination,
    ExampleBounds,
    ScoresRecord,
    parse_evaluation,
    parse_scores_record,
)
from fedtrain.contract.storage import Store
from fedtrain.worker.data.gtsrb import GtsrbTree
from fedtrain.worker.jobs import Stopwatch, Workspace
from fedtrain.worker.models import build_model
from fedtrain.worker.tracking import Tracker, TrackingReport, TrainingIdentity
from fedtrain.worker.training import evaluate, load_numpy_state
from fedtrain.worker.weights import read_json, read_weights, sidecar_of, write_json

PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1"]


@dataclass(frozen=True)
class TrackingConfig:
    """Where and under which names to track; ``uri=None`` skips tracking."""

    uri: str | None
    experiment: str = "fedtrain"
    registered_model_name: str | None = None
    log_clients: bool = False
    promote: bool = True  # move the champion alias when the new version beats it


@dataclass(frozen=True)
class EvaluationConfig:
    """Where the rounds' global models were scored: on the central test split, at these sites, or both."""

    sites: tuple[str, ...] = ()  # the evaluating sites
    central: bool = True  # false: the coordinator has no test set; the champion rule uses the sites' scores
    examples: ExampleBounds = field(default_factory=ExampleBounds)  # the most examples a site's score may claim
    combine: Combination = "weighted"  # for a round without the coordinator's record (which says how it combined)
    min_sites: int = 1  # without a central test set: the champion moves only on scores from this many sites


@dataclass(frozen=True)
class RoundScores:
    """The sites' scores of one round's global model, and their combination."""

    round: int
    combined: FederatedScore
    sites: dict[str, SiteScore] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """MLflow metrics of the round: the federation's figures and each site's accuracy."""
        figures = {"federated_accuracy": self.combined.accuracy, "federated_loss": self.combined.loss,
                   "federated_worst_accuracy": self.combined.worst_accuracy,
                   "federated_best_accuracy": self.combined.best_accuracy,
                   "federated_examples": float(self.combined.examples)}
        figures.update({f"site_{name}_accuracy": score.accuracy for name, score in self.sites.items()})
        return figures


def federated_rounds(store: Store, sites: tuple[str, ...], last_round: int,
                     bounds: ExampleBounds | None = None, how: Combination = "weighted") -> dict[int, RoundScores]:
    """Each round's accepted site scores, combined as the coordinator's record says (rounds no site scored are absent).

    Only the records count once a training has any: a round without one (its record's write failed,
    or a site answered for a round the coordinator never evaluated) has no federated figures, never
    the sites' own files. A training begun before the coordinator kept records has none at all: then,
    and only then, the sites' files are read, each checked, and combined by ``how`` (evaluation.combine).
    """
    records = {n: record for n in range(1, last_round + 1) if (record := _recorded(store, n)) is not None}
    if not records:
        return _rounds_from_site_files(store, sites, last_round, bounds or ExampleBounds(), how)
    rounds = {}
    for round_number, record in records.items():
        scores = {site: SiteScore(s.examples, s.accuracy, s.loss) for site, s in record.sites.items()}
        combined = combine(scores, record.combine, record.outlier_distance)
        if combined is not None:
            rounds[round_number] = RoundScores(round_number, combined, scores)
    return rounds


def _rounds_from_site_files(store: Store, sites: tuple[str, ...], last_round: int, bounds: ExampleBounds,
                            how: Combination) -> dict[int, RoundScores]:
    """A training without records: each round's scores from the sites' own files, each read strictly."""
    layout, rounds = Layout(), {}
    for round_number, answered in sorted(_evaluated_rounds(store, sites, last_round).items()):
        scores = {site: score for site in sorted(answered)
                  if (score := _site_score(store, layout.site_evaluation(site, round_number), bounds.of(site)))}
        combined = combine(scores, how)
        if combined is not None:
            rounds[round_number] = RoundScores(round_number, combined, scores)
    return rounds


def _evaluated_rounds(store: Store, sites: tuple[str, ...], last_round: int) -> dict[int, set[str]]:
    """Round -> the sites that answered an evaluation of its model or wrote its scores (one listing per site)."""
    layout = Layout()
    found: dict[int, set[str]] = {}
    for site in sites:
        keys = set(store.list(layout.site_dir(site)))
        answers = f"{layout.site_dir(site)}/results/e"  # an evaluation's task id: e0003-munich-a1
        answered = {int(key[len(answers):][:4]) for key in keys
                    if key.startswith(answers) and is_number(key[len(answers):][:4])}
        for round_number in range(1, last_round + 1):
            if round_number in answered or layout.site_evaluation(site, round_number) in keys:
                found.setdefault(round_number, set()).add(site)
    return found


def _recorded(store: Store, round_number: int) -> ScoresRecord | None:
    """The scores the coordinator accepted for a round and how it combined them, or None without a record."""
    key = Layout().federated_scores(round_number)
    try:
        return parse_scores_record(store.read_bounded(key, EVALUATION_LIMIT), store.describe(key))
    except BadDataError:
        return None


def _site_score(store: Store, key: str, max_examples: int) -> SiteScore | None:
    """A site's own figures, or None when its file is not a valid score."""
    try:
        figures = parse_evaluation(store.read_bounded(key, EVALUATION_LIMIT), max_examples, store.describe(key))
    except BadDataError:
        return None
    return SiteScore(figures.examples, figures.accuracy, figures.loss)


def sites_fingerprint(sites: list[str]) -> str:
    """The "test set" of a federated score: the sites that scored it (the same sites, the same held-out data)."""
    names = ",".join(sorted(sites))
    if len(names) > 200:
        names = "sha256:" + hashlib.sha256(names.encode()).hexdigest()[:16]
    return f"sites:{names}"


def test_fingerprint(tree: GtsrbTree) -> str:
    """Identifies a test set by its samples, labels and file sizes: equal fingerprints, same test set."""
    digest = hashlib.sha256()
    for sample in tree.test:
        digest.update(f"{sample.sample_id}:{sample.class_id}:{tree.path_of(sample).stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def finalize(workspace: Workspace, last_round: int, identity: TrainingIdentity, tracking: TrackingConfig,
             device: torch.device, evaluation: EvaluationConfig | None = None) -> dict[str, Any]:
    """Write ``final/`` (model, plots, summary) and track the training; return what the engine records.

    ``timings`` in the summary: the seconds of each step, for the benchmarks.
    """
    evaluation = evaluation or EvaluationConfig()
    clock = Stopwatch()
    layout, store = workspace.layout, workspace.store
    final = layout.final_dir
    source = layout.global_weights(last_round)
    store.write_bytes(f"{final}/model.json", store.read_bytes(sidecar_of(source)))  # sidecar first: its sha256
    store.write_bytes(f"{final}/model.safetensors", store.read_bytes(source))  # is checked against this copy
    results = [read_json(store, layout.result(r)) for r in range(1, last_round + 1) if store.exists(layout.result(r))]
    scored = Scored(results, federated_rounds(store, evaluation.sites, last_round, evaluation.examples,
                                              evaluation.combine), evaluation.central, evaluation.min_sites)
    clock.lap("results")
    with tempfile.TemporaryDirectory(prefix="fedtrain-final-") as scratch:
        drawn = Plots(Path(scratch), results, scored.federated, store, final, clock)
        drawn.start()  # drawn beside the tracking below, on another core
        store.download(f"{final}/model.json", Path(scratch) / "model.json")
        report = None
        if tracking.uri:
            report = _track(workspace, last_round, identity, tracking, scored,
                            lambda: [*drawn.wait(), Path(scratch) / "model.json"], device, clock)
        plots = drawn.wait()
        last = scored.federated.get(last_round)
        summary: dict[str, Any] = {"rounds": last_round, "model_path": store.describe(f"{final}/model.safetensors"),
                                   "accuracy": scored.accuracy(last_round),
                                   "federated_accuracy": last.combined.accuracy if last else None,
                                   "federated": asdict(last.combined) if last else None,
                                   "plots": [store.describe(f"{final}/plots/{p.name}") for p in plots]}
        if report is not None:
            summary.update({"run_id": report.run_id, "model_uri": report.model_uri,
                            "model_version": report.model_version, "champion": report.champion,
                            "champion_reason": report.champion_reason,
                            "not_logged": report.not_logged, "tracking_error": report.error})
    summary["timings"] = clock.laps
    write_json(store, f"{final}/summary.json", summary)
    return summary


@dataclass(frozen=True)
class Scored:
    """How the training's global models scored: the aggregations' results and the sites' evaluations."""

    results: list[dict[str, Any]]
    federated: dict[int, RoundScores]
    central: bool = True
    min_sites: int = 1  # without a central test set: sites whose scores the champion rule needs

    def accuracy(self, last_round: int) -> float | None:
        """The final model's accuracy: central when there is a central test set, else the sites' combined."""
        if self.central:
            return self.results[-1].get("accuracy") if self.results else None
        last = self.federated.get(last_round)
        return last.combined.accuracy if last else None


class Plots:
    """The training's plots, drawn in a forked process while finalize tracks, then copied to ``final/plots``.

    Drawing them (with matplotlib's import) took 0.4 to 0.7 s of finalize's critical path while the
    second core was idle. The child draws into ``folder`` and exits; `wait` collects it and uploads
    the files. Where the child cannot be forked, or did not draw them all, this process draws them.
    """

    def __init__(self, folder: Path, results: list[dict[str, Any]], federated: dict[int, RoundScores],
                 store: Store, final: str, clock: Stopwatch) -> None:
        self.drawings = _drawings(folder, results, federated)
        self.store, self.final, self.clock = store, final, clock
        self.child: int | None = None
        self.done: list[Path] | None = None

    def start(self) -> None:
        """Fork the child that draws (nothing to draw, or no fork: `wait` draws)."""
        if not self.drawings or not hasattr(os, "fork"):
            return
        try:
            child = os.fork()
        except OSError:
            return
        if child == 0:  # pragma: no cover - the forked child: draw, then leave without Python's teardown
            code = 1
            try:
                for _, draw in self.drawings:
                    draw()
                code = 0
            finally:
                os._exit(code)
        self.child = child

    def wait(self) -> list[Path]:
        """The plots' paths once drawn and uploaded (the first call waits; later calls return them)."""
        if self.done is None:
            drew = False
            if self.child is not None:
                _, status = os.waitpid(self.child, 0)
                drew = os.waitstatus_to_exitcode(status) == 0
            for path, draw in self.drawings:
                if not (drew and path.is_file()):
                    draw()  # here, so that what failed in the child fails (and says why) here
                self.store.upload(f"{self.final}/plots/{path.name}", path)
            self.done = [path for path, _ in self.drawings]
            self.clock.lap("plots_wait")
        return self.done


def _drawings(folder: Path, results: list[dict[str, Any]], federated: dict[int, RoundScores]
              ) -> list[tuple[Path, Callable[[], Path]]]:
    """Each plot's file and how to draw it; matplotlib is imported by whoever draws."""
    def per_round(path: Path, rounds: list[int], values: list[float], label: str, title: str) -> Callable[[], Path]:
        def draw() -> Path:
            from fedtrain.worker.plots import plot_per_round

            return plot_per_round(path, rounds, values, label, title)
        return draw

    def confusion(path: Path, matrix: list[list[int]], title: str) -> Callable[[], Path]:
        def draw() -> Path:
            from fedtrain.worker.plots import plot_confusion

            return plot_confusion(path, matrix, title)
        return draw

    rounds = [int(r["round"]) for r in results]
    drawings = []
    if federated:
        path = folder / "federated_accuracy.png"
        accuracies = [s.combined.accuracy for s in federated.values()]
        drawings.append((path, per_round(path, list(federated), accuracies, "federated accuracy",
                                         "Global model accuracy at the sites (example-weighted)")))
    if results and all("accuracy" in r for r in results):
        path = folder / "accuracy.png"
        drawings.append((path, per_round(path, rounds, [r["accuracy"] for r in results], "test accuracy",
                                         "Global model accuracy per round")))
        path = folder / "loss.png"
        drawings.append((path, per_round(path, rounds, [r["loss"] for r in results], "test loss",
                                         "Global model loss per round")))
    if results and "confusion" in results[-1]:
        path = folder / "confusion.png"
        drawings.append((path, confusion(path, results[-1]["confusion"], f"Confusion matrix after round {rounds[-1]}")))
    return drawings


def client_history(store: Store, results: list[dict[str, Any]]) -> dict[str, list[tuple[int, dict[str, float]]]]:
    """Each accepted client's local metrics per round, from the sidecar of the update the aggregation accepted.

    Which attempt that is comes from the round's ``result.json`` (``accepted`` and ``attempts``: what
    the aggregation read, by the engine's count), never from the highest key present: a stale
    attempt's late upload, or a site's upload after the round, does not stand for the round.
    """
    layout = Layout(frozenset(key.split("/")[1] for key in store.list("sites")))
    history: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for result in results:
        round_number, attempts = int(result["round"]), result.get("attempts") or {}
        for client in result.get("accepted") or ():
            key = sidecar_of(layout.client_update(round_number, client, int(attempts.get(client, 1))))
            if store.exists(key):
                history.setdefault(client, []).append((round_number, _local_metrics(read_json(store, key,
                                                                                               SIDECAR_LIMIT))))
    return history


def _local_metrics(meta: dict[str, Any]) -> dict[str, float]:
    """An update sidecar's finite metrics and its example count (a site wrote its own: anything else is left out)."""
    found = meta.get("metrics")
    metrics = {str(k): float(v) for k, v in (found.items() if isinstance(found, dict) else ())
               if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    examples = meta.get("num_examples")
    metrics["num_examples"] = float(examples) if isinstance(examples, int) and not isinstance(examples, bool) else 0.0
    return metrics


def _track(workspace: Workspace, last_round: int, identity: TrainingIdentity, tracking: TrackingConfig,
           scored: Scored, plots: Callable[[], list[Path]], device: torch.device, clock: Stopwatch
           ) -> TrackingReport:
    report = TrackingReport()
    assert tracking.uri is not None
    # An sqlite store keeps its artifacts beside its database file (the server's store decides otherwise).
    artifact_root = Path(tracking.uri.removeprefix("sqlite:///")).parent / "mlartifacts" \
        if tracking.uri.startswith("sqlite:///") else None
    try:
        tracker = Tracker(tracking.uri, tracking.experiment, identity, artifact_root)
        clock.lap("tracking_store")
        report.run_id = tracker.parent_run()
        clock.lap("tracking_run")
    except Exception as error:
        report.not_logged["run"] = _short(error)
        report.not_logged["metrics"] = "no run"
        report.not_logged["model"] = "no run"
        return report
    federated = {number: scores.metrics() for number, scores in scored.federated.items()}
    steps: list[tuple[str, Any]] = [
        ("metrics", lambda: tracker.round_metrics(report.run_id, scored.results, federated)),
    ]
    if tracking.log_clients:
        steps.append(("client runs", lambda: tracker.client_runs(report.run_id, client_history(workspace.store,
                                                                                                scored.results))))
    steps.append(("model", lambda: _log_model(workspace, last_round, identity, tracking, tracker, report, scored,
                                              device, clock)))
    steps.append(("plots", lambda: tracker.artifacts(report.run_id, plots())))  # last: drawn meanwhile
    for what, step in steps:
        try:
            step()
        except Exception as error:
            report.not_logged[what] = _short(error)
        clock.lap(f"tracking_{'champion' if what == 'model' else what.replace(' ', '_')}")
    try:
        tracker.finish(report.run_id)
    except Exception as error:
        report.not_logged["run end"] = _short(error)
    clock.lap("tracking_finish")
    return report


@dataclass(frozen=True)
class Judged:
    """What the champion rule compares: the final model's accuracy on which test set, and how to score another."""

    accuracy: float | None
    fingerprint: str
    score_champion: Callable[[str], float] | None


def _judged(workspace: Workspace, last_round: int, scored: Scored, device: torch.device) -> Judged:
    """Central: the test split's fingerprint, and the champion scored on it. Otherwise: the sites that scored."""
    if not scored.central:
        last = scored.federated.get(last_round)
        return Judged(last.combined.accuracy if last else None, sites_fingerprint(list(last.sites) if last else []),
                      None)
    tree = workspace.tree(need_test=True)

    def score_champion(uri: str) -> float:
        import mlflow.pytorch

        champion = mlflow.pytorch.load_model(uri, map_location="cpu")
        images, labels = workspace.arrays(tree, list(tree.test))
        return evaluate(champion, images, labels, workspace.model.num_classes, device=device).accuracy

    return Judged(scored.accuracy(last_round) or 0.0, test_fingerprint(tree), score_champion)


def _below_site_quorum(scored: Scored, last_round: int) -> str | None:
    """Why the model may not be promoted on federated scores alone, or None when it may (or is scored centrally).

    Without a central test set the champion rule compares the sites' combined accuracy: one or two
    sites that answered (or a lying one) must not decide which model serves everybody, so the
    last round needs scores from ``min_sites`` sites (spec.evaluation.minSites).
    """
    if scored.central:
        return None
    last = scored.federated.get(last_round)
    have = len(last.sites) if last else 0
    if have >= scored.min_sites:
        return None
    if have == 0:
        return f"not promoted: no site scored the model of round {last_round}, and there is no central test set"
    return (f"not promoted: {have} site{'s' if have != 1 else ''} scored the model of round {last_round} "
            f"({', '.join(sorted(last.sites)) if last else ''}), the champion needs scores from at least "
            f"{scored.min_sites} (spec.evaluation.minSites)")


def _log_model(workspace: Workspace, last_round: int, identity: TrainingIdentity, tracking: TrackingConfig,
               tracker: Tracker, report: TrackingReport, scored: Scored, device: torch.device,
               clock: Stopwatch) -> None:
    weights, _ = read_weights(workspace.store, workspace.layout.global_weights(last_round))
    model = build_model(workspace.model)
    load_numpy_state(model, weights)
    model.eval()
    size = workspace.model.image_size
    example = np.zeros((2, 3, size, size), dtype=np.float32)  # batch 2: batch 1 would be exported as fixed
    judged = _judged(workspace, last_round, scored, device)
    tags = {"training": identity.key, "strategy": identity.strategy, "rounds": str(last_round),
            "partition": str(identity.spec.get("partition", {}).get("scheme")),
            "test_fingerprint": judged.fingerprint, "accuracy": f"{judged.accuracy or 0.0:.6f}",
            "evaluation": "central" if scored.central else "federated",
            "architecture": workspace.model.architecture, "image_size": str(size),
            "num_classes": str(workspace.model.num_classes)}
    report.model_uri, report.model_version = tracker.model(report.run_id, model, example,
                                                           tracking.registered_model_name, tags, PIP_REQUIREMENTS)
    clock.lap("tracking_model")
    if not (tracking.registered_model_name and report.model_version and tracking.promote):
        return
    held_back = _below_site_quorum(scored, last_round)
    if held_back is not None or judged.accuracy is None:
        report.champion_reason = held_back or f"not promoted: nothing scored the model of round {last_round}"
        return
    report.champion, report.champion_reason = tracker.decide_champion(
        tracking.registered_model_name, report.model_version, judged.accuracy, judged.fingerprint,
        judged.score_champion)


def _short(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
