"""The pipeline's launch step against the operator: create, wait, report; a retried step; a failed training."""

from __future__ import annotations

from typing import Any

import pytest

from fedtrain.kubeflow.steps import TrainingFailed, launch_on_cluster, pipeline_namespace, training_manifest
from fedtrain.spec import SpecError
from tests.operator.cluster import Sabotage
from tests.operator.conftest import NAMESPACE, Cluster, tiny_training

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]


def manifest(run: str, **spec: Any) -> dict[str, Any]:
    return training_manifest("signs", pipeline_namespace(), run, tiny_training(**spec)["spec"])


async def test_launch_waits_for_success_and_a_retried_step_finds_its_training(cluster: Cluster) -> None:
    await cluster.start_operator()
    lines: list[str] = []
    result = await launch_on_cluster(manifest("run-1"), timeout_s=240, poll_s=0.2, report=lines.append)
    assert (result.namespace, result.name) == (NAMESPACE, "signs")  # the namespace from the kubeconfig context
    assert [r["round"] for r in result.rounds] == [1, 2] and result.accuracy == result.rounds[-1]["accuracy"]
    assert lines[0] == f"created FederatedTraining {NAMESPACE}/signs" and "Succeeded" in lines[-1]
    again = await launch_on_cluster(manifest("run-1"), timeout_s=10, poll_s=0.2, report=lines.append)
    assert again == result and "earlier attempt of this run" in lines[-2]
    with pytest.raises(SpecError, match="belongs to another run; choose another training_name"):
        await launch_on_cluster(manifest("run-2"), timeout_s=10, poll_s=0.2)


async def test_launch_fails_the_step_with_the_trainings_reason(cluster: Cluster,
                                                               sabotage: dict[str, Sabotage]) -> None:
    sabotage["r0001-client"] = Sabotage(exit_code=2, message="no such data set")
    await cluster.start_operator()
    with pytest.raises(TrainingFailed, match=rf"FederatedTraining {NAMESPACE}/signs ended Failed \(.+\): .+"):
        await launch_on_cluster(manifest("run-1", clients={"count": 2, "maxRetries": 0}), timeout_s=240, poll_s=0.2)
