"""The local sites sample (a coordinator and N sites as processes) beside the same federation in one process.

Usage: python bench/sites_local.py [--sites 3] [--rounds 3] [--per-class 30] [--test-per-class 10] [--poll S]
       [--repeats 1] [--hostile]

Sites: samples/sites/*.yaml, with their store moved into a scratch folder: `fedtrain run` of the
coordinator (no data) and N `fedtrain site run` processes (``--sites``, 3 by default: munich, hamburg
and berlin; more are copies of munich's participation under other names with data seeds of their
own, added to the coordinator's clients.list), each training on a synthetic set generated at the
site and evaluating every global model on its own test split. The sites poll at the participation's
default pace (``spec.pollSeconds`` omitted) unless ``--poll`` gives one.
Baseline, measured in the same run: `fedtrain run` (a process, as the coordinator is) of the same
federation with N ordinary clients
(N × per-class training images, iid, central test split of N × test-per-class images), so the same
model, rounds, epochs and amounts of data, with no store protocol and no polling between the
processes. Printed: wall time from start to the coordinator's exit (sites include generating their
data, timed apart), the CPU seconds of all the processes of each side (to the sites' exit), the
median round and its time beyond the slowest client's training loop, the final accuracy (federated
for the sites, central for the baseline), and the ratios; with ``--repeats R``, R such pairs in
alternating order (single first, then sites first, ...) and the median ratios.

``--hostile`` runs the sites twice more, in the same run: all three honest, then with berlin
replaced by a hostile site that writes only its own keys and answers every task at once with a lie
the coordinator must refuse (an update claiming 10^9 examples, an evaluation of 7.0 over 10^18
examples, by turns a NaN accuracy and an answer far over its size limit). Printed: the median round
of each and their ratio, and the federated accuracy (the honest sites' alone when berlin lies).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parents[1]
SITES = ("munich", "hamburg", "berlin")
EXTRA_SEED = 14  # the data seed of the fourth site; the sample's three use 11, 12 and 13


def site_names(count: int) -> list[str]:
    """The sample's three sites, then ``site04``, ``site05``, ... (copies of munich's participation)."""
    return list(SITES[:count]) + [f"site{n:02d}" for n in range(len(SITES) + 1, count + 1)]


def participation(site: str, index: int) -> dict[str, Any]:
    """The sample's participation of ``site``, or munich's renamed, with a data seed of its own."""
    if site in SITES:
        return sample(site)
    manifest = sample("munich")
    manifest["metadata"]["name"] = site
    manifest["spec"]["site"] = site
    manifest["spec"]["data"]["synthetic"]["seed"] = EXTRA_SEED + index - len(SITES)
    return manifest


def sample(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "samples" / "sites" / f"{name}.yaml").read_text()))


def start(arguments: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fedtrain.cli", *arguments], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def children_cpu() -> float:
    """User and system seconds of every child process this one has waited for (theirs included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def round_seconds(status: dict[str, Any]) -> float:
    return statistics.median(r["finishedAt"] - r["startedAt"] for r in status["rounds"])


def overhead_seconds(status: dict[str, Any], sidecars: Callable[[int], list[Path]]) -> float:
    """The median round less its slowest client's training loop (``timings.train`` of its update's sidecar).

    What is left is what the round adds to training: the wait to start, the data's decoding, a
    site's evaluation of the model it trains from, uploads, the coordinator's look at the answers,
    the aggregation and (one process) its central evaluation. Training is what a busy machine
    stretches most, so this part of a round is the one to compare.
    """
    left = []
    for found in status["rounds"]:
        slowest = max(json.loads(path.read_text())["timings"]["train"] for path in sidecars(found["round"]))
        left.append(found["finishedAt"] - found["startedAt"] - slowest)
    return statistics.median(left)


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


def run_sites(scratch: Path, args: argparse.Namespace, hostile: str | None = None) -> dict[str, Any]:
    """The coordinator and the three sites as processes; ``hostile``: that site is a lying thread instead."""
    scratch = scratch / ("hostile" if hostile else "honest")
    scratch.mkdir(parents=True, exist_ok=True)
    store = scratch / "sites-store"
    sites = site_names(args.sites)
    coordinator = sample("coordinator")
    coordinator["spec"].update(rounds=args.rounds, storage={"local": str(store)})
    coordinator["spec"]["clients"]["list"] = [{"name": site, "site": {}} for site in sites]
    (scratch / "coordinator.yaml").write_text(yaml.safe_dump(coordinator))
    generated = time.monotonic()
    for index, site in enumerate(sites):  # each site's data first: the federation's wall time is the federation's
        manifest = participation(site, index)
        manifest["spec"]["store"] = {"local": str(store)}
        if args.poll is not None:
            manifest["spec"]["pollSeconds"] = args.poll
        manifest["spec"]["data"]["synthetic"].update(imagesPerClass=args.per_class,
                                                     testImagesPerClass=args.test_per_class)
        (scratch / f"{site}.yaml").write_text(yaml.safe_dump(manifest))
        from fedtrain.sites.local import site_data
        from fedtrain.sites.participation import load_participation

        site_data(load_participation(scratch / f"{site}.yaml"), scratch / site)
    generated = time.monotonic() - generated
    began, cpu = time.monotonic(), children_cpu()
    processes = [start(["run", str(scratch / "coordinator.yaml")], scratch / "coordinator.log")]
    threads = str(max(1, (os.cpu_count() or 1) // len(sites)))  # the cores shared out, as the baseline does
    processes += [start(["site", "run", str(scratch / f"{site}.yaml"), "--workdir", str(scratch / site),
                         "--threads", threads], scratch / f"{site}.log") for site in sites if site != hostile]
    stop = threading.Event()
    liar = threading.Thread(target=play_hostile, args=(store, hostile, stop), daemon=True) if hostile else None
    if liar is not None:
        liar.start()
    processes[0].wait()
    wall = time.monotonic() - began  # to the coordinator's exit; the sites end once they read that it is over
    for process in processes[1:]:
        process.wait()
    cpu = children_cpu() - cpu
    stop.set()
    status = json.loads((store / "status.json").read_text())
    assert status["phase"] == "Succeeded", status.get("message")

    def sidecars(number: int) -> list[Path]:
        return [store / "sites" / site / f"round-{number:04d}" / "update-a1.json" for site in sites if site != hostile]

    return {"wall": wall, "round": round_seconds(status), "accuracy": status["federatedAccuracy"], "cpu": cpu,
            "data_generation": generated, "scratch": str(scratch), "overhead": overhead_seconds(status, sidecars)}


def run_single(scratch: Path, args: argparse.Namespace) -> dict[str, float]:
    """``fedtrain run`` of the federation with ordinary clients, as a process of its own as the coordinator is."""
    from fedtrain.worker.data.synth import SynthConfig, generate

    data = scratch / "single-data"  # generated before the clock starts, as the sites' are
    generate(data, SynthConfig(per_class=args.per_class * args.sites, test_per_class=args.test_per_class * args.sites,
                               frames_per_track=3, seed=11))
    manifest = sample("coordinator")
    spec = manifest["spec"]
    spec.update(rounds=args.rounds, storage={"local": str(scratch / "single")}, dataset={"path": str(data)},
                clients={"count": args.sites, "minSuccessful": spec["clients"]["minSuccessful"]},
                evaluation={"central": True}, worker={"parallelism": args.sites, "device": "cpu"})
    manifest["metadata"]["name"] = "single"
    (scratch / "single.yaml").write_text(yaml.safe_dump(manifest))
    began, cpu = time.monotonic(), children_cpu()
    start(["run", str(scratch / "single.yaml"), "--workdir", str(scratch / "single")], scratch / "single.log").wait()
    wall, cpu = time.monotonic() - began, children_cpu() - cpu
    status = json.loads((scratch / "single" / "status.json").read_text())
    assert status["phase"] == "Succeeded", status.get("message")

    def sidecars(number: int) -> list[Path]:
        return sorted((scratch / "single" / f"round-{number:04d}" / "clients").glob("*.json"))

    return {"wall": wall, "round": round_seconds(status), "accuracy": float(status["accuracy"]), "cpu": cpu,
            "overhead": overhead_seconds(status, sidecars)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, default=3, help="how many sites (the baseline: as many clients)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=30, help="training images per class at each site")
    parser.add_argument("--test-per-class", type=int, default=10, help="test images per class at each site")
    parser.add_argument("--poll", type=int, default=None,
                        help="the sites' pollSeconds (default: the participation's own default)")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs, in alternating order")
    parser.add_argument("--hostile", action="store_true", help="only: all honest against berlin lying")
    args = parser.parse_args()
    if args.sites < 1 or (args.hostile and args.sites < len(SITES)):
        parser.error("--sites: at least 1 (3 with --hostile, whose liar is berlin)")
    scratch = Path(tempfile.mkdtemp(prefix="fedtrain-sites-bench-"))
    if args.hostile:
        honest, lying = run_sites(scratch, args), run_sites(scratch, args, hostile="berlin")
        print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        for name, found in ((f"{args.sites} honest sites", honest), ("berlin lying   ", lying)):
            print(f"{name}: wall {found['wall']:6.1f} s, median round {found['round']:5.1f} s, "
                  f"federated accuracy {found['accuracy']:.4f}")
        print(f"ratio lying / honest: median round {lying['round'] / honest['round']:.2f}")
        return
    ratios: list[tuple[float, float]] = []
    for repeat in range(args.repeats):  # pairs in alternating order, each in a folder of its own
        folder = scratch / f"pair-{repeat + 1}"
        load = os.getloadavg()[0]
        if repeat % 2:
            sites = run_sites(folder, args)
            single = run_single(folder, args)
        else:
            single = run_single(folder, args)
            sites = run_sites(folder, args)
        print(f"pair {repeat + 1} ({'sites' if repeat % 2 else 'single'} first), load average "
              f"{load:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores")
        print(f"  single process : wall {single['wall']:6.1f} s, CPU {single['cpu']:5.1f} s, median round "
              f"{single['round']:5.1f} s (beyond training {single['overhead']:4.1f} s), central accuracy "
              f"{single['accuracy']:.4f}")
        print(f"  coordinator + {args.sites} sites: wall {sites['wall']:6.1f} s, CPU {sites['cpu']:5.1f} s, "
              f"median round {sites['round']:5.1f} s "
              f"(beyond training {sites['overhead']:4.1f} s), federated accuracy {sites['accuracy']:.4f} (sites "
              f"generated their data in {sites['data_generation']:.1f} s beforehand; logs and status in "
              f"{sites['scratch']})")
        ratios.append((sites["wall"] / single["wall"], sites["round"] / single["round"]))
        print(f"  ratio sites / single: wall {ratios[-1][0]:.2f}, round {ratios[-1][1]:.2f}, CPU "
              f"{sites['cpu'] / single['cpu']:.2f}; a round's time beyond "
              f"training: {sites['overhead'] - single['overhead']:+.1f} s", flush=True)
    if len(ratios) > 1:
        print(f"median ratio sites / single over {len(ratios)} pairs: wall "
              f"{statistics.median(r[0] for r in ratios):.2f}, round {statistics.median(r[1] for r in ratios):.2f}")

if __name__ == "__main__":
    main()
