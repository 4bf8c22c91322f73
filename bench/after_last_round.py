"""Where the time after the last round goes in `fedtrain run` on the flagship federation, before against now.

Usage: python bench/after_last_round.py [--rounds 5] [--per-class 8] [--epochs 1] [--repeat 3] [--before DIR]

Runs `fedtrain run` (its runner, as the CLI calls it, in a fresh work directory each time, so that
MLflow's sqlite store is created as in any first run) on the flagship spec,
samples/gtsrb-mobilenet-local.yaml: MobileNetV3-small at 64 px, 4 clients, here ``--rounds`` rounds
of ``--epochs`` local epochs on ``--per-class`` training images per class (what happens after the
last round does not depend on how long the clients trained; the test split is the sample's, 10
images per class; ``--per-class 40 --epochs 2`` is the sample's training). The data set is
generated once beforehand. Each run also reports its rounds' wall time (first training task
launched to the last aggregation's end) and every round's test accuracy and loss.

The time after the last round runs from the moment the last round's last training task ended to
the moment `fedtrain run` returned, in parts: the last aggregation (strategy, test evaluation,
writes; task launch to its exit as the runner saw it), the gap until the finalize task was
launched, the finalize task (launch to exit), and the rest (the runner's last pass and stopping the
fork server). Finalize's own steps come from its summary's ``timings``, where the code has them.

``--before DIR`` (and ``--now DIR``, else the code beside this file): a copy of the code to compare
with, as one package: ``git archive <commit> fedtrain worker operator | tar -x -C X``, then move
``X/fedtrain`` to ``DIR/fedtrain``, ``X/worker`` to ``DIR/fedtrain/worker`` and ``X/operator`` to
``DIR/fedtrain/operator`` (a top-level ``operator`` folder on the path would hide the standard
library's). Each repetition runs both, one after the other in separate processes, alternating which
goes first; the figures are medians over repetitions, with their spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "gtsrb-mobilenet-local.yaml"
FINALIZE_STEPS = ("results", "tracking_store", "tracking_run", "tracking_metrics", "tracking_client_runs",
                  "tracking_model", "tracking_champion", "plots_wait", "tracking_plots", "tracking_finish")
PARTS = ("after_last_round", "last_aggregation", "aggregation_evaluation", "gap_to_finalize", "finalize_task",
         "runner_stop")


def manifest(rounds: int, per_class: int, epochs: int, data: Path) -> dict[str, Any]:
    """The flagship sample with ``rounds`` rounds of ``epochs`` local epochs on ``per_class`` images per class."""
    body = yaml.safe_load(SAMPLE.read_text())
    spec = body["spec"]
    spec["rounds"] = rounds
    spec["training"]["localEpochs"] = epochs
    synthetic = spec["dataset"].pop("synthetic")
    spec["dataset"]["path"] = str(data)
    body["metadata"]["name"] = "bench-after-last-round"
    return {"manifest": body, "synthetic": {**synthetic, "imagesPerClass": per_class}}


def generate_data(synthetic: dict[str, Any], folder: Path) -> None:
    from fedtrain.worker.data.synth import SynthConfig, generate

    generate(folder, SynthConfig(synthetic["imagesPerClass"], synthetic["testImagesPerClass"],
                                 synthetic["framesPerTrack"], synthetic["seed"]))


def one_run(spec_file: Path, workdir: Path) -> dict[str, Any]:
    """One `fedtrain run`, timed by the runner's own view of its tasks (launch, and exit as polled)."""
    from fedtrain.local import runner
    from fedtrain.spec import parse_manifest

    launched: dict[str, float] = {}
    ended: dict[str, float] = {}

    class TimedExecutor(runner.LocalExecutor):  # type: ignore[misc]
        def launch(self, task_id: str, arguments: Any) -> None:
            launched.setdefault(task_id, time.time())
            super().launch(task_id, arguments)

        def poll(self) -> Any:
            observations = super().poll()
            now = time.time()
            for task_id, observation in observations.items():
                if observation.state != "running":
                    ended.setdefault(task_id, now)
            return observations

    runner.LocalExecutor = TimedExecutor
    manifest_ = parse_manifest(yaml.safe_load(spec_file.read_text()), str(spec_file))
    started = time.time()
    result = runner.run_training(manifest_, runner.RunOptions(workdir=workdir))
    returned = time.time()
    if result.status.phase != "Succeeded":
        raise SystemExit(f"the run ended {result.status.phase}: {result.status.message}")
    rounds = manifest_.spec.rounds
    last = f"r{rounds:04d}-"
    trained = max(t for task, t in ended.items() if task.startswith(last) and "-aggregate-" not in task)
    aggregation = next(task for task in launched if task.startswith(f"{last}aggregate"))
    finalize = next(task for task in launched if task.startswith("finalize"))
    result_json = json.loads((workdir / f"round-{rounds:04d}" / "result.json").read_text())
    summary = json.loads((workdir / "final" / "summary.json").read_text())
    scores = [json.loads((workdir / f"round-{n:04d}" / "result.json").read_text()) for n in range(1, rounds + 1)]
    first = min(t for task, t in launched.items() if task.startswith("r0001-"))
    return {
        "whole": returned - started, "accuracy": result_json.get("accuracy"),
        "accuracies": [s.get("accuracy") for s in scores], "losses": [s.get("loss") for s in scores],
        "rounds": ended[aggregation] - first,
        "after_last_round": returned - trained,
        "last_aggregation": ended[aggregation] - launched[aggregation],
        "aggregation_evaluation": result_json.get("evaluation_seconds", 0.0),
        "gap_to_finalize": launched[finalize] - ended[aggregation],
        "finalize_task": ended[finalize] - launched[finalize],
        "runner_stop": returned - ended[finalize],
        "finalize_steps": summary.get("timings", {}),
    }


def run_child(spec_file: Path, workdir: Path, code: Path | None) -> dict[str, Any]:
    """`one_run` in a fresh process, with ``code`` first on the path when given."""
    environment = dict(os.environ)
    if code is not None:
        environment["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [environment.get("PYTHONPATH")])])
    # Run from the scratch folder: ``python -m`` (the fork server) puts its working directory first on the path.
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", str(spec_file), "--workdir",
                           str(workdir)], capture_output=True, text=True, env=environment, check=False,
                          cwd=spec_file.parent)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_row(runs: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in runs]
    return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f})"


def steps_row(runs: list[dict[str, Any]]) -> str:
    found = {name for r in runs for name in r["finalize_steps"]}
    names = [n for n in FINALIZE_STEPS if n in found] + sorted(found - set(FINALIZE_STEPS))
    return ", ".join(f"{name} {statistics.median([r['finalize_steps'].get(name, 0.0) for r in runs]):.2f}"
                     for name in names) or "(not recorded)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--vary-seed", action="store_true",
                        help="repetition r runs with spec.seed r (initial weights, client seeds): accuracy's spread")
    parser.add_argument("--before", type=Path, default=None, help="a copy of the code to compare with")
    parser.add_argument("--now", type=Path, default=None, help="a copy of the code to run as now (default: this one)")
    parser.add_argument("--one", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_run(args.one, args.workdir)))
        return
    with tempfile.TemporaryDirectory(prefix="fedtrain-after-") as scratch:
        folder = Path(scratch)
        setup = manifest(args.rounds, args.per_class, args.epochs, folder / "data")
        generate_data(setup["synthetic"], folder / "data")
        specs = []
        for repeat in range(args.repeat):
            body = setup["manifest"]
            body["spec"]["seed"] = repeat if args.vary_seed else 0
            specs.append(folder / f"spec-{repeat}.yaml")
            specs[-1].write_text(yaml.safe_dump(body))
        now = args.now.resolve() if args.now is not None else None
        codes: dict[str, Path | None] = {"now": now}
        if args.before is not None:
            codes = {"before": args.before.resolve(), "now": now}
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in codes}
        load_before = os.getloadavg()
        for repeat in range(args.repeat):
            order = list(codes) if repeat % 2 == 0 else list(reversed(codes))
            for label in order:
                workdir = folder / f"{label}-{repeat}"
                runs[label].append(run_child(specs[repeat], workdir, codes[label]))
                print(f"repetition {repeat + 1} {label}: {json.dumps(runs[label][-1])}", flush=True)
    print(f"\n{args.rounds} rounds of {args.epochs} epochs on {args.per_class} images per class, 4 clients, "
          f"mobilenet_v3_small 64 px; median of {args.repeat} (spread); "
          f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"| part | {' | '.join(runs)} |")
    print(f"|---|{'---|' * len(runs)}")
    for key in ("whole", "rounds", *PARTS):
        print(f"| {key.replace('_', ' ')} | {' | '.join(median_row(r, key) for r in runs.values())} |")
    print(f"| finalize's steps (medians, s) | {' | '.join(steps_row(r) for r in runs.values())} |")
    for label, done in runs.items():
        for run in done:
            print(f"{label}: test accuracy by round {[round(a, 4) for a in run['accuracies']]}, "
                  f"loss {[round(x, 4) for x in run['losses']]}")
    if "before" in runs:
        finals = {label: [r["accuracy"] for r in done] for label, done in runs.items()}
        differences = [round(n - b, 4) for n, b in zip(finals["now"], finals["before"], strict=True)]
        means = ", ".join(f"{label} {statistics.mean(values):.4f}" for label, values in finals.items())
        print(f"last round's accuracy, mean of {args.repeat}: {means}; paired differences now - before: {differences}")
        ratios = [n["after_last_round"] / b["after_last_round"] for n, b in zip(runs["now"], runs["before"],
                                                                                  strict=True)]
        print(f"ratio now / before, after the last round: {statistics.median(ratios):.3f} "
              f"({min(ratios):.2f}–{max(ratios):.2f})")


if __name__ == "__main__":
    main()
