"""Prometheus metrics of the operator, served on ``/metrics`` (port 9090 by default).

Counted from what the controller sees change in a training's status, so a restarted operator does
not count a round twice: the counters are bumped only when the stored status gains the round.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prometheus_client import Counter, Histogram

from fedtrain.engine.engine import cause
from fedtrain.engine.status import FINISHED, TrainingStatus
from fedtrain.operator.jobs import LABEL_TASK, Owner

ROUNDS = Counter("fedtrain_rounds_total", "Federated rounds completed (aggregated)", ["namespace", "training"])
ROUND_SECONDS = Histogram("fedtrain_round_duration_seconds", "Wall time of a round, first client start to aggregate",
                          buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf")))
CLIENT_FAILURES = Counter("fedtrain_client_failures_total", "Client training tasks that failed or were dropped",
                          ["namespace", "training", "reason"])
AGGREGATION_SECONDS = Histogram("fedtrain_aggregation_duration_seconds", "Run time of an aggregation Job",
                                buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, float("inf")))
TRAININGS_FINISHED = Counter("fedtrain_trainings_finished_total", "Trainings that reached Succeeded or Failed",
                             ["namespace", "phase"])
JOBS_CREATED = Counter("fedtrain_jobs_created_total", "Worker Jobs created", ["kind"])


def _timestamp(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def count(owner: Owner, before: TrainingStatus, after: TrainingStatus, jobs: list[dict[str, Any]]) -> None:
    """Count what the stored status gained: finished rounds, failed clients, the end of the training."""
    for record in after.rounds:
        previous = before.round(record.round)
        if record.finished_at is not None and (previous is None or previous.finished_at is None):
            ROUNDS.labels(owner.namespace, owner.name).inc()
            if record.started_at is not None:
                ROUND_SECONDS.observe(record.finished_at - record.started_at)
            _observe_aggregation(jobs, record.round)
        for client, task in record.clients.items():
            was = previous.clients.get(client) if previous else None
            if task.state in ("failed", "dropped") and (was is None or was.state != task.state):
                CLIENT_FAILURES.labels(owner.namespace, owner.name, cause(task) or task.state).inc()
    if after.phase in FINISHED and before.phase not in FINISHED:
        TRAININGS_FINISHED.labels(owner.namespace, after.phase).inc()


def _observe_aggregation(jobs: list[dict[str, Any]], round_number: int) -> None:
    for job in jobs:
        job_labels = job["metadata"].get("labels") or {}
        if job_labels.get(LABEL_TASK) == "aggregate" and job_labels.get("fedtrain.io/round") == str(round_number):
            start = _timestamp(job.get("status", {}).get("startTime"))
            end = _timestamp(job.get("status", {}).get("completionTime"))
            if start is not None and end is not None:
                AGGREGATION_SECONDS.observe(end - start)
