"""The round engine, shared by the operator and the local runner: pure decisions over status and observations."""

from fedtrain.engine.engine import decide, fail, select_clients, task_id
from fedtrain.engine.status import (
    Cancel,
    Decision,
    Event,
    Launch,
    Observation,
    Task,
    TrainingStatus,
)

__all__ = ["Cancel", "Decision", "Event", "Launch", "Observation", "Task", "TrainingStatus", "decide", "fail",
           "select_clients", "task_id"]
