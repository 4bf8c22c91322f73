"""The local sites sample (a coordinator and three sites as four processes) beside the same federation in one.

Usage: python bench/sites_local.py [--rounds 3] [--per-class 30] [--test-per-class 10] [--poll 2] [--hostile]

Sites: samples/sites/*.yaml, with their store moved into a scratch folder: `fedtrain run` of the
coordinator (no data) and three `fedtrain site run` processes, each training on a synthetic set
generated at the site (its own seed) and evaluating every global model on its own test split.
Baseline, measured in the same run: `fedtrain run` of the same federation with three ordinary
clients (3 × per-class training images, iid, central test split of 3 × test-per-class images), so
the same model, rounds, epochs and amounts of data, with no store protocol and no polling between
the processes. Printed: wall time from start to the coordinator's exit (sites include generating
their data, timed apart), the median round, the final accuracy (federated for the sites, central
for the baseline), and the ratios.

``--hostile`` runs the sites twice more, in the same run: all three honest, then with berlin
replaced by a hostile site that writes only its own keys and answers every task at once with a lie
the coordinator must refuse (an update claiming 10^9 examples, an evaluation of 7.0 over 10^18
examples, by turns a NaN accuracy and an answer far over its size limit). Printed: the median
round of each and their ratio, and the federated accuracy (the honest sites' alone when berlin lies).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parents[1]
SITES = ("munich", "hamburg", "berlin")


def sample(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "samples" / "sites" / f"{name}.yaml").read_text()))


def start(arguments: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fedtrain.cli", *arguments], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def round_seconds(status: dict[str, Any]) -> float:
    return statistics.median(r["finishedAt"] - r["startedAt"] for r in status["rounds"])


def lie(task: Any, site: str) -> bytes:
    """An answer to ``task`` the coordinator must refuse, by the task's kind and round."""
    from fedtrain.contract.sitetask import PROTOCOL_VERSION, RESULT_LIMIT

    if task.kind == "train":
        output: object = {"num_examples": 10**9, "metrics": {}, "sha256": "0" * 64}
    elif task.round % 2:
        output = {"examples": 10**18, "accuracy": 7.0, "loss": 0.0}
    else:
        output = {"examples": 40, "accuracy": float("nan"), "loss": 0.1}
    body = json.dumps({"task": task.id, "site": site, "state": "succeeded", "exit_code": 0, "reason": None,
                       "output": output, "version": PROTOCOL_VERSION}).encode()
    return body + b" " * (4 * RESULT_LIMIT) if task.round == 3 else body


def play_hostile(store_path: Path, site: str, stop: threading.Event) -> None:
    """Answer each task posted to ``site`` once, at once, with a lie, writing only under sites/<site>/."""
    from fedtrain.contract.layout import Layout
    from fedtrain.contract.sitetask import parse_posting
    from fedtrain.contract.storage import DirectoryStore

    store, layout, answered = DirectoryStore(store_path), Layout(sites=frozenset({site})), set()
    while not stop.wait(0.1):
        try:
            task = parse_posting(store.read_bytes(layout.site_task(site))).task
        except Exception:  # not posted yet, or being replaced
            continue
        if task is not None and task.id not in answered:
            store.write_bytes(layout.site_result(site, task.id), lie(task, site))
            answered.add(task.id)


def run_sites(scratch: Path, args: argparse.Namespace, hostile: str | None = None) -> dict[str, float]:
    """The coordinator and the three sites as processes; ``hostile``: that site is a lying thread instead."""
    scratch = scratch / ("hostile" if hostile else "honest")
    scratch.mkdir(parents=True, exist_ok=True)
    store = scratch / "sites-store"
    coordinator = sample("coordinator")
    coordinator["spec"].update(rounds=args.rounds, storage={"local": str(store)})
    (scratch / "coordinator.yaml").write_text(yaml.safe_dump(coordinator))
    generated = time.monotonic()
    for site in SITES:  # each site's data first, so that the federation's wall time is the federation's
        participation = sample(site)
        participation["spec"].update(store={"local": str(store)}, pollSeconds=args.poll)
        participation["spec"]["data"]["synthetic"].update(imagesPerClass=args.per_class,
                                                          testImagesPerClass=args.test_per_class)
        (scratch / f"{site}.yaml").write_text(yaml.safe_dump(participation))
        from fedtrain.sites.local import site_data
        from fedtrain.sites.participation import load_participation

        site_data(load_participation(scratch / f"{site}.yaml"), scratch / site)
    generated = time.monotonic() - generated
    began = time.monotonic()
    processes = [start(["run", str(scratch / "coordinator.yaml")], scratch / "coordinator.log")]
    threads = str(max(1, (os.cpu_count() or 1) // len(SITES)))  # the cores shared out, as the baseline does
    processes += [start(["site", "run", str(scratch / f"{site}.yaml"), "--workdir", str(scratch / site),
                         "--threads", threads], scratch / f"{site}.log") for site in SITES if site != hostile]
    stop = threading.Event()
    liar = threading.Thread(target=play_hostile, args=(store, hostile, stop), daemon=True) if hostile else None
    if liar is not None:
        liar.start()
    for process in processes:
        process.wait()
    wall = time.monotonic() - began
    stop.set()
    status = json.loads((store / "status.json").read_text())
    assert status["phase"] == "Succeeded", status.get("message")
    return {"wall": wall, "round": round_seconds(status), "accuracy": status["federatedAccuracy"],
            "data_generation": generated}


def run_single(scratch: Path, args: argparse.Namespace) -> dict[str, float]:
    from fedtrain.local.runner import RunOptions, run_training
    from fedtrain.spec import load_manifest
    from fedtrain.worker.data.synth import SynthConfig, generate

    data = scratch / "single-data"  # generated before the clock starts, as the sites' are
    generate(data, SynthConfig(per_class=args.per_class * len(SITES), test_per_class=args.test_per_class * len(SITES),
                               frames_per_track=3, seed=11))
    manifest = sample("coordinator")
    spec = manifest["spec"]
    spec.update(rounds=args.rounds, storage={"local": str(scratch / "single")}, dataset={"path": str(data)},
                clients={"count": len(SITES), "minSuccessful": spec["clients"]["minSuccessful"]},
                evaluation={"central": True}, worker={"parallelism": len(SITES), "device": "cpu"})
    manifest["metadata"]["name"] = "single"
    (scratch / "single.yaml").write_text(yaml.safe_dump(manifest))
    began = time.monotonic()
    result = run_training(load_manifest(scratch / "single.yaml"), RunOptions(scratch / "single"))
    wall = time.monotonic() - began
    assert result.status.phase == "Succeeded", result.status.message
    status = result.status.to_json()
    return {"wall": wall, "round": round_seconds(status), "accuracy": float(status["accuracy"])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=30, help="training images per class at each site")
    parser.add_argument("--test-per-class", type=int, default=10, help="test images per class at each site")
    parser.add_argument("--poll", type=int, default=2, help="the sites' pollSeconds")
    parser.add_argument("--hostile", action="store_true", help="only: all honest against berlin lying")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="fedtrain-sites-bench-"))
    if args.hostile:
        honest, lying = run_sites(scratch, args), run_sites(scratch, args, hostile="berlin")
        print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        for name, found in (("3 honest sites", honest), ("berlin lying   ", lying)):
            print(f"{name}: wall {found['wall']:6.1f} s, median round {found['round']:5.1f} s, "
                  f"federated accuracy {found['accuracy']:.4f}")
        print(f"ratio lying / honest: median round {lying['round'] / honest['round']:.2f}")
        return
    single = run_single(scratch, args)
    sites = run_sites(scratch, args)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"single process : wall {single['wall']:6.1f} s, median round {single['round']:5.1f} s, "
          f"central accuracy {single['accuracy']:.4f}")
    print(f"coordinator + 3 sites: wall {sites['wall']:6.1f} s, median round {sites['round']:5.1f} s, "
          f"federated accuracy {sites['accuracy']:.4f} (sites generated their data in "
          f"{sites['data_generation']:.1f} s beforehand)")
    print(f"ratio sites / single: wall {sites['wall'] / single['wall']:.2f}, round "
          f"{sites['round'] / single['round']:.2f}")


if __name__ == "__main__":
    main()
