"""The local sites sample (a coordinator and three sites as four processes) beside the same federation in one.

Usage: python bench/sites_local.py [--rounds 3] [--per-class 30] [--test-per-class 10] [--poll 2]

Sites: samples/sites/*.yaml, with their store moved into a scratch folder: `fedtrain run` of the
coordinator (no data) and three `fedtrain site run` processes, each training on a synthetic set
generated at the site (its own seed) and evaluating every global model on its own test split.
Baseline, measured in the same run: `fedtrain run` of the same federation with three ordinary
clients (3 × per-class training images, iid, central test split of 3 × test-per-class images), so
the same model, rounds, epochs and amounts of data, with no store protocol and no polling between
the processes. Printed: wall time from start to the coordinator's exit (sites include generating
their data, timed apart), the median round, the final accuracy (federated for the sites, central
for the baseline), and the ratios.
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


def run_sites(scratch: Path, args: argparse.Namespace) -> dict[str, float]:
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
                         "--threads", threads], scratch / f"{site}.log") for site in SITES]
    for process in processes:
        process.wait()
    wall = time.monotonic() - began
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
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="fedtrain-sites-bench-"))
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
