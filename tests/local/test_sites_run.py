"""A coordinator and three sites as four processes that share nothing but a store directory.

What the README's site sample does, at a size the default suite affords: `fedtrain run` posts the
sites' tasks, three `fedtrain site run` processes each train on data generated at the site and
evaluate every global model, and the coordinator, which holds no data at all, ends with federated
figures only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtrain.cli import main

SITES = {"munich": 11, "hamburg": 12, "berlin": 13}  # site -> seed of the data generated there


def coordinator(store: Path) -> dict[str, Any]:
    return {"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedTraining",
            "metadata": {"name": "cities", "namespace": "team-signs"},
            "spec": {"rounds": 2, "seed": 3,
                     "model": {"architecture": "tiny_cnn", "numClasses": 43, "imageSize": 16},
                     "clients": {"list": [{"name": name, "site": {}} for name in SITES]},
                     "training": {"localEpochs": 1, "batchSize": 32, "learningRate": 0.005},
                     "evaluation": {"central": False}, "roundDeadlineSeconds": 240,
                     "storage": {"local": str(store)}, "worker": {"parallelism": 1, "device": "cpu"},
                     "mlflow": {"logClients": False}}}


def participation(site: str, seed: int, store: Path) -> dict[str, Any]:
    return {"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedParticipation",
            "metadata": {"name": "cities", "namespace": site},
            "spec": {"site": site, "training": {"id": "", "name": "team-signs/cities"},
                     "store": {"local": str(store)},
                     "data": {"synthetic": {"imagesPerClass": 4, "testImagesPerClass": 2, "framesPerTrack": 2,
                                            "seed": seed}},
                     "worker": {"device": "cpu"}, "pollSeconds": 1}}


def start(arguments: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fedtrain.cli", *arguments], stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd, env=environment)


def wait_all(processes: dict[str, subprocess.Popen[bytes]], logs: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes.values()):
        if time.monotonic() > deadline:
            for process in processes.values():
                process.kill()
            tails = {n: (logs / f"{n}.log").read_text()[-1500:] for n in processes}
            raise AssertionError(f"the federation did not finish in {timeout} s: {tails}")
        time.sleep(0.5)
    failed = {n: (logs / f"{n}.log").read_text()[-3000:] for n, p in processes.items() if p.returncode != 0}
    assert not failed, failed


def test_a_coordinator_and_three_sites_share_only_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    store, logs = tmp_path / "store", tmp_path / "logs"
    logs.mkdir()
    files = {"coordinator": tmp_path / "coordinator.yaml"}
    files["coordinator"].write_text(yaml.safe_dump(coordinator(store)))
    for site, seed in SITES.items():
        files[site] = tmp_path / f"{site}.yaml"
        files[site].write_text(yaml.safe_dump(participation(site, seed, store)))
    processes = {"coordinator": start(["run", str(files["coordinator"])], logs / "coordinator.log", tmp_path)}
    for site in SITES:
        processes[site] = start(["site", "run", str(files[site]), "--workdir", str(tmp_path / site), "--threads", "1"],
                                logs / f"{site}.log", tmp_path)
    wait_all(processes, logs, timeout=420)

    status = json.loads((store / "status.json").read_text())
    assert status["phase"] == "Succeeded", status["message"]
    for record in status["rounds"]:
        assert sorted(record["siteScores"]) == sorted(SITES), record
        assert record["federated"]["sites"] == 3
        assert 0.0 <= record["federated"]["accuracy"] <= 1.0
    assert status["accuracy"] == status["federatedAccuracy"]  # no central test set: the headline is federated
    assert not (store / "data").exists()  # the coordinator read no data at all
    text = json.dumps(status)
    for site in SITES:
        assert str(tmp_path / site) not in text  # nothing about where a site keeps its data
        site_status = json.loads((tmp_path / site / "site-status.json").read_text())
        assert site_status["phase"] == "Completed" and site_status["roundsDone"] == 2, site_status
        assert (store / "sites" / site / "round-0002" / "update-a1.safetensors").is_file()
    assert (store / "final" / "model.safetensors").is_file()
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: rich cuts columns to fit 80
    assert main(["status", str(store)]) == 0
    shown = capsys.readouterr().out
    assert "federated" in shown and "3 sites" in shown and "worst site" in shown
