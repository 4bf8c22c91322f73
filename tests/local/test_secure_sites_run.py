"""Secure aggregation with remote sites: a coordinator and three ``fedtrain site run`` processes, a store between them.

Each site advertises keys, shares its secrets, trains into a masked update and reveals shares,
every one of them a task the coordinator posts in the site's ``task.json`` with what it needs of
the others relayed inside it: no site reads another's folder, and no update is ever stored in
the clear. One site refuses to train (its policy's maxLocalEpochs) after it shared, so the others
unmask the sum without it; another is relayed a share that was forged, refuses it by name, and the
round still completes above the threshold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtrain.contract.sitetask import SiteTask
from fedtrain.contract.storage import open_store, s3_location
from fedtrain.engine.status import Event
from fedtrain.local.runner import RunOptions, run_training
from fedtrain.sites.bucket_policy import site_policy
from fedtrain.sites.relay import SiteRelay
from fedtrain.spec import parse_manifest
from tests.conftest import S3Server
from tests.local.test_sites_run import participation, start, wait_all

pytestmark = pytest.mark.timeout(900)

SITES = {"munich": 11, "hamburg": 12, "berlin": 13}  # site -> seed of the data generated there
SECURE = {"clipNorm": 20.0, "secureAggregation": {"threshold": 2}}


def coordinator(store: Path, rounds: int, **clients: Any) -> dict[str, Any]:
    """Three sites, every one of them needed for no more than the threshold of two."""
    listed = [{"name": name, "site": {}, **clients.get(name, {})} for name in SITES]
    return {"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedTraining",
            "metadata": {"name": "cities", "namespace": "team-signs"},
            "spec": {"rounds": rounds, "seed": 3, "privacy": SECURE,
                     "model": {"architecture": "tiny_cnn", "numClasses": 43, "imageSize": 16},
                     "clients": {"list": listed, "minSuccessful": 2, "maxExamples": 400},
                     "training": {"localEpochs": 1, "batchSize": 32, "learningRate": 0.005},
                     "evaluation": {"central": False}, "roundDeadlineSeconds": 240,
                     "storage": {"local": str(store)}, "worker": {"parallelism": 1, "device": "cpu"},
                     "mlflow": {"logClients": False}}}


def write_files(tmp_path: Path, store: Path, spec: dict[str, Any], policies: dict[str, dict[str, Any]]
                ) -> dict[str, Path]:
    files = {"coordinator": tmp_path / "coordinator.yaml"}
    files["coordinator"].write_text(yaml.safe_dump(spec))
    for site, seed in SITES.items():
        document = participation(site, seed, store)
        document["spec"]["policy"] = policies.get(site, {})
        files[site] = tmp_path / f"{site}.yaml"
        files[site].write_text(yaml.safe_dump(document))
    return files


def start_sites(tmp_path: Path, files: dict[str, Path], logs: Path) -> dict[str, Any]:
    return {site: start(["site", "run", str(files[site]), "--workdir", str(tmp_path / site), "--threads", "1"],
                        logs / f"{site}.log", tmp_path) for site in SITES}


def stored(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file())


def test_three_sites_train_masked_and_one_that_shared_then_refused_to_train_is_unmasked_away(tmp_path: Path) -> None:
    store, logs = tmp_path / "store", tmp_path / "logs"
    logs.mkdir()
    spec = coordinator(store, 2, berlin={"training": {"localEpochs": 2}})
    files = write_files(tmp_path, store, spec, {"berlin": {"maxLocalEpochs": 1}})
    processes = {"coordinator": start(["run", str(files["coordinator"])], logs / "coordinator.log", tmp_path),
                 **start_sites(tmp_path, files, logs)}
    wait_all(processes, logs, timeout=600)

    status = json.loads((store / "status.json").read_text())
    assert status["phase"] == "Succeeded", status["message"]
    for round_number in (1, 2):
        folder = f"round-{round_number:04d}"
        result = json.loads((store / folder / "result.json").read_text())
        secure = result["secure_aggregation"]
        assert sorted(secure["survivors"]) == ["hamburg", "munich"], secure
        assert sorted(secure["shared"]) == ["berlin", "hamburg", "munich"], secure  # berlin shared, then refused
        assert result["num_examples"] > 0 and 0 < secure["quantisation_error_bound"] < 1e-2
        for site in SITES:
            messages = store / "sites" / site / folder / "secure-a1"
            assert (messages / "keys.json").is_file() and (messages / "shares.json").is_file(), site
            assert (messages / "masked.safetensors").is_file() == (site != "berlin"), site
            assert (messages / "reveal.json").is_file() == (site != "berlin"), site
        refusal = json.loads((store / "sites" / "berlin" / "results" / f"r{round_number:04d}-berlin-a1.json")
                             .read_text())
        assert refusal["exit_code"] == 77 and "spec.policy.maxLocalEpochs" in refusal["reason"], refusal
    keys = [p.relative_to(store).as_posix() for p in stored(store)]
    assert not [k for k in keys if "/update-a" in k or "/clients/" in k], "an update in the clear"
    for sidecar in store.glob("sites/*/round-*/secure-a1/masked.json"):
        figures = json.loads(sidecar.read_text())
        assert "num_examples" not in figures and "val_examples" not in figures["metrics"], sidecar
    for site in SITES:
        secret = tmp_path / site / "secure.key"
        assert secret.stat().st_size == 32 and secret.stat().st_mode & 0o077 == 0, site
        assert secret.read_bytes() not in b"".join(p.read_bytes() for p in stored(store))
        posting = json.loads((store / "sites" / site / "task.json").read_text())
        assert posting["phase"] == "Succeeded"
    site_status = json.loads((tmp_path / "munich" / "site-status.json").read_text())
    assert site_status["phase"] == "Completed" and site_status["roundsDone"] == 2, site_status


def forge_share(relay_task: Any) -> Any:
    """The relay's `task`, with hamburg's share for munich altered in its unmask task (one byte of the ciphertext)."""

    def task(self: SiteRelay, wanted: Any) -> SiteTask:
        posted: SiteTask = relay_task(self, wanted)
        if posted.kind != "unmask" or posted.site != "munich" or posted.secure is None:
            return posted
        share = posted.secure.shares["hamburg"]
        text = share.ciphertexts["munich"]
        flipped = text[:20] + ("A" if text[20] != "A" else "B") + text[21:]
        forged = share.model_copy(update={"ciphertexts": {"munich": flipped}})
        secure = posted.secure.__class__(**{**vars(posted.secure), "shares": {**posted.secure.shares,
                                                                               "hamburg": forged}})
        return posted.__class__(**{**vars(posted), "secure": secure})

    return task


def test_a_forged_share_relayed_to_a_site_is_refused_by_name_and_the_round_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, logs = tmp_path / "store", tmp_path / "logs"
    logs.mkdir()
    files = write_files(tmp_path, store, coordinator(store, 1), {})
    monkeypatch.setattr(SiteRelay, "task", forge_share(SiteRelay.task))
    sites = start_sites(tmp_path, files, logs)
    events: list[Event] = []
    manifest = parse_manifest(yaml.safe_load(files["coordinator"].read_text()))
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.update(result=run_training(
        manifest, RunOptions(workdir=store), on_event=events.append)))
    runner.start()
    runner.join(timeout=600)
    assert not runner.is_alive(), [e.message for e in events][-10:]
    wait_all(sites, logs, timeout=120)

    status = outcome["result"].status
    assert status.phase == "Succeeded", status.message
    refused = json.loads((store / "sites" / "munich" / "results" / "u0001-munich-a1.json").read_text())
    assert list(refused["output"]["refused"]) == ["hamburg"], refused
    assert "fails authentication" in refused["output"]["refused"]["hamburg"]
    named = [e for e in events if e.reason == "SecureSharesRefused"]
    assert len(named) == 1 and "munich refused the shares of hamburg's" in named[0].message, named
    result = json.loads((store / "round-0001" / "result.json").read_text())
    assert sorted(result["secure_aggregation"]["survivors"]) == sorted(SITES)
    assert os.path.exists(store / "round-0001" / "global.safetensors")


def start_as(arguments: list[str], log: Path, cwd: Path, environment: dict[str, str]) -> subprocess.Popen[bytes]:
    """A ``fedtrain`` process with ``environment`` (one party's store key) and nobody else's."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fedtrain.cli", *arguments], stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd,
                                env={**environment, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def test_an_in_cluster_client_and_sites_each_holding_only_its_own_key_aggregate_securely_through_s3(
        tmp_path: Path, s3_server: S3Server) -> None:
    """hq trains in the coordinator's cluster, munich and hamburg are sites whose keys read only their folders.

    hamburg's secret is not one (5 bytes): it fails advertising its keys each round and drops out;
    hq and munich, at the threshold, still aggregate. Every object is then read with the coordinator's key.
    """
    prefix, uid = "secure-mixed", "1a2b3c4d" + "0" * 24
    training_id = f"team-signs/cities-{uid[:8]}"
    s3 = {"endpoint": s3_server.endpoint, "bucket": s3_server.bucket, "prefix": prefix, "region": "us-east-1"}
    work, logs = tmp_path / "coordinator", tmp_path / "logs"
    work.mkdir()
    logs.mkdir()
    (work / "uid").write_text(uid + "\n")  # the training's folder, which the sites are told, is fixed in advance
    spec = coordinator(tmp_path / "unused", 2)
    spec["spec"]["storage"] = {"s3": s3}
    spec["spec"]["dataset"] = {"synthetic": {"imagesPerClass": 4, "testImagesPerClass": 1, "framesPerTrack": 2}}
    spec["spec"]["clients"]["list"] = [{"name": "hq"}, {"name": "munich", "site": {"evaluate": False}},
                                       {"name": "hamburg", "site": {"evaluate": False}}]
    spec["spec"]["evaluation"] = {"central": True}
    (tmp_path / "coordinator.yaml").write_text(yaml.safe_dump(spec))
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FEDTRAIN_S3_"))}
    processes = {"coordinator": start_as(["run", str(tmp_path / "coordinator.yaml"), "--workdir", str(work)],
                                         logs / "coordinator.log", tmp_path,
                                         {**environment, **s3_server.environment("the coordinator's key")})}
    (tmp_path / "hamburg").mkdir()
    (tmp_path / "hamburg" / "secure.key").write_bytes(b"short")
    for site, seed in (("munich", 11), ("hamburg", 12)):
        document = participation(site, seed, tmp_path)
        document["spec"]["store"] = {"s3": s3}
        document["spec"]["training"]["id"] = training_id
        (tmp_path / f"{site}.yaml").write_text(yaml.safe_dump(document))
        key_id, secret = s3_server.user(f"secure-{site}", site_policy(s3_server.bucket, prefix, training_id, site))
        processes[site] = start_as(["site", "run", str(tmp_path / f"{site}.yaml"), "--workdir", str(tmp_path / site),
                                    "--threads", "1"], logs / f"{site}.log", tmp_path,
                                   {**environment, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret})
    wait_all(processes, logs, timeout=600)

    status = json.loads((work / "status.json").read_text())
    assert status["phase"] == "Succeeded", status["message"]
    store = open_store(s3_location(s3_server.bucket, prefix, training_id), s3_server.environment())
    keys = store.list("")
    assert not [k for k in keys if "/update-a" in k or "/clients/" in k], "an update in the clear"
    for round_number in (1, 2):
        folder = f"round-{round_number:04d}"
        result = json.loads(store.read_bytes(f"{folder}/result.json"))
        assert sorted(result["secure_aggregation"]["survivors"]) == ["hq", "munich"], result
        assert f"{folder}/secure-a1/hq/masked.safetensors" in keys
        assert f"sites/munich/{folder}/secure-a1/masked.safetensors" in keys
        assert not [k for k in keys if k.startswith(f"sites/hamburg/{folder}/")]
        failed = json.loads(store.read_bytes(f"sites/hamburg/results/k{round_number:04d}-hamburg-a1.json"))
        assert failed["exit_code"] == 2 and "a secure-aggregation secret is 32 bytes" in failed["reason"], failed
    assert (tmp_path / "munich" / "secure.key").stat().st_size == 32
