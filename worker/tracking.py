"""MLflow tracking of a finished training: one parent run, metrics per round, client runs, the model.

Everything here is idempotent, so a finalize that is run again (after MLflow was down, say)
completes what is missing rather than logging twice: the parent run is found by its
``fedtrain.key`` tag, metrics are logged only into runs that have none, and a model version is
registered only if the run has none yet. Each step retries on its own; a step that still fails
is named in ``not_logged`` and training results stay valid without it.

The alias ``champion`` moves to the new version only if it beats the current champion on the same
test set: compared through the ``test_fingerprint`` tag when both were scored on one test set,
otherwise by scoring the champion on this training's test set. A training without a central test
set is scored by its sites (fingerprint ``sites:<names>``); it cannot score an old champion, so a
champion from another test set is kept, and the new version's ``champion_decision`` tag says why.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
CHAMPION = "champion"
RETRY_DELAYS = (1.0, 3.0)

# MLflow's own HTTP client retries for minutes by default; one short try per attempt here.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
SQLITE = "sqlite:///"


def template_directory() -> Path:
    """Where the empty sqlite store of each MLflow version is kept: ``$XDG_CACHE_HOME/fedtrain`` (``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedtrain"


def seed_sqlite_store(uri: str, templates: Path | None = None) -> bool:
    """Start a new sqlite store as a copy of an empty one, made once per MLflow version; True if it was copied.

    MLflow creates a store by running every one of its schema migrations (about 70), which costs
    a finalize 0.8 s on a quiet machine and many seconds on a busy one. The template is such a
    store with the default experiment removed: MLflow creates that one when it opens the copy, with
    this store's artifact location and time, so the copy is what MLflow would have made. Anything
    that fails here (no cache directory, a read-only home) leaves the store to MLflow, as before.
    """
    if not uri.startswith(SQLITE):
        return False
    database = Path(uri.removeprefix(SQLITE))
    if database.exists():
        return False
    try:
        import mlflow

        folder = templates or template_directory()
        template = folder / f"mlflow-{mlflow.__version__}-empty.db"
        if not template.exists():
            folder.mkdir(parents=True, exist_ok=True)
            _make_template(template)
        copy = database.with_name(f".{database.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(template, copy)
            os.replace(copy, database)  # atomic: MLflow never sees half a file
        finally:
            copy.unlink(missing_ok=True)  # gone already when it was moved into place
    except (OSError, sqlite3.Error, ImportError):
        return False
    return True


def _make_template(template: Path) -> None:
    """An empty store of this MLflow version without its default experiment, written atomically to ``template``."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    with tempfile.TemporaryDirectory(dir=template.parent) as scratch:
        database = Path(scratch) / "store.db"
        store = SqlAlchemyStore(f"{SQLITE}{database}", Path(scratch).as_uri())  # type: ignore[no-untyped-call]
        store.engine.dispose()
        connection = sqlite3.connect(database)
        with contextlib.closing(connection), connection:
            connection.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
            connection.execute("DELETE FROM experiments WHERE experiment_id = 0")
        os.replace(database, template)


def retried(step: Callable[..., T]) -> Callable[..., T]:
    """Retry a tracking step after a short delay, twice, before giving up with its last error."""

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        for delay in RETRY_DELAYS:
            try:
                return step(*args, **kwargs)
            except Exception:  # MLflow raises many kinds; the last attempt reports it
                time.sleep(delay)
        return step(*args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class TrainingIdentity:
    """Which training this is, for tags and lineage."""

    training: str
    namespace: str
    uid: str
    strategy: str
    spec: dict[str, Any]

    @property
    def key(self) -> str:
        """Unique per training: namespace/name/uid."""
        return f"{self.namespace}/{self.training}/{self.uid}"


@dataclass
class TrackingReport:
    """What was logged, and what was not (with why)."""

    run_id: str | None = None
    model_uri: str | None = None
    model_version: str | None = None
    champion: bool = False
    champion_reason: str | None = None
    not_logged: dict[str, str] = field(default_factory=dict)

    @property
    def error(self) -> str | None:
        """One line for status and summaries, or None when everything was logged."""
        if not self.not_logged:
            return None
        return "; ".join(f"{what}: {why}" for what, why in self.not_logged.items())[:500]


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested spec -> MLflow params (``training.learningRate`` = ``0.001``)."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(data)[:500] if not isinstance(data, str) else data[:500]}


class Tracker:
    """Talks to one MLflow tracking server (or sqlite store) for one training."""

    def __init__(self, uri: str, experiment: str, identity: TrainingIdentity, artifact_root: Path | None) -> None:
        seed_sqlite_store(uri)
        import mlflow
        from mlflow.tracking import MlflowClient

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        self.client = MlflowClient(uri, uri)
        self.identity = identity
        self.experiment_id = self._experiment(experiment, artifact_root)

    @retried
    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        location = artifact_root.resolve().as_uri() if artifact_root is not None else None
        return str(self.client.create_experiment(name, artifact_location=location))

    @retried
    def parent_run(self) -> str:
        """The training's run, created with params and lineage tags if it does not exist yet."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`fedtrain.key` = '{self.identity.key}'",
                                       max_results=1)
        if runs:
            return str(runs[0].info.run_id)
        identity = self.identity
        tags = {"fedtrain.key": identity.key, "fedtrain.training": identity.training,
                "fedtrain.namespace": identity.namespace, "fedtrain.uid": identity.uid,
                "fedtrain.strategy": identity.strategy,
                "fedtrain.partition": str(identity.spec.get("partition", {}).get("scheme"))}
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=identity.training)
        params = flatten(identity.spec)
        items = list(params.items())
        from mlflow.entities import Param

        for start in range(0, len(items), 90):
            self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[start:start + 90]])
        return str(run.info.run_id)

    @retried
    def round_metrics(self, run_id: str, rounds: list[dict[str, Any]],
                      extra: dict[int, dict[str, float]] | None = None) -> None:
        """Per-round metrics with ``step=round``, once; ``extra``: more figures by round (the sites' scores)."""
        from mlflow.entities import Metric

        if self.client.get_run(run_id).data.metrics:
            return
        metrics = []
        stamp = int(time.time() * 1000)  # logged at the end of training; the step says which round
        for result in rounds:
            for key in ("accuracy", "loss", "num_examples", "seconds"):
                if isinstance(result.get(key), int | float):
                    metrics.append(Metric(key, float(result[key]), stamp, int(result["round"])))
            metrics.append(Metric("accepted_updates", float(len(result.get("accepted", []))), stamp, result["round"]))
            metrics.append(Metric("rejected_updates", float(len(result.get("rejected", {}))), stamp, result["round"]))
        for round_number, figures in sorted((extra or {}).items()):
            metrics += [Metric(key, float(value), stamp, round_number) for key, value in sorted(figures.items())]
        for start in range(0, len(metrics), 900):
            self.client.log_batch(run_id, metrics=metrics[start:start + 900])

    @retried
    def client_runs(self, parent: str, clients: dict[str, list[tuple[int, dict[str, float]]]]) -> None:
        """One nested run per client with its local metrics per round."""
        from mlflow.entities import Metric

        existing = {r.data.tags.get("fedtrain.client") for r in self.client.search_runs(
            [self.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000)}
        for client, history in sorted(clients.items()):
            if client in existing:
                continue
            tags = {"mlflow.parentRunId": parent, "fedtrain.client": client,
                    "fedtrain.key": f"{self.identity.key}/{client}"}
            run = self.client.create_run(self.experiment_id, run_name=client, tags=tags)
            stamp = int(time.time() * 1000)
            metrics = [Metric(k, float(v), stamp, round_number) for round_number, values in history
                       for k, v in values.items() if isinstance(v, int | float)]
            for start in range(0, len(metrics), 900):
                self.client.log_batch(run.info.run_id, metrics=metrics[start:start + 900])
            self.client.set_terminated(run.info.run_id)

    @retried
    def artifacts(self, run_id: str, paths: list[Path]) -> None:
        """Plots and result files."""
        for path in paths:
            self.client.log_artifact(run_id, str(path), artifact_path="plots" if path.suffix == ".png" else "results")

    @retried
    def model(self, run_id: str, model: Any, example: Any, name: str | None, tags: dict[str, str],
              pip_requirements: list[str]) -> tuple[str, str | None]:
        """Log the model with signature and input example; register a version under ``name`` once."""
        if name:
            versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
            if versions:
                existing = str(versions[0].version)
                return f"models:/{name}/{existing}", existing
        # validate_serving_input=False: MLflow would load the model it has just exported back and run the
        # example through it once more (it already ran it to infer the signature): 0.3 to 0.7 s of finalize.
        with self.mlflow.start_run(run_id=run_id):
            info = self.mlflow.pytorch.log_model(model, name="model", input_example=example,
                                                 pip_requirements=pip_requirements, registered_model_name=name,
                                                 validate_serving_input=False)
        if not name:
            return info.model_uri, None
        version = str(info.registered_model_version)
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)
        return f"models:/{name}/{version}", version

    @retried
    def promote(self, name: str, version: str, accuracy: float, fingerprint: str,
                score_champion: Callable[[str], float]) -> bool:
        """Move ``champion`` to ``version`` if it beats the current champion on the same test set."""
        return promote_champion(self.client, name, version, accuracy, fingerprint, score_champion)

    @retried
    def decide_champion(self, name: str, version: str, accuracy: float, fingerprint: str,
                        score_champion: Callable[[str], float] | None) -> tuple[bool, str]:
        """`promote`, with the reason, which is also tagged on ``version`` (``champion_decision``)."""
        promoted, reason = champion_decision(self.client, name, version, accuracy, fingerprint, score_champion)
        self.client.set_model_version_tag(name, version, "champion_decision", reason[:500])
        return promoted, reason

    @retried
    def finish(self, run_id: str) -> None:
        """Mark the parent run finished."""
        self.client.set_terminated(run_id)


def promote_champion(client: Any, name: str, version: str, accuracy: float, fingerprint: str,
                     score_champion: Callable[[str], float] | None) -> bool:
    """Move ``champion`` to ``version`` if it beats the current champion on the same test set.

    The champion's accuracy comes from its tags when it was scored on the same test set
    (``test_fingerprint``), else ``score_champion`` scores it on this one. True when ``version``
    is (now) the champion. See `champion_decision` for the reason.
    """
    return champion_decision(client, name, version, accuracy, fingerprint, score_champion)[0]


def champion_decision(client: Any, name: str, version: str, accuracy: float, fingerprint: str,
                      score_champion: Callable[[str], float] | None) -> tuple[bool, str]:
    """`promote_champion`, saying why.

    ``score_champion`` None: this test set cannot score another model (the sites' scores reach
    the coordinator, their data does not), so a champion scored on another test set stays.
    """
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:
        current = None
    if current is not None and str(current.version) == version:
        return True, f"version {version} is the champion already"
    if current is not None:
        tags = current.tags or {}
        if tags.get("test_fingerprint") == fingerprint and "accuracy" in tags:
            champion_accuracy = float(tags["accuracy"])
        elif score_champion is None:
            return False, (f"kept the champion (version {current.version}): it was scored on "
                           f"{tags.get('test_fingerprint')!r}, this version on {fingerprint!r}, and there is no "
                           "test set here to score the champion on")
        else:
            champion_accuracy = score_champion(f"models:/{name}/{current.version}")
        if accuracy <= champion_accuracy:
            return False, (f"kept the champion (version {current.version}): {champion_accuracy:.4f} on the same "
                           f"test set, this version {accuracy:.4f}")
        why = f"beats the champion (version {current.version}): {accuracy:.4f} > {champion_accuracy:.4f}"
    else:
        why = "there was no champion"
    client.set_registered_model_alias(name, CHAMPION, version)
    return True, why
