"""A remote site's worker, as its runner starts it: ``site-task`` on the site's own data, through the real CLI.

One training (tiny CNN, 16 px) with an in-cluster client ``hq`` and a site ``munich`` that brings
its own data: the site trains round 1 from the posted global model, the coordinator aggregates
both updates, then the site scores round 1's model on its test split and on its held-out tracks.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fedtrain.contract.errors import EXIT_BAD_DATA, EXIT_BAD_INPUT, EXIT_OK, BadDataError
from fedtrain.contract.layout import Layout
from fedtrain.contract.sitetask import (
    EVALUATION_LIMIT,
    PROTOCOL_VERSION,
    RESULT_LIMIT,
    ScoresRecord,
    SiteResult,
    SiteTask,
    TrainSettings,
    digest,
    encode,
    evaluation_output,
    parse_evaluation,
    parse_result,
    parse_scores_record,
    parse_task,
    train_output,
)
from fedtrain.contract.storage import open_store
from fedtrain.worker.cli import main
from fedtrain.worker.data.gtsrb import load_tree
from fedtrain.worker.weights import read_json, sidecar_of
from tests.conftest import S3Server

SITE = "munich"
LAYOUT = Layout(sites=frozenset({SITE}))
MODEL = ["--architecture", "tiny_cnn", "--image-size", "16", "--seed", "1"]


def worker(*args: object) -> tuple[int, Any]:
    """Run the worker CLI in this process; its exit code and the JSON it printed (None when it failed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, json.loads(out.getvalue()) if code == EXIT_OK else None


def posted(workdir: Path | str, kind: str, round_number: int, site: str = SITE, attempt: int = 1) -> SiteTask:
    """The task a coordinator would post: the global model it names and that model's sha256."""
    model_round = round_number - 1 if kind == "train" else round_number
    key = Layout().global_weights(model_round)
    sidecar = read_json(open_store(str(workdir)), sidecar_of(key))
    return SiteTask(id=f"{'r' if kind == 'train' else 'e'}{round_number:04d}-{site}-a{attempt}", kind=kind,
                    round=round_number, site=site, attempt=attempt,
                    training="tests/t", total_rounds=2, strategy="fedavg", architecture="tiny_cnn", global_key=key,
                    global_sha256=sidecar["sha256"], deadline=time.time() + 600, seed=1,
                    train=TrainSettings(epochs=1, batch_size=32, learning_rate=0.01) if kind == "train" else None)


def site_task(workdir: Path | str, task: SiteTask | dict[str, Any], data: Path, *options: object) -> tuple[int, Any]:
    document = task.to_json() if isinstance(task, SiteTask) else task
    return worker("site-task", "--workdir", workdir, "--task-json", json.dumps(document), "--data", data,
                  "--device", "cpu", *options)


def files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def training(synth_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Initialised with ``hq`` on the partition and ``munich`` on its own data; round 1 trained by both."""
    workdir = tmp_path_factory.mktemp("site-training")
    code, _ = worker("init", "--workdir", workdir, "--data", synth_tree, "--clients", 2, "--client-names",
                     f"hq,{SITE}", "--own-data-clients", SITE, *MODEL)
    assert code == EXIT_OK
    code, _ = worker("train", "--workdir", workdir, "--round", 1, "--client", "hq", "--device", "cpu")
    assert code == EXIT_OK
    return workdir


@pytest.fixture(scope="module")
def trained(training: Path, synth_tree: Path) -> tuple[Path, dict[str, int], dict[str, int], Any]:
    """The site's train task of round 1 run once: files before and after, and what it printed."""
    before = files(training)
    code, output = site_task(training, posted(training, "train", 1), synth_tree)
    assert code == EXIT_OK
    return training, before, files(training), output


def test_the_site_trains_on_its_own_data_and_answers(trained: tuple[Path, dict[str, int], dict[str, int], Any],
                                                     synth_tree: Path) -> None:
    workdir, before, after, output = trained
    written = sorted(set(after) - set(before))
    assert all(key.startswith(f"sites/{SITE}/") for key in written)  # only where the site may write
    update = json.loads((workdir / sidecar_of(LAYOUT.client_update(1, SITE))).read_text())
    global_0 = json.loads((workdir / "round-0000/global.json").read_text())
    assert update["client"] == SITE and update["round"] == 1 and update["base_sha256"] == global_0["sha256"]
    held_out = update["metrics"]["val_examples"]  # the whole training split: trained on or held out
    assert held_out > 0 and update["num_examples"] + held_out == len(load_tree(synth_tree, need_test=False).train)
    result = parse_result((workdir / LAYOUT.site_result(SITE, "r0001-munich-a1")).read_bytes())
    assert result.state == "succeeded" and result.site == SITE and result.output == output
    assert output == {"num_examples": update["num_examples"], "metrics": update["metrics"], "sha256": update["sha256"]}
    assert train_output(output, update["num_examples"]).model_dump(exclude_none=True) == output  # as accepted


def test_a_task_answered_already_is_not_run_again(trained: tuple[Path, dict[str, int], dict[str, int], Any],
                                                  synth_tree: Path) -> None:
    workdir, _, after, output = trained
    code, again = site_task(workdir, posted(workdir, "train", 1), synth_tree)
    assert code == EXIT_OK and again == output
    assert files(workdir) == after  # nothing uploaded or rewritten a second time


def test_the_coordinator_aggregates_the_site_update_from_its_folder(
        trained: tuple[Path, dict[str, int], dict[str, int], Any]) -> None:
    workdir = trained[0]
    code, result = worker("aggregate", "--workdir", workdir, "--round", 1, "--sites", SITE, "--device", "cpu")
    assert code == EXIT_OK
    assert result["accepted"] == ["hq", SITE] and result["rejected"] == {}
    update = json.loads((workdir / sidecar_of(LAYOUT.client_update(1, SITE))).read_text())
    hq = json.loads((workdir / sidecar_of(LAYOUT.client_update(1, "hq"))).read_text())
    assert result["num_examples"] == update["num_examples"] + hq["num_examples"]


def test_the_site_scores_the_global_model_on_its_test_split_and_held_out_tracks(
        trained: tuple[Path, dict[str, int], dict[str, int], Any], synth_tree: Path) -> None:
    workdir = trained[0]
    if not (workdir / "round-0001/result.json").exists():
        assert worker("aggregate", "--workdir", workdir, "--round", 1, "--sites", SITE, "--device", "cpu")[0] == 0
    central = json.loads((workdir / "round-0001/result.json").read_text())
    code, output = site_task(workdir, posted(workdir, "evaluate", 1), synth_tree)
    assert code == EXIT_OK
    figures = json.loads((workdir / LAYOUT.site_evaluation(SITE, 1)).read_text())
    test_size = len(load_tree(synth_tree).test)
    assert figures["examples"] == output["examples"] == test_size and figures["split"] == "test"
    assert sum(figures["per_class_total"]) == test_size
    assert figures["accuracy"] == pytest.approx(sum(figures["per_class_correct"]) / test_size)
    assert 0 <= output["accuracy"] <= 1
    # The site's test split is the coordinator's here: the same model must score the same on it.
    assert output["accuracy"] == pytest.approx(central["accuracy"]) and output["loss"] == pytest.approx(central["loss"])
    result = parse_result((workdir / LAYOUT.site_result(SITE, "e0001-munich-a1")).read_bytes())
    assert result.state == "succeeded" and result.output == output
    assert evaluation_output(output, test_size).model_dump() == output  # what the coordinator accepts
    assert parse_evaluation((workdir / LAYOUT.site_evaluation(SITE, 1)).read_bytes(), test_size).split == "test"

    code, held = site_task(workdir, posted(workdir, "evaluate", 1, attempt=2), synth_tree,
                           "--evaluation-split", "validation")
    assert code == EXIT_OK
    trained_update = json.loads((workdir / sidecar_of(LAYOUT.client_update(1, SITE))).read_text())
    assert held["examples"] == trained_update["metrics"]["val_examples"]  # the tracks training held out
    assert json.loads((workdir / LAYOUT.site_evaluation(SITE, 1)).read_text())["split"] == "validation"


def test_a_training_task_scores_the_model_it_trains_from_first(
        trained: tuple[Path, dict[str, int], dict[str, int], Any], synth_tree: Path) -> None:
    workdir = trained[0]
    if not (workdir / "round-0001/result.json").exists():
        assert worker("aggregate", "--workdir", workdir, "--round", 1, "--sites", SITE, "--device", "cpu")[0] == 0
    central = json.loads((workdir / "round-0001/result.json").read_text())
    task = replace(posted(workdir, "train", 2), evaluate_base=True)
    code, output = site_task(workdir, task, synth_tree)
    assert code == EXIT_OK
    scored = output["evaluation"]
    assert scored["accuracy"] == pytest.approx(central["accuracy"]) and scored["loss"] == pytest.approx(central["loss"])
    figures = parse_evaluation((workdir / LAYOUT.site_evaluation(SITE, 1)).read_bytes(), scored["examples"])
    assert figures.accuracy == pytest.approx(scored["accuracy"])  # the figures of round 1's model, written as such
    assert train_output(output, output["num_examples"]).model_dump(exclude_none=True) == output
    assert (workdir / LAYOUT.client_update(2, SITE, 1)).exists()  # and the training went on


def test_a_task_or_model_that_is_not_what_the_coordinator_posted_is_refused(
        training: Path, synth_tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = posted(training, "train", 1, attempt=9)
    tampered = {**task.to_json(), "round": 2}  # digest of the original content
    assert site_task(training, tampered, synth_tree)[0] == EXIT_BAD_DATA
    assert "does not match its content" in capsys.readouterr().err
    assert site_task(training, replace(task, global_sha256="0" * 64), synth_tree)[0] == EXIT_BAD_DATA
    assert "sha256 differs from the one the coordinator posted" in capsys.readouterr().err
    assert site_task(training, replace(task, architecture="mobilenet_v3_small"), synth_tree)[0] == EXIT_BAD_DATA
    assert "architecture is 'tiny_cnn'" in capsys.readouterr().err
    assert site_task(training, replace(task, global_key="round-0000/manifest.json"), synth_tree)[0] == EXIT_BAD_DATA
    assert "global_key: String should match pattern" in capsys.readouterr().err
    assert site_task(training, replace(task, global_key="round-0001/global.safetensors"), synth_tree)[0] == \
        EXIT_BAD_DATA
    assert "is not the global model this task needs" in capsys.readouterr().err
    assert site_task(training, task, synth_tree, "--validation-fraction", 1.5)[0] == EXIT_BAD_INPUT
    assert not (training / LAYOUT.site_result(SITE, task.id)).exists()


def test_init_without_data_reads_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = tmp_path / "coordinator"
    code, output = worker("init", "--workdir", workdir, "--data", tmp_path / "nowhere", "--no-data", "--clients", 2,
                          "--client-names", "a,b", "--own-data-clients", "a,b", *MODEL)
    assert code == EXIT_OK and output == {"clients": {}, "num_train_samples": 0}
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["partition"]["clients"] == {} and manifest["settings"]["data"] is None
    assert sorted(files(workdir)) == ["manifest.json", "round-0000/global.json", "round-0000/global.safetensors"]
    assert worker("init", "--workdir", tmp_path / "other", "--no-data", "--clients", 2, "--client-names", "a,b",
                  "--own-data-clients", "a", *MODEL)[0] == EXIT_BAD_INPUT
    assert "--no-data leaves client 'b' without data" in capsys.readouterr().err
    assert worker("evaluate", "--workdir", workdir, "--round", 0, "--device", "cpu")[0] == EXIT_BAD_INPUT
    assert "initialised with --no-data" in capsys.readouterr().err


def test_a_site_trains_through_an_object_store(s3_server: S3Server, synth_tree: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    prefix = f"site-task-{time.time_ns()}"
    location = f"s3://{s3_server.bucket}/{prefix}"
    assert worker("init", "--workdir", location, "--no-data", "--clients", 1, "--client-names", SITE,
                  "--own-data-clients", SITE, *MODEL)[0] == EXIT_OK
    code, output = site_task(location, posted(location, "train", 1), synth_tree)
    assert code == EXIT_OK
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{prefix}/")["Contents"]
    keys = sorted(item["Key"].removeprefix(f"{prefix}/") for item in listed)
    assert keys == sorted(["manifest.json", "round-0000/global.json", "round-0000/global.safetensors",
                           LAYOUT.client_update(1, SITE), sidecar_of(LAYOUT.client_update(1, SITE)),
                           LAYOUT.site_result(SITE, "r0001-munich-a1")])
    update = read_json(open_store(location), sidecar_of(LAYOUT.client_update(1, SITE)))
    assert update["sha256"] == output["sha256"] and update["num_examples"] == output["num_examples"] > 0


# --- the parsers of what a site writes (pure: no training) ---------------------------------------------------------

GOOD_RESULT = {"task": "e0003-munich-a1", "site": "munich", "state": "succeeded", "exit_code": 0, "reason": None,
               "output": {"examples": 40, "accuracy": 0.5, "loss": 1.5}, "version": PROTOCOL_VERSION}


def test_a_result_round_trips_through_its_strict_parser() -> None:
    result = SiteResult("r0003-munich-a2", "munich", "failed", 77, "refused: spec.policy.strategies")
    assert parse_result(encode(result)) == result
    assert parse_result(json.dumps(GOOD_RESULT).encode()).output == GOOD_RESULT["output"]
    assert len(encode(replace(result, reason="x" * 4096))) < RESULT_LIMIT  # the longest reason fits the bound


@pytest.mark.parametrize(("change", "said"), [
    ({"output": [1, 2]}, "output: Input should be an object"),
    ({"output": "figures"}, "output: Input should be an object"),
    ({"state": "maybe"}, "state: Input should be 'succeeded' or 'failed'"),
    ({"site": "../hamburg"}, "site: String should match pattern"),
    ({"task": "e0003 munich"}, "task: String should match pattern"),
    ({"exit_code": 300}, "exit_code: Input should be less than or equal to 255"),
    ({"exit_code": 1.0}, "exit_code: Input should be a valid integer"),
    ({"reason": "x" * 5000}, "reason: String should have at most 4096 characters"),
    ({"reason": ["a"]}, "reason: Input should be a valid string"),
    ({"digest": "abc"}, "digest: Extra inputs are not permitted"),
])
def test_a_result_that_is_not_one_is_refused_naming_the_field(change: dict[str, Any], said: str) -> None:
    with pytest.raises(BadDataError, match="not a site result of protocol version 3") as error:
        parse_result(json.dumps({**GOOD_RESULT, **change}).encode(), "munich's answer")
    assert said in str(error.value) and str(error.value).startswith("munich's answer: ")


@pytest.mark.parametrize("data", [b"", b"null", b"[]", b"{", b"NaN", b"\x00\x01"])
def test_bytes_that_are_no_object_are_refused(data: bytes) -> None:
    with pytest.raises(BadDataError, match="not a site result"):
        parse_result(data)


@pytest.mark.parametrize(("figures", "said"), [
    ({"examples": 40, "accuracy": 7.0, "loss": 1.0}, "accuracy: Input should be less than or equal to 1"),
    ({"examples": 40, "accuracy": float("nan"), "loss": 1.0}, "accuracy: Input should be a finite number"),
    ({"examples": 40, "accuracy": -0.5, "loss": 1.0}, "accuracy: Input should be greater than or equal to 0"),
    ({"examples": 40, "accuracy": 0.5, "loss": float("-inf")}, "loss: Input should be a finite number"),
    ({"examples": 10**18, "accuracy": 0.5, "loss": 1.0}, "examples: Input should be less than or equal to"),
    ({"examples": 101, "accuracy": 0.5, "loss": 1.0}, "examples: claims 101 examples, more than the 100"),
    ({"examples": True, "accuracy": 0.5, "loss": 1.0}, "examples: Input should be a valid integer"),
    ({"examples": 40, "accuracy": "high", "loss": 1.0}, "accuracy: Input should be a valid number"),
    ({"examples": 40, "accuracy": 0.5}, "loss: Field required"),
    ({"examples": 40, "accuracy": 0.5, "loss": 1.0, "per_class": []}, "per_class: Extra inputs"),
])
def test_an_evaluation_outside_its_ranges_is_refused(figures: dict[str, Any], said: str) -> None:
    with pytest.raises(BadDataError, match=said):
        evaluation_output(figures, 100)
    assert evaluation_output({"examples": 100, "accuracy": 1, "loss": 0}, 100).accuracy == 1.0  # ints are numbers


@pytest.mark.parametrize(("output", "said"), [
    ({"num_examples": 10**9, "sha256": "a" * 64}, "claims 1000000000 examples, more than the 1000"),
    ({"num_examples": 0, "sha256": "a" * 64}, "num_examples: Input should be greater than or equal to 1"),
    ({"num_examples": 5, "sha256": "A" * 64}, "sha256: String should match pattern"),
    ({"num_examples": 5, "sha256": "a" * 64, "metrics": {"loss": float("nan")}}, "metrics.loss: Input should be"),
    ({"num_examples": 5, "sha256": "a" * 64, "metrics": {"a b": 1.0}}, "metrics.a b.[key]: String should match"),
    ({"num_examples": 5, "sha256": "a" * 64, "metrics": {f"m{i}": 1.0 for i in range(65)}},
     "metrics: Dictionary should have at most 64 items"),
])
def test_a_training_answer_that_claims_too_much_is_refused(output: dict[str, Any], said: str) -> None:
    with pytest.raises(BadDataError) as error:
        train_output(output, 1000, "munich")
    assert said in str(error.value)


def test_an_evaluation_file_is_parsed_within_its_bound() -> None:
    figures = {"examples": 4, "accuracy": 0.5, "loss": 1.0, "per_class_correct": [2, 0], "per_class_total": [2, 2],
               "round": 3, "split": "validation"}
    assert parse_evaluation(json.dumps(figures).encode(), 10).per_class_total == [2, 2]
    with pytest.raises(BadDataError, match="split: Input should be 'test' or 'validation'"):
        parse_evaluation(json.dumps({**figures, "split": "train"}).encode())
    assert len(json.dumps({**figures, "per_class_correct": [10**9] * 1000, "per_class_total": [10**9] * 1000})) \
        < EVALUATION_LIMIT  # the largest valid file fits its bound


def test_the_coordinators_record_of_accepted_scores_round_trips() -> None:
    record = ScoresRecord(round=3, sites={"munich": evaluation_output({"examples": 4, "accuracy": 0.5, "loss": 1.0})})
    assert parse_scores_record(record.encode()) == record
    with pytest.raises(BadDataError, match=r"sites\.munich\.accuracy"):
        parse_scores_record(b'{"round": 3, "sites": {"munich": {"examples": 4, "accuracy": 2, "loss": 1}}}')


def test_problems_are_cut_short() -> None:
    with pytest.raises(BadDataError) as error:
        parse_result(json.dumps({"task": 1, "site": 2, "state": 3, "exit_code": "x", "output": 4}).encode())
    assert "; and 2 more" in str(error.value)


def posted_task(**changes: Any) -> dict[str, Any]:
    """A valid task's JSON with ``changes`` (None removes a field), its digest made to match (the writer can)."""
    body = SiteTask(id="r0003-munich-a2", kind="train", round=3, site="munich", training="team/signs", total_rounds=5,
                    strategy="fedavg", architecture="tiny_cnn", global_key="round-0002/global.safetensors",
                    global_sha256="ab" * 32, deadline=1e9, attempt=2, train=TrainSettings()).to_json()
    body.pop("digest")
    body.update(changes)
    body = {k: v for k, v in body.items() if v is not None}
    return {**body, "digest": digest(body)}


def test_the_protocol_is_version_3_since_secure_rounds_are_site_tasks() -> None:
    assert PROTOCOL_VERSION == 3 and SiteTask(**{k: v for k, v in posted_task().items() if k != "digest"}).version == 3
    assert SiteResult("r0003-munich-a2", "munich", "succeeded").version == 3


@pytest.mark.parametrize(("version", "said"), [
    (2, "protocol version 2, this site speaks 3; the coordinator is older: upgrade the coordinator's operator and "
        "worker image (fedtrain run) to protocol version 3"),
    (4, "protocol version 4, this site speaks 3; this site is older: upgrade the site's operator and worker image "
        "(fedtrain site run) to the coordinator's release"),
    (None, "protocol version None, this site speaks 3; the coordinator is older"),
    ("3", "protocol version '3', this site speaks 3; the coordinator is older"),
])
def test_a_task_of_another_protocol_version_names_the_side_to_upgrade(version: object, said: str) -> None:
    """An older task lacks fields (version 1 had no attempt): the site says which side is behind, not which field."""
    old = {k: v for k, v in posted_task().items() if k not in ("digest", "attempt")}
    old["version"] = version
    with pytest.raises(BadDataError) as refused:
        parse_task({**old, "digest": digest(old)}, "munich's task.json")
    assert str(refused.value).startswith(f"munich's task.json: {said}")


@pytest.mark.parametrize(("version", "said"), [
    (2, "protocol version 2, this coordinator speaks 3; the site is older: upgrade the site's operator and worker "
        "image (fedtrain site run) to protocol version 3"),
    (4, "protocol version 4, this coordinator speaks 3; this coordinator is older: upgrade the coordinator's "
        "operator and worker image (fedtrain run) to the site's release"),
])
def test_an_answer_of_another_protocol_version_names_the_side_to_upgrade(version: int, said: str) -> None:
    with pytest.raises(BadDataError) as refused:
        parse_result(json.dumps({**GOOD_RESULT, "version": version}).encode(), "munich's answer")
    assert str(refused.value) == f"munich's answer: {said}"


def test_a_posted_task_round_trips_with_its_attempt() -> None:
    task = parse_task(posted_task())
    assert (task.id, task.attempt, task.train) == ("r0003-munich-a2", 2, TrainSettings())


@pytest.mark.parametrize(("change", "said"), [
    ({"id": "../../etc/passwd"}, "id: String should match pattern"),
    ({"id": "r0003-hamburg-a2"}, "id 'r0003-hamburg-a2' is not the id of a train task of round 3, site munich"),
    ({"id": "r0003-munich-a1"}, "attempt 2 ('r0003-munich-a2')"),
    ({"site": "../hamburg", "id": "r0003-../hamburg-a2"}, "site: String should match pattern"),
    ({"round": -1}, "round: Input should be greater than or equal to 1"),
    ({"round": 10**6}, "round: Input should be less than or equal to 10000"),
    ({"round": "3"}, "round: Input should be a valid integer"),
    ({"attempt": 0, "id": "r0003-munich-a0"}, "attempt: Input should be greater than or equal to 1"),
    ({"deadline": "soon"}, "deadline: Input should be a valid number"),
    ({"deadline": -5.0}, "deadline: Input should be greater than or equal to 0"),
    ({"global_key": "../hamburg/round-0002/update-a1.safetensors"}, "global_key: String should match pattern"),
    ({"global_sha256": "x"}, "global_sha256: String should match pattern"),
    ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than or equal to 1"),
    ({"train": {"learning_rate": 1e400}}, "train.learning_rate: Input should be a finite number"),
    ({"strategy": "fed avg"}, "strategy: String should match pattern"),
    ({"extra": 1}, "extra: Unexpected keyword argument"),
    ({"kind": None}, "kind: Field required"),
])
def test_a_task_whose_fields_are_not_what_they_must_be_is_refused_naming_the_field(change: dict[str, Any],
                                                                                   said: str) -> None:
    with pytest.raises(BadDataError, match=r"^task\.json: ") as refused:
        parse_task(posted_task(**change), "task.json")
    assert said in str(refused.value)


def test_a_key_with_digits_that_are_not_ascii_is_no_attempt() -> None:
    """``'²'.isdigit()`` holds and ``int('²')`` raises: a site may name its own files so."""
    layout = Layout(sites=frozenset({"evil"}))
    keys = ["sites/evil/round-0001/update-a².safetensors", "sites/evil/round-0001/update-a2.safetensors"]
    assert layout.update_attempts(keys, "evil", 1) == [2]
