"""Prometheus metrics of the operator, served on ``/metrics`` (port 9090 by default).

Counted from what the controller sees change in a training's status, so a restarted operator does
not count a round twice: the counters are bumped only when the stored status gains the round.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
