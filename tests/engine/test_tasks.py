"""Task command lines: what both executors run must parse with the worker's own parser, overrides included."""

from __future__ import annotations

from typing import Literal

import pytest

from fedtrain.contract.errors import BadInputError
from fedtrain.contract.sitetask import ExampleBounds
from fedtrain.engine.status import Task
from fedtrain.spec import parse_spec
from fedtrain.tasks import Placement, worker_arguments
from fedtrain.worker.cli import build_parser, client_attempts_of, example_bounds_of

SPEC = parse_spec({
    "rounds": 3, "seed": 4,
    "model": {"architecture": "mobilenet_v3_large", "pretrainedWeights": "/w/large.safetensors", "fineTune": False},
    "clients": {"list": [{"name": "munich", "training": {"localEpochs": 5, "learningRate": 0.1}},
                         {"name": "berlin"}]},
    "training": {"localEpochs": 2, "scheduler": "cosine"},
    "strategy": {"name": "fedprox", "parameters": {"mu": 0.05}, "maxNormRatio": 7},
    "mlflow": {"registeredModelName": "signs"},
})
WHERE = Placement("/store/ns/t-1234", "/store/ns/t-1234/data", "t", "ns", "uid-1", "http://mlflow:5000",
                  "/dev/termination-log")


def parsed(task: Task, clients: dict[str, int] | None = None):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(worker_arguments(task, SPEC, WHERE, clients))


def test_init_carries_model_partition_and_synthetic_data() -> None:
    args = parsed(Task("init-a1", "init"))
    assert args.command == "init" and args.client_names == "munich,berlin" and args.clients == 2
    assert args.architecture == "mobilenet_v3_large" and args.head_only and args.pretrained == "/w/large.safetensors"
    assert args.synthetic_per_class == 60 and args.synthetic_frames_per_track == 5 and args.seed == 4


@pytest.mark.parametrize(("client", "epochs", "rate"), [("munich", 5, 0.1), ("berlin", 2, 0.001)])
def test_train_applies_per_client_overrides_and_fedprox(client: str, epochs: int, rate: float) -> None:
    args = parsed(Task(f"r0002-{client}-a1", "train", 2, client))
    assert (args.command, args.round, args.client) == ("train", 2, client)
    assert args.epochs == epochs and args.lr == rate and args.scheduler == "cosine" and args.mu == 0.05


def test_aggregate_names_clients_quorum_and_parameters() -> None:
    args = parsed(Task("r0002-aggregate-a1", "aggregate", 2), {"munich": 1})
    assert args.clients == "munich" and args.min_updates == 2 and args.max_norm_ratio == 7
    assert args.param == ["mu=0.05"] and str(args.termination_log) == "/dev/termination-log"


def test_aggregate_and_finalize_carry_the_example_bounds_the_spec_declares() -> None:
    spec = parse_spec({"rounds": 2, "clients": {"maxExamples": 5000, "list": [
        {"name": "hq"}, {"name": "munich", "site": {}, "maxExamples": 1200}]}})
    for task in (Task("r0002-aggregate-a1", "aggregate", 2), Task("finalize-a1", "finalize", 2)):
        args = build_parser().parse_args(worker_arguments(task, spec, WHERE, {"hq": 1, "munich": 1}))
        assert example_bounds_of(args) == ExampleBounds(5000, (("munich", 1200),))
    assert spec.clients.max_examples_of("hq") == 5000 and spec.clients.max_examples_of("munich") == 1200
    assert parse_spec({"rounds": 1, "clients": {"count": 2}}).clients.max_examples_of("client-00") == 1_000_000


def test_aggregate_reads_each_update_of_the_attempt_that_succeeded() -> None:
    spec = parse_spec({"rounds": 2, "clients": {"list": [{"name": "hq"}, {"name": "munich", "site": {}}]}})
    args = build_parser().parse_args(worker_arguments(Task("r0002-aggregate-a1", "aggregate", 2), spec, WHERE,
                                                      {"hq": 2, "munich": 3}))
    assert args.clients == "hq,munich" and client_attempts_of(args) == (("hq", 2), ("munich", 3))
    args.client_attempt = ["munich=0"]
    with pytest.raises(BadInputError, match="--client-attempt 'munich=0': use CLIENT=N"):
        client_attempts_of(args)


def test_an_in_cluster_client_trains_under_its_tasks_attempt() -> None:
    spec = parse_spec({"rounds": 2, "clients": {"count": 2}})
    args = build_parser().parse_args(worker_arguments(Task("r0002-client-01-a3", "train", 2, "client-01", 3), spec,
                                                      WHERE))
    assert args.attempt == 3 and args.client == "client-01"


def test_fedprox_without_mu_trains_every_client_and_site_with_the_one_default() -> None:
    from fedtrain.contract.sitetask import FEDPROX_MU
    from fedtrain.sites.relay import train_settings
    from fedtrain.worker.strategies import make_strategy

    spec = parse_spec({"rounds": 2, "strategy": {"name": "fedprox"},
                       "clients": {"list": [{"name": "hq"}, {"name": "munich", "site": {}}]}})
    args = build_parser().parse_args(worker_arguments(Task("r0001-hq-a1", "train", 1, "hq"), spec, WHERE))
    assert args.mu == train_settings(spec, "munich").mu == make_strategy("fedprox", {}).client_options()["mu"] \
        == FEDPROX_MU


def test_finalize_tracks_with_lineage() -> None:
    args = parsed(Task("finalize-a1", "finalize", 3))
    assert args.tracking_uri == "http://mlflow:5000" and args.registered_model_name == "signs"
    assert (args.training, args.namespace, args.uid, args.strategy) == ("t", "ns", "uid-1", "fedprox")
    assert args.log_clients and '"rounds":3' in args.spec_json
    assert not args.no_promote  # the champion alias moves by default


def test_finalize_combines_and_gates_the_champion_as_the_spec_says() -> None:
    spec = parse_spec({"rounds": 2, "evaluation": {"central": False, "combine": "trimmed"}, "clients": {
        "minSuccessful": 2, "list": [{"name": "hq"}, {"name": "munich", "site": {}}, {"name": "hamburg", "site": {}},
                                     {"name": "berlin", "site": {"evaluate": False}}]}})
    args = build_parser().parse_args(worker_arguments(Task("finalize-a1", "finalize", 2), spec, WHERE))
    assert args.no_central and args.sites == "munich,hamburg"
    assert args.combine == "trimmed" and args.min_site_scores == 2


def test_finalize_leaves_the_champion_alias_when_asked() -> None:
    spec = SPEC.model_copy(update={"mlflow": SPEC.mlflow.model_copy(update={"promote_champion": False})})
    args = build_parser().parse_args(worker_arguments(Task("finalize-a1", "finalize", 3), spec, WHERE))
    assert args.no_promote and args.registered_model_name == "signs"


@pytest.mark.parametrize(("provided", "kind"), [(False, "train"), (True, "train"), (True, "keys"), (True, "unmask")])
def test_a_secure_clients_task_names_its_secret_file_and_whether_it_is_given(
        provided: bool, kind: Literal["train", "keys", "unmask"]) -> None:
    spec = parse_spec({"rounds": 1, "clients": {"count": 3},
                       "privacy": {"clipNorm": 5.0, "secureAggregation": {"threshold": 2}}})
    where = Placement("/store/ns/t-1234", "/data", "t", "ns", "uid-1", secrets_dir="/var/run/secure",
                      secrets_provided=provided)
    args = build_parser().parse_args(worker_arguments(Task("x0001-client-01-a1", kind, 1, "client-01"), spec, where))
    assert str(args.secret_file) == "/var/run/secure/client-01.key" and args.secret_provided is provided
    aggregate = build_parser().parse_args(worker_arguments(Task("r0001-aggregate-a1", "aggregate", 1), spec, where,
                                                           {"client-01": 1}))
    assert not hasattr(aggregate, "secret_file")  # the aggregation holds no client's secret
