"""``fedtrain run`` with secure aggregation: real worker processes, the store as the only channel between stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.local.test_run import fedtrain, manifest, write

pytestmark = pytest.mark.timeout(900)

SECURE = {"clipNorm": 20.0, "secureAggregation": {"threshold": 3}}


def secure_manifest(name: str, **spec: Any) -> dict[str, Any]:
    body = {"clients": {"count": 4, "minSuccessful": 3, "maxExamples": 200}, "privacy": SECURE,
            "mlflow": {"experiment": "tests"}, **spec}
    return manifest(name, 2, **body)


def objects(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_a_secure_training_succeeds_and_the_store_never_holds_one_update(tmp_path: Path) -> None:
    done = fedtrain("run", write(tmp_path / "ft.yaml", secure_manifest("secure")), "--workdir", tmp_path / "w")
    assert done.returncode == 0, done.stderr[-3000:]
    work = tmp_path / "w"
    status = json.loads((work / "status.json").read_text())
    assert status["phase"] == "Succeeded", status["message"]
    for round_number in (1, 2):
        folder = work / f"round-{round_number:04d}"
        assert not list(folder.glob("clients/*.safetensors")), "no update in the clear"
        masked = sorted(folder.glob("secure-a1/*/masked.safetensors"))
        assert [p.parent.name for p in masked] == ["client-00", "client-01", "client-02", "client-03"]
        for kind in ("keys.json", "shares.json", "reveal.json"):
            assert len(list(folder.glob(f"secure-a1/*/{kind}"))) == 4, kind
        sidecars = [json.loads(p.with_suffix(".json").read_text()) for p in masked]
        assert all("num_examples" not in s and "val_examples" not in s["metrics"] for s in sidecars)
        result = json.loads((folder / "result.json").read_text())
        assert result["accepted"] == ["client-00", "client-01", "client-02", "client-03"]
        secure = result["secure_aggregation"]
        assert 0 < secure["quantisation_error_bound"] < 1e-2  # reported; exactness is tests/contract's
        assert result["num_examples"] == pytest.approx(secure["weight_sum"] * 200, abs=1)
        weights = load_file(str(folder / "global.safetensors"))
        assert all(np.isfinite(v).all() for v in weights.values() if v.dtype.kind == "f")
    secrets = sorted(p.name for p in (work / "secrets").iterdir())
    assert secrets == ["client-00.key", "client-01.key", "client-02.key", "client-03.key"]
    assert all((work / "secrets" / s).stat().st_mode & 0o077 == 0 for s in secrets)
    assert not any(p.name.endswith(".key") for p in objects(work) if "secrets" not in p.parts)


def test_a_client_that_cannot_take_part_drops_and_the_round_completes_above_the_threshold(tmp_path: Path) -> None:
    work = tmp_path / "w"
    (work / "secrets").mkdir(parents=True)
    (work / "secrets" / "client-02.key").write_bytes(b"short")  # its keys stage fails: bad input, not retried
    done = fedtrain("run", write(tmp_path / "ft.yaml", secure_manifest("dropping")), "--workdir", work)
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads((work / "status.json").read_text())
    assert status["phase"] == "Succeeded", status["message"]
    result = json.loads((work / "round-0001" / "result.json").read_text())
    assert result["accepted"] == ["client-00", "client-01", "client-03"]
    assert not (work / "round-0001" / "secure-a1" / "client-02").exists()


def test_below_the_threshold_the_training_fails_with_the_named_reason(tmp_path: Path) -> None:
    work = tmp_path / "w"
    (work / "secrets").mkdir(parents=True)
    for client in ("client-01", "client-02"):
        (work / "secrets" / f"{client}.key").write_bytes(b"short")
    body = secure_manifest("failing", clients={"count": 4, "minSuccessful": 1, "maxExamples": 200})
    done = fedtrain("run", write(tmp_path / "ft.yaml", body), "--workdir", work)
    assert done.returncode != 0
    status = json.loads((work / "status.json").read_text())
    assert status["phase"] == "Failed" and status["reason"] == "SecureAggregationThreshold", status["message"]
    assert "2 of 4 clients finished advertising keys, threshold 3 needed" in status["message"]


@pytest.mark.parametrize("stage", ["keys", "shares", "train", "unmask"])
def test_a_runner_killed_in_any_stage_resumes_without_repeating_a_finished_stage(tmp_path: Path, stage: str) -> None:
    spec_file = write(tmp_path / "ft.yaml", secure_manifest(f"killed-{stage}"))
    work = tmp_path / "w"
    runner = subprocess.Popen([sys.executable, "-m", "fedtrain.cli", "run", str(spec_file), "--workdir", str(work)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # until the status shows round 1 in the stage
        status = json.loads((work / "status.json").read_text()) if (work / "status.json").exists() else {}
        rounds = status.get("rounds") or [{}]
        if (rounds[0].get("secure") or {}).get("stage") == stage:
            break
        assert runner.poll() is None, "the runner ended before it could be killed"
        time.sleep(0.02)
    os.killpg(runner.pid, signal.SIGKILL)
    runner.wait()

    done = fedtrain("run", spec_file, "--workdir", work)
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads((work / "status.json").read_text())
    assert status["phase"] == "Succeeded", status["message"]
    finished = [json.loads(line) for line in (work / "executor" / "tasks.jsonl").read_text().splitlines() if line]
    succeeded = [r["task"] for r in finished if r["state"] == "succeeded"]
    by_stage = Counter(ident.rsplit("-a", 1)[0] for ident in succeeded)
    assert all(count == 1 for count in by_stage.values()), by_stage  # one successful attempt per client and stage
    assert len(list(work.glob("round-0001/secure-a*/*/masked.safetensors"))) == 4
