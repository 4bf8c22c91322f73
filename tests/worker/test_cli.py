"""The worker CLI alone, as Jobs run it: a 3-client, 2-round federation, and the exit code of each failure."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fedtrain.contract.errors import EXIT_BAD_DATA, EXIT_BAD_INPUT, EXIT_NON_FINITE_MODEL, EXIT_REJECTED_UPDATES
from fedtrain.contract.layout import Layout
from fedtrain.worker.jobs import TERMINATION_MESSAGE_LIMIT, termination_message
from fedtrain.worker.weights import save_weights_file

CLIENTS = ("client-00", "client-01", "client-02")


def at(federation: Path) -> FileLayout:
    """The layout's keys as files under a local work directory."""
    return FileLayout(federation)


class FileLayout:
    def __init__(self, root: Path) -> None:
        self.root, self.keys = root, Layout()

    def __getattr__(self, name: str):
        value = getattr(self.keys, name)
        if callable(value):
            return lambda *args: self.root / value(*args)
        return self.root / value


def worker(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fedtrain.worker.cli", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{command} exited {done.returncode}:\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def federation(synth_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Init, then two rounds of three clients and one aggregation each, all through the CLI.

    Round 2's tasks are their second attempts, as after a retried round: the aggregation that names
    no attempt reads each client's latest.
    """
    workdir = tmp_path_factory.mktemp("run")
    worker("init", "--workdir", workdir, "--data", synth_tree, "--clients", 3, "--architecture", "tiny_cnn",
           "--image-size", 32, "--seed", 1)
    for round_number in (1, 2):  # the clients of a round at once, as their Jobs run (each process imports torch)
        with ThreadPoolExecutor(len(CLIENTS)) as pool:
            trainings = [pool.submit(worker, "train", "--workdir", workdir, "--round", round_number, "--client",
                                     client, "--epochs", 4, "--lr", 0.01, "--batch-size", 16, "--device", "cpu",
                                     "--attempt", round_number)
                         for client in CLIENTS]
            for training in trainings:
                training.result()
        worker("aggregate", "--workdir", workdir, "--round", round_number, "--min-updates", 3,
               "--termination-log", workdir / f"termination-{round_number}", "--device", "cpu")
    return workdir


def test_two_rounds_beat_chance_and_leave_the_layout(federation: Path) -> None:
    layout = at(federation)
    result = json.loads(layout.result(2).read_text())
    assert result["accepted"] == list(CLIENTS) and result["rejected"] == {}
    assert result["num_examples"] > 0 and result["test_examples"] == 43 * 2
    assert result["accuracy"] > 2 / 43  # twice chance after two short rounds on 8 images per class
    assert len(result["confusion"]) == 43
    for round_number in (0, 1, 2):
        assert layout.global_weights(round_number).exists()
    for round_number in (1, 2):
        assert sorted(p.name for p in layout.client_dir(round_number).iterdir()) == sorted(
            f"{c}-a{round_number}.{ext}" for c in CLIENTS for ext in ("json", "safetensors"))
    update = json.loads((layout.client_dir(2) / "client-01-a2.json").read_text())
    assert update["base_sha256"] == json.loads(layout.result(1).read_text())["sha256"]
    assert {"train_loss", "train_accuracy", "val_accuracy"} <= set(update["metrics"])


def test_termination_message_is_small_json(federation: Path) -> None:
    text = (federation / "termination-2").read_text()
    message = json.loads(text)
    assert len(text.encode()) <= 4096
    assert message["round"] == 2 and message["accepted"] == list(CLIENTS) and "confusion" not in message


def test_termination_message_names_capped_updates_first_when_reasons_must_be_left_out() -> None:
    capped = {"big": "claims 1000000 examples; weighted as 700 (10 x the round's median 70, "
                     "clients.maxWeightOverMedian)"}
    few = json.loads(termination_message({"round": 1, "accepted": ["a", "big"], "rejected": {}, "capped": capped}))
    assert few["capped"] == capped and "capped" not in json.loads(termination_message({"round": 1, "rejected": {}}))
    rejected = {f"city-{i:04d}": "update norm 1e9 exceeds 10x the round's median norm 3" for i in range(300)}
    text = termination_message({"round": 1, "accepted": ["big"], "rejected": rejected, "capped": capped})
    many = json.loads(text)
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT and many["rejected_count"] == 300
    assert many["capped"] == {"big": capped["big"][:80]} and 0 < len(many["rejected"]) < 300


def test_evaluate_and_predict(federation: Path, synth_tree: Path) -> None:
    scores = json.loads(worker("evaluate", "--workdir", federation, "--round", 2, "--device", "cpu").stdout)
    assert scores["accuracy"] == json.loads(at(federation).result(2).read_text())["accuracy"]
    images = sorted((synth_tree / "Final_Test" / "Images").glob("*.ppm"))[:3]
    rows = json.loads(worker("predict", "--weights", at(federation).global_weights(2), "--top", 3,
                             *images).stdout)
    assert [Path(r["image"]).name for r in rows] == [p.name for p in images]
    assert all(0 <= r["class_id"] < 43 and 0 < r["probability"] <= 1 and len(r["top"]) == 3 for r in rows)
    assert all(isinstance(r["sign_name"], str) and r["sign_name"] for r in rows)


def test_rerunning_init_with_other_settings_changes_nothing(federation: Path, synth_tree: Path) -> None:
    before = at(federation).global_weights(0).read_bytes()
    data_before = sorted(p.stat().st_mtime_ns for p in synth_tree.rglob("*.ppm"))
    done = worker("init", "--workdir", federation, "--data", synth_tree, "--clients", 4, "--architecture",
                  "tiny_cnn", "--image-size", 32, "--synthetic-per-class", 2, check=False)
    assert done.returncode == EXIT_BAD_INPUT and "already initialised with other settings" in done.stderr
    assert at(federation).global_weights(0).read_bytes() == before
    assert sorted(p.stat().st_mtime_ns for p in synth_tree.rglob("*.ppm")) == data_before  # no data regenerated


def test_exit_codes_tell_the_cause(federation: Path, tmp_path: Path) -> None:
    unknown_client = worker("train", "--workdir", federation, "--round", 1, "--client", "client-07", check=False)
    assert unknown_client.returncode == EXIT_BAD_INPUT and "--client 'client-07'" in unknown_client.stderr
    no_data = worker("train", "--workdir", federation, "--round", 1, "--client", "client-00",
                     "--data", tmp_path / "gone", check=False)
    assert no_data.returncode == EXIT_BAD_DATA and "does not exist" in no_data.stderr
    usage = worker("train", "--workdir", federation, check=False)
    assert usage.returncode == EXIT_BAD_INPUT
    bad_strategy = worker("aggregate", "--workdir", federation, "--round", 1, "--strategy", "nope", check=False)
    assert bad_strategy.returncode == EXIT_BAD_INPUT and "strategy.name 'nope'" in bad_strategy.stderr


def test_a_round_of_poisoned_updates_exits_rejected(federation: Path, tmp_path: Path) -> None:
    layout = at(federation)
    from fedtrain.worker.weights import read_weights_file

    weights, meta = read_weights_file(layout.global_weights(2))
    nan = {k: (np.full_like(v, np.nan) if v.dtype.kind == "f" else v) for k, v in weights.items()}
    save_weights_file(layout.client_update(3, "client-00"), nan, {"num_examples": 5, "base_sha256": meta["sha256"]})
    done = worker("aggregate", "--workdir", federation, "--round", 3, "--device", "cpu", check=False)
    assert done.returncode == EXIT_REJECTED_UPDATES
    assert "client-00: tensor" in done.stderr and "NaN" in done.stderr
    assert not layout.global_weights(3).exists()


def test_an_update_trained_from_another_model_is_rejected(federation: Path, tmp_path: Path) -> None:
    """A replayed or stale update (its base is round 1's model, the round started from round 2's) never counts."""
    layout = at(federation)
    from fedtrain.worker.weights import read_weights_file

    weights, stale = read_weights_file(layout.global_weights(1))
    save_weights_file(layout.client_update(3, "client-00"), weights, {"num_examples": 5,
                                                                      "base_sha256": stale["sha256"]})
    done = worker("aggregate", "--workdir", federation, "--round", 3, "--device", "cpu", check=False)
    assert done.returncode == EXIT_REJECTED_UPDATES
    assert "client-00: trained from another model" in done.stderr


@pytest.mark.parametrize("site", [True, False], ids=["site", "in-cluster"])
def test_a_late_upload_of_a_stale_attempt_never_counts(federation: Path, tmp_path: Path, site: bool) -> None:
    """Attempt 1, which the engine gave up on, writes after attempt 2: each has its own key, attempt 2 counts.

    A site keeps its own clock; an in-cluster Job past its deadline may still be running too.
    """
    from fedtrain.worker.weights import read_weights_file

    workdir = tmp_path / "copy"
    shutil.copytree(federation, workdir)
    client = "munich" if site else "client-00"
    keys = Layout(sites=frozenset({client} if site else ()))
    weights, meta = read_weights_file(workdir / keys.global_weights(2))
    for attempt, step in ((2, 0.01), (1, 5.0)):  # attempt 1 writes last
        moved = {k: (v + step).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in weights.items()}
        save_weights_file(workdir / keys.client_update(3, client, attempt), moved,
                          {"num_examples": 5, "base_sha256": meta["sha256"]})
    assert keys.client_update(3, client, 1) != keys.client_update(3, client, 2)
    worker("aggregate", "--workdir", workdir, "--round", 3, "--clients", client, *(["--sites", client] if site else []),
           "--client-attempt", f"{client}=2", "--no-evaluate", "--device", "cpu")
    model, _ = read_weights_file(workdir / keys.global_weights(3))
    name = next(k for k, v in weights.items() if v.dtype.kind == "f")
    np.testing.assert_allclose(model[name], weights[name] + 0.01, atol=1e-6)


def test_a_non_finite_aggregate_is_never_written(federation: Path, tmp_path: Path) -> None:
    """Finite updates, but FedAdam's step of eta 1e39 overflows float32: the round fails and writes nothing."""
    from fedtrain.worker.weights import read_weights_file

    workdir = tmp_path / "copy"
    shutil.copytree(federation, workdir)
    layout = at(workdir)
    weights, meta = read_weights_file(layout.global_weights(2))
    moved = {k: (v + 0.01).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in weights.items()}
    save_weights_file(layout.client_update(3, "client-00"), moved, {"num_examples": 5, "base_sha256": meta["sha256"]})
    done = worker("aggregate", "--workdir", workdir, "--round", 3, "--strategy", "fedadam", "--param", "eta=1e39",
                  "--device", "cpu", check=False)
    assert done.returncode == EXIT_NON_FINITE_MODEL
    assert "fedadam aggregate's global model has NaN or Inf in tensor" in done.stderr
    assert not layout.global_weights(3).exists() and not layout.strategy_state(3).exists()
    assert not layout.result(3).exists()


def test_remove_deletes_only_a_training_directory(tmp_path: Path) -> None:
    from fedtrain.worker.cli import main

    training = tmp_path / "team" / "signs-1234abcd"
    (training / "round-0001").mkdir(parents=True)
    (training / "manifest.json").write_text("{}")
    other = tmp_path / "precious"
    other.mkdir()
    (other / "data.csv").write_text("keep me")
    assert main(["remove", "--workdir", str(other)]) == 2
    assert (other / "data.csv").read_text() == "keep me"
    assert main(["remove", "--workdir", str(training)]) == 0
    assert not training.exists()
    assert main(["remove", "--workdir", str(training)]) == 0  # already gone: idempotent, as a retried Job needs
