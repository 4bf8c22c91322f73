"""``fedtrain site run`` against a coordinator's store: a real worker, real training on tiny synthetic data.

The coordinator's side is played by hand, as its relay would: ``fedtrain-worker init`` writes the
initial model, then task.json postings appear and change. The site runs as its own process and is
judged only by what it leaves in the store and in its work directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from fedtrain.contract.errors import EXIT_BAD_DATA, EXIT_REFUSED
from fedtrain.contract.layout import Layout
from fedtrain.contract.sitetask import Posting, SiteResult, TrainSettings, encode, parse_result
from fedtrain.sites.local import STATUS_FILE, SiteLoop
from fedtrain.sites.participation import load_participation
from fedtrain.worker.cli import main as worker
from tests.sites.documents import site_task

ROOT = Path(__file__).parents[2]
LAYOUT = Layout(sites=frozenset({"munich"}))


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen[str], seconds: float = 180) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` and showing the site's output otherwise."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            output = process.communicate()[0]
            pytest.fail(f"{what} did not happen (site exit {process.returncode}):\n{output[-4000:]}")
        time.sleep(0.2)


def result(store: Path, task_id: str) -> SiteResult:
    return parse_result((store / LAYOUT.site_result("munich", task_id)).read_bytes())


@pytest.fixture()
def coordinator(tmp_path: Path) -> Path:
    """A data-less training's store with its initial model (tiny CNN, 16 px): what the coordinator's init leaves."""
    store = tmp_path / "store"
    code = worker(["init", "--workdir", str(store), "--no-data", "--clients", "1", "--client-names", "munich",
                   "--own-data-clients", "munich", "--architecture", "tiny_cnn", "--num-classes", "43",
                   "--image-size", "16", "--seed", "3"])
    assert code == 0
    return store


SYNTHETIC: dict[str, object] = {"synthetic": {"imagesPerClass": 2, "testImagesPerClass": 1, "framesPerTrack": 1,
                                              "seed": 5}}


def participation(tmp_path: Path, store: Path, data: dict[str, object]) -> Path:
    """munich's participation file: the store, ``data`` (generated at the site, or a tree), fedavg only."""
    path = tmp_path / "munich.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedParticipation", "metadata": {"name": "munich"},
        "spec": {"site": "munich", "training": {"id": ""}, "store": {"local": str(store)}, "data": data,
                 "worker": {"device": "cpu"}, "validationFraction": 0.0,
                 "policy": {"strategies": ["fedavg"]}, "pollSeconds": 1}}))
    return path


def post(store: Path, posting: Posting) -> None:
    path = store / LAYOUT.site_task("munich")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(encode(posting))
    temporary.replace(path)


def test_a_site_trains_refuses_and_stops_with_the_training(tmp_path: Path, coordinator: Path) -> None:
    sidecar = json.loads((coordinator / "round-0000" / "global.json").read_text())
    deadline = time.time() + 600
    train = site_task(id="r0001-munich-a1", round=1, total_rounds=2, global_key=LAYOUT.global_weights(0),
                      global_sha256=sidecar["sha256"], deadline=deadline, train=TrainSettings(epochs=1, batch_size=16))
    post(coordinator, Posting("Running", train))
    workdir = tmp_path / "site"
    process = subprocess.Popen([sys.executable, "-m", "fedtrain.cli", "site", "run",
                                str(participation(tmp_path, coordinator, SYNTHETIC)), "--workdir", str(workdir)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        answer = coordinator / LAYOUT.site_result("munich", train.id)
        wait_for(answer.exists, "munich's answer to the train task", process)
        trained = result(coordinator, train.id)
        assert trained.state == "succeeded", trained.reason
        update = coordinator / LAYOUT.client_update(1, "munich")
        assert trained.output["sha256"] == hashlib.sha256(update.read_bytes()).hexdigest()
        assert trained.output["num_examples"] > 0

        refused = site_task(id="r0002-munich-a1", round=2, total_rounds=2, strategy="krum", deadline=deadline,
                            global_key=LAYOUT.global_weights(1), global_sha256="00" * 32)
        post(coordinator, Posting("Running", refused))
        wait_for((coordinator / LAYOUT.site_result("munich", refused.id)).exists, "the refusal", process)
        answer_to_krum = result(coordinator, refused.id)
        assert (answer_to_krum.state, answer_to_krum.exit_code) == ("failed", EXIT_REFUSED)
        assert answer_to_krum.reason is not None and "spec.policy.strategies: fedavg" in answer_to_krum.reason

        post(coordinator, Posting("Succeeded", None, "2 rounds"))
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    status = json.loads((workdir / STATUS_FILE).read_text())
    assert status["phase"] == "Completed"
    assert status["roundsDone"] == 1
    assert status["lastRefusal"].startswith("strategy krum")
    assert str(tmp_path) not in (answer_to_krum.reason or "")


def test_a_site_starts_its_task_processes_while_it_waits_and_stops_them_when_it_ends(tmp_path: Path,
                                                                                  coordinator: Path) -> None:
    """The fork server (seconds to start) starts beside the site's first reads, not with its first task.

    It outlives the thread that started it (it is told to die with that thread) until the loop ends.
    """
    post(coordinator, Posting("Running", None))
    loop = SiteLoop(load_participation(participation(tmp_path, coordinator, SYNTHETIC)), tmp_path / "site",
                    io.StringIO())
    loop.warm()
    deadline = time.monotonic() + 120
    while loop.started is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert loop.started is not None and loop.started.server is not None, "the executor did not start"
    server = loop.started.server.process
    time.sleep(1.0)
    assert server.poll() is None, "the fork server died with the thread that started it"
    post(coordinator, Posting("Succeeded", None, "done"))
    assert loop.run() == 0
    assert loop.started.server is None and server.poll() is not None  # shut down with the loop


def test_a_site_never_reruns_an_answered_task_and_answers_a_failed_one(tmp_path: Path, coordinator: Path,
                                                                      synth_tree: Path) -> None:
    task = site_task(id="r0001-munich-a1", round=1, deadline=time.time() + 600)
    answer = coordinator / LAYOUT.site_result("munich", task.id)
    answer.parent.mkdir(parents=True)
    answer.write_bytes(encode(SiteResult(task.id, "munich", "succeeded", output={"num_examples": 1})))
    before = answer.read_bytes()
    post(coordinator, Posting("Running", task))
    workdir = tmp_path / "site"
    process = subprocess.Popen([sys.executable, "-m", "fedtrain.cli", "site", "run",
                                str(participation(tmp_path, coordinator, {"localPath": str(synth_tree)})),
                                "--workdir", str(workdir)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for((workdir / STATUS_FILE).exists, "the site's first look", process)
        forged = site_task(id="r0001-munich-a2", round=1, attempt=2, deadline=time.time() + 600,
                           global_key=LAYOUT.global_weights(0), global_sha256="00" * 32)
        post(coordinator, Posting("Running", forged))
        wait_for((coordinator / LAYOUT.site_result("munich", forged.id)).exists, "the answer to a bad task", process)
        post(coordinator, Posting("Failed", None, "quorum missed"))
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert answer.read_bytes() == before
    assert not (coordinator / LAYOUT.client_update(1, "munich")).exists()
    assert not (workdir / "executor" / "logs" / f"{task.id}.err").exists()
    assert json.loads((workdir / STATUS_FILE).read_text())["phase"] == "Failed"
    failed = result(coordinator, forged.id)
    assert (failed.state, failed.exit_code) == ("failed", EXIT_BAD_DATA)
    assert failed.reason is not None and "sha256" in failed.reason
    assert str(synth_tree) not in failed.reason and str(workdir) not in failed.reason
