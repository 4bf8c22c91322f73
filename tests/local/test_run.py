"""``fedtrain run`` end to end: real worker processes, a real MLflow server, a killed runner resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtrain.cli import main

pytestmark = pytest.mark.timeout(900)


def manifest(name: str, rounds: int, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "rounds": rounds, "model": {"architecture": "tiny_cnn", "imageSize": 16},
        "dataset": {"synthetic": {"imagesPerClass": 4, "testImagesPerClass": 2, "framesPerTrack": 2}},
        "clients": {"count": 2}, "training": {"localEpochs": 2, "learningRate": 0.01},
        "worker": {"parallelism": 2, "device": "cpu"},
        "mlflow": {"experiment": "tests", "registeredModelName": "signs-test"},
    }
    body.update(spec)
    return {"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedTraining", "metadata": {"name": name},
            "spec": body}


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def fedtrain(*args: object, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedtrain.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kwargs)


def test_local_run_tracks_and_registers_in_mlflow(tmp_path: Path, mlflow_server: str) -> None:
    from mlflow.tracking import MlflowClient

    spec_file = write(tmp_path / "ft.yaml", manifest("tracked", 2))
    done = fedtrain("run", spec_file, "--workdir", tmp_path / "w", "--tracking-uri", mlflow_server)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "synthetic GTSRB" in done.stderr and "Succeeded" in done.stdout
    status = json.loads((tmp_path / "w" / "status.json").read_text())
    assert status["phase"] == "Succeeded" and status["modelVersion"] == "1"
    assert [r["round"] for r in status["rounds"]] == [1, 2]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"
    for plot in ("accuracy.png", "loss.png", "confusion.png"):
        assert (tmp_path / "w" / "final" / "plots" / plot).stat().st_size > 1000

    client = MlflowClient(mlflow_server, mlflow_server)
    champion = client.get_model_version_by_alias("signs-test", "champion")
    assert champion.version == "1" and champion.tags["rounds"] == "2" and champion.tags["strategy"] == "fedavg"
    history = client.get_metric_history(champion.run_id, "accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    assert history[-1].value == pytest.approx(status["rounds"][1]["accuracy"])
    children = client.search_runs([client.get_run(champion.run_id).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{champion.run_id}'")
    assert sorted(r.data.tags["fedtrain.client"] for r in children) == ["client-00", "client-01"]

    images = sorted((tmp_path / "w" / "data" / "Final_Test" / "Images").glob("*.ppm"))[:2]
    predicted = fedtrain("predict", "--json", "--model", "models:/signs-test@champion", "--tracking-uri",
                         mlflow_server, *images)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [Path(r["image"]).name for r in rows] == [p.name for p in images]
    assert all(0 <= r["class_id"] < 43 and r["sign_name"] for r in rows)


def test_mlflow_down_does_not_stop_training_and_the_summary_says_so(tmp_path: Path) -> None:
    spec_file = write(tmp_path / "ft.yaml", manifest("untracked", 1))
    done = fedtrain("run", spec_file, "--workdir", tmp_path / "w", "--tracking-uri", "http://127.0.0.1:9")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not logged to MLflow: run" in done.stdout
    status = json.loads((tmp_path / "w" / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    degraded = {c["type"]: c for c in status["conditions"]}["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "TrackingUnavailable"
    assert (tmp_path / "w" / "final" / "model.safetensors").exists()


def test_killed_runner_resumes_with_exactly_the_configured_rounds(tmp_path: Path) -> None:
    spec_file = write(tmp_path / "ft.yaml", manifest("resumed", 3, mlflow={"experiment": "tests"}))
    workdir = tmp_path / "w"
    runner = subprocess.Popen([sys.executable, "-m", "fedtrain.cli", "run", str(spec_file), "--workdir",
                               str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status_file = workdir / "status.json"
        if status_file.exists():
            status = json.loads(status_file.read_text())
            if status.get("currentRound", 0) >= 2:
                break
        assert runner.poll() is None, "the runner ended before it could be killed"
        time.sleep(0.05)
    os.killpg(runner.pid, signal.SIGKILL)  # the runner, its fork server, and (by parent-death signal) the tasks
    runner.wait()
    killed_at = json.loads((workdir / "status.json").read_text())
    # A round of this tiny federation can end between two polls, so the runner may already be in round 3.
    assert killed_at["phase"] == "Running" and killed_at["currentRound"] in (2, 3), killed_at

    done = fedtrain("run", spec_file, "--workdir", workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads((workdir / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    assert [r["round"] for r in status["rounds"]] == [1, 2, 3]
    assert sorted(p.name for p in workdir.glob("round-*")) == ["round-0000", "round-0001", "round-0002", "round-0003"]
    assert all((workdir / f"round-{r:04d}" / "result.json").exists() for r in (1, 2, 3))
    assert json.loads((workdir / "final" / "summary.json").read_text())["rounds"] == 3
    shown = fedtrain("status", workdir)
    assert shown.returncode == 0 and "Succeeded" in shown.stdout


@pytest.mark.parametrize(("change", "expected"), [
    ({"spec": {"clients": {"count": 2}, "modell": {}}}, "spec.modell: unknown field"),
    ({"spec": {"clients": {"count": 2}, "rounds": "ten"}}, "spec.rounds: Input should be a valid integer"),
    ({"spec": {"clients": {"count": 3, "perRound": 2, "minSuccessful": 3}}},
     "spec.clients.minSuccessful (3) must be <= clients.perRound (2)"),
    ({"spec": {"clients": {"count": 2}, "dataset": {"path": "/nonexistent/gtsrb"}}},
     "spec.dataset.path: /nonexistent/gtsrb does not exist"),
])
def test_bad_files_give_one_clear_error_and_create_nothing(tmp_path: Path, change: dict[str, Any], expected: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = {**manifest("bad", 1), **change}
    workdir = tmp_path / "never-created"
    code = main(["run", str(write(tmp_path / "bad.yaml", data)), "--workdir", str(workdir)])
    error = capsys.readouterr().err
    assert code == 2
    assert expected in " ".join(error.split())
    assert error.count("  - ") == 1  # exactly one problem reported
    assert not workdir.exists()


def test_local_run_with_an_object_store(tmp_path: Path, s3_server: Any) -> None:
    """Weights in a bucket (moto over HTTP), status and the sqlite tracking store in the local work directory."""
    from fedtrain.contract.storage import open_store

    body = manifest("bucketed", 2, storage={"s3": {"endpoint": s3_server.endpoint, "bucket": s3_server.bucket,
                                                   "prefix": "local-runs", "region": "us-east-1"}})
    spec_file = write(tmp_path / "ft.yaml", body)
    credentials = {"AWS_ACCESS_KEY_ID": s3_server.access_key_id, "AWS_SECRET_ACCESS_KEY": s3_server.secret_access_key}
    done = fedtrain("run", spec_file, "--workdir", tmp_path / "w", env={**os.environ, **credentials})
    assert done.returncode == 0, done.stderr[-3000:]
    uid = (tmp_path / "w" / "uid").read_text().strip()
    store = open_store(f"s3://{s3_server.bucket}/local-runs/default/bucketed-{uid[:8]}", s3_server.environment())
    keys = store.list("")
    assert {"manifest.json", "round-0002/global.safetensors", "final/model.safetensors", "final/plots/accuracy.png",
            "final/summary.json"} <= set(keys)
    assert not (tmp_path / "w" / "round-0001").exists()  # no weights on local disk
    status = json.loads((tmp_path / "w" / "status.json").read_text())
    assert status["phase"] == "Succeeded" and status["modelVersion"] == "1"

    wrong = fedtrain("run", write(tmp_path / "again.yaml", manifest("bucketed-2", 1, storage=body["spec"]["storage"])),
                     "--workdir", tmp_path / "w2", env={**os.environ, **credentials, "AWS_SECRET_ACCESS_KEY": "nope"})
    assert wrong.returncode != 0
    assert "refused the credentials" in wrong.stdout + wrong.stderr
    assert "the environment of `fedtrain run`" in wrong.stdout + wrong.stderr


def test_privacy_clips_updates_and_reports_the_budget(tmp_path: Path) -> None:
    from fedtrain.engine.engine import significant
    from fedtrain.worker.strategies.privacy import epsilon

    body = manifest("private", 2, clients={"count": 4, "perRound": 2},
                    privacy={"clipNorm": 0.5, "noiseMultiplier": 1.2, "delta": 1e-5})
    done = fedtrain("run", write(tmp_path / "ft.yaml", body), "--workdir", tmp_path / "w")
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads((tmp_path / "w" / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    spent = epsilon(2 / 4, 1.2, 2, 1e-5)
    assert status["privacyEpsilon"] == significant(spent) and status["privacyDelta"] == 1e-5  # as kubectl shows it
    result = json.loads((tmp_path / "w" / "round-0002" / "result.json").read_text())
    assert result["epsilon"] == pytest.approx(spent)  # the worker's own record keeps full precision
    for sidecar in (tmp_path / "w" / "round-0002" / "clients").glob("*.json"):
        meta = json.loads(sidecar.read_text())
        assert meta["clip_norm"] == 0.5 and meta["metrics"]["update_norm"] > 0
    assert result["dp_noise_std"] == pytest.approx(1.2 * 0.5 / len(result["accepted"]))
    assert all(norm <= 0.5 + 1e-4 for norm in result["dp_update_norms"].values())  # clipped before leaving
