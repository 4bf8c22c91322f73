"""The champion alias moves only to a better model on the same test set (sqlite-backed MLflow registry)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtrain.worker.tracking import Tracker, TrainingIdentity, flatten


@pytest.fixture
def tracker(tmp_path: Path) -> Tracker:
    identity = TrainingIdentity("t", "ns", "uid", "fedavg", {"rounds": 2})
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tests", identity, tmp_path / "artifacts")


def version(tracker: Tracker, accuracy: float, fingerprint: str) -> str:
    client = tracker.client
    if not client.search_registered_models("name = 'signs'"):
        client.create_registered_model("signs")
    created = client.create_model_version("signs", source="file:///nowhere")
    client.set_model_version_tag("signs", created.version, "accuracy", f"{accuracy}")
    client.set_model_version_tag("signs", created.version, "test_fingerprint", fingerprint)
    return str(created.version)


def champion(tracker: Tracker) -> str:
    return str(tracker.client.get_model_version_by_alias("signs", "champion").version)


def never(uri: str) -> float:
    raise AssertionError(f"{uri} should not need scoring: the fingerprints match")


def test_alias_moves_only_to_a_better_model_on_the_same_test_set(tracker: Tracker) -> None:
    first = version(tracker, 0.5, "same")
    assert tracker.promote("signs", first, 0.5, "same", never) and champion(tracker) == first
    worse = version(tracker, 0.4, "same")
    assert not tracker.promote("signs", worse, 0.4, "same", never) and champion(tracker) == first
    equal = version(tracker, 0.5, "same")
    assert not tracker.promote("signs", equal, 0.5, "same", never) and champion(tracker) == first
    better = version(tracker, 0.6, "same")
    assert tracker.promote("signs", better, 0.6, "same", never) and champion(tracker) == better


def test_a_champion_from_another_test_set_is_scored_on_this_one(tracker: Tracker) -> None:
    first = version(tracker, 0.9, "their-test-set")
    tracker.promote("signs", first, 0.9, "their-test-set", never)
    scored: list[str] = []

    def score(uri: str) -> float:
        scored.append(uri)
        return 0.3  # the old champion on our test set

    newer = version(tracker, 0.5, "our-test-set")
    assert tracker.promote("signs", newer, 0.5, "our-test-set", score)
    assert scored == [f"models:/signs/{first}"] and champion(tracker) == newer


def test_parent_run_is_found_again_not_duplicated(tracker: Tracker) -> None:
    run = tracker.parent_run()
    assert tracker.parent_run() == run
    assert tracker.client.get_run(run).data.params["rounds"] == "2"


def test_spec_flattens_to_params() -> None:
    assert flatten({"training": {"learningRate": 0.001}, "model": {"architecture": "tiny_cnn"}}) == {
        "training.learningRate": "0.001", "model.architecture": "tiny_cnn"}


def statement_parts(sql: str) -> tuple[str, ...]:
    """A CREATE statement's lines, sorted: MLflow's migrations write a table's constraints in an order
    that changes from one process to the next (two stores MLflow makes differ in it), which means nothing."""
    return tuple(sorted(line.strip().rstrip(",").strip() for line in sql.splitlines()))


def rows(database: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every table's rows and the schema, times and generated ids left out where they differ by nature."""
    import sqlite3

    connection = sqlite3.connect(database)
    try:
        tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        found: dict[str, list[tuple[object, ...]]] = {"schema": sorted(
            statement_parts(r[0] or "") for r in connection.execute("SELECT sql FROM sqlite_master"))}
        for table in tables:
            found[table] = sorted(connection.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
        found["experiments"] = [row[:4] for row in connection.execute(
            "SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments ORDER BY 1")]
        return found
    finally:
        connection.close()


def test_a_new_sqlite_store_seeded_from_the_template_is_the_store_mlflow_makes(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from fedtrain.worker.tracking import seed_sqlite_store

    templates = tmp_path / "cache"
    seeded, fresh = tmp_path / "seeded.db", tmp_path / "fresh.db"
    assert seed_sqlite_store(f"sqlite:///{seeded}", templates)
    assert len(list(templates.glob("mlflow-*-empty.db"))) == 1
    assert not seed_sqlite_store(f"sqlite:///{seeded}", templates)  # an existing store is never replaced
    assert not seed_sqlite_store("http://mlflow:5000", templates)
    for database in (seeded, fresh):
        uri = f"sqlite:///{database}"
        MlflowClient(uri, uri).create_experiment("tests", artifact_location=(tmp_path / "artifacts").as_uri())
    assert rows(seeded) == rows(fresh)
    assert rows(seeded)["experiments"][0][:2] == (0, "Default")  # made by MLflow on opening, with its location


def test_a_template_that_cannot_be_made_leaves_the_store_to_mlflow(tmp_path: Path) -> None:
    from fedtrain.worker.tracking import seed_sqlite_store

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert not seed_sqlite_store(f"sqlite:///{tmp_path / 'mlflow.db'}", blocked / "cache")
    assert not (tmp_path / "mlflow.db").exists()
