"""Learning quality: federated training against central training on the same data, model and epochs.

Usage: python bench/learning_quality.py [--rows iid,dirichlet,poisoned] [--seeds 3] [--per-class 60]
       [--rounds 40] [--local-epochs 2] [--pretrain-epochs 0] [--clients 10] [--processes 2] [--out results.json]

Everything runs with the worker's own functions, as the round tasks call them: `partition_samples`
deals the training split by track, `train_local` trains each client from the global weights,
`save_weights` writes its update with its sidecar, and the registered strategy aggregates an
`UpdateSet` of those files (with the default norm-outlier check). Central training is one
`train_local` over the whole training split for rounds x local epochs: the same model, data,
optimiser, batch size and number of passes over the data.

Every run is a learning curve: the global model is scored after every round, central training
after every ``--local-epochs`` epochs of its one run (the optimiser's state kept), so each round's
figure is compared with central training after the same number of epochs. The table's figure is
the last point; the curve shows how many epochs the federation needs to come level. Runs start
from random weights (``--pretrain-epochs N``: from a model trained N epochs on another synthetic
set). Each seed changes the initial weights, the partition and every client's shuffling; the data
set is the same for all. ``--processes`` runs that many configurations at once, one torch thread
each.

Rows (each with its baseline measured in the same run):
- ``iid``: FedAvg with 4 and with ``--clients`` clients, IID, / central.
- ``dirichlet``: FedAvg, FedProx, FedAdam, FedYogi under Dirichlet(0.3) label skew, / central.
- ``poisoned``: each robust strategy with 20% of the clients misbehaving, / the same strategy
  without an attack. Two attacks: ``signflip`` (the update is reversed and scaled: the client sends
  ``w - s * (w_client - w)``) and ``labelflip`` (the client trains on labels ``42 - y``).
  FedAvg under the same attacks is measured for reference.

Misbehaving clients exist only here: the attack is applied to a client's data before it trains or
to its update file's weights before aggregation, never through a spec field a user could set.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from fedtrain.contract.storage import DirectoryStore
from fedtrain.worker.data.gtsrb import NUM_CLASSES, load_tree
from fedtrain.worker.data.images import load_samples
from fedtrain.worker.data.partition import PartitionConfig, partition_samples
from fedtrain.worker.data.synth import SynthConfig, generate
from fedtrain.worker.models import ModelConfig, build_model
from fedtrain.worker.strategies import UpdateFile, UpdateSet, make_strategy
from fedtrain.worker.training import TrainConfig, evaluate, load_numpy_state, state_to_numpy, train_local
from fedtrain.worker.weights import Weights, save_weights

Images = NDArray[np.uint8]
Labels = NDArray[np.int64]


@dataclass(frozen=True)
class Setup:
    """What every run of the table shares."""

    rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    image_size: int
    attack_scale: float
    workdir: Path
    start: Weights | None = None  # a warm start every run begins from (None: random initial weights)


@dataclass(frozen=True)
class Data:
    """The decoded training and test splits, and which row of the arrays each sample id is."""

    train_x: Images
    train_y: Labels
    test_x: Images
    test_y: Labels
    samples: tuple[Any, ...]
    row: dict[str, int]


@dataclass(frozen=True)
class Federation:
    """One configuration of a row: clients, partition, strategy, and who misbehaves how."""

    label: str
    clients: int
    strategy: str = "fedavg"
    parameters: dict[str, Any] = field(default_factory=dict)
    scheme: str = "iid"
    alpha: float = 0.5
    attack: str | None = None
    poisoned: int = 0


# --- misbehaving clients --------------------------------------------------------------------------


def flip_labels(labels: Labels) -> Labels:
    """Label flipping: every class is taught as its mirror, ``42 - y``."""
    return (NUM_CLASSES - 1 - labels).astype(np.int64)


def reverse_update(trained: Weights, current: Weights, scale: float) -> Weights:
    """Sign flipping and scaling: the update points ``scale`` times as far the other way.

    Integer tensors (BatchNorm's batch counters) are left as trained: the strategies do not average them.
    """
    return {name: (current[name] - scale * (array - current[name])).astype(array.dtype)
            if np.issubdtype(array.dtype, np.floating) else array for name, array in trained.items()}


# --- one run ------------------------------------------------------------------------------------


def new_model(setup: Setup, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig("tiny_cnn", NUM_CLASSES, setup.image_size))
    if setup.start is not None:
        load_numpy_state(model, setup.start)
    return model


def warm_start(args: argparse.Namespace, setup: Setup, test_x: Images, test_y: Labels) -> Weights:
    """Weights trained centrally on another synthetic set (another seed: other scenes, same classes).

    Federations of a few hundred images per client barely leave chance level in the rounds a
    2-core machine can afford, and a robust strategy cannot be judged on a model that has learnt
    nothing. Starting every run (central ones too) from the same partly trained model, as
    federations often start from a pretrained one, puts the comparisons where the models work.
    """
    root = args.data.with_name(args.data.name + "-pretrain")
    if not (root / "Final_Training").exists():
        generate(root, SynthConfig(args.per_class, 0, args.frames_per_track, seed=args.data_seed + 1000))
    tree = load_tree(root, need_test=False)
    images, labels = load_samples(tree, list(tree.train), args.image_size, True)
    model = new_model(setup, 0)
    train_local(model, images, labels, train_config(setup, args.pretrain_epochs, 0))
    accuracy = evaluate(model, test_x, test_y, NUM_CLASSES).accuracy
    print(f"warm start: {args.pretrain_epochs} epochs on {len(labels)} images of another synthetic set "
          f"(data seed {args.data_seed + 1000}); test accuracy {accuracy:.3f}", flush=True)
    return state_to_numpy(model)


def train_config(setup: Setup, epochs: int, seed: int, mu: float = 0.0) -> TrainConfig:
    return TrainConfig(local_epochs=epochs, batch_size=setup.batch_size, optimizer="adam",
                       learning_rate=setup.learning_rate, mu=mu, seed=seed)


Curve = list[float]  # test accuracy after each round (central: after each round's worth of epochs)


def central(data: Data, setup: Setup, seed: int) -> Curve:
    """One model trained on all the training data for rounds x local epochs, scored every local-epochs epochs."""
    model = new_model(setup, seed)
    curve: Curve = []

    def score(epoch: int) -> None:
        if epoch % setup.local_epochs == 0:
            curve.append(evaluate(model, data.test_x, data.test_y, NUM_CLASSES).accuracy)

    train_local(model, data.train_x, data.train_y, train_config(setup, setup.rounds * setup.local_epochs, seed),
                after_epoch=score)
    return curve


def federate(data: Data, setup: Setup, federation: Federation, seed: int) -> Curve:
    """The global model's test accuracy after each of ``setup.rounds`` rounds of ``federation``."""
    partition = partition_samples(data.samples, PartitionConfig(federation.scheme, federation.clients,
                                                                federation.alpha, seed), NUM_CLASSES)
    names = sorted(partition.clients)
    shards = {name: np.array([data.row[i] for i in partition.clients[name]], dtype=np.int64) for name in names}
    poisoned = set(names[:federation.poisoned])
    strategy = make_strategy(federation.strategy, federation.parameters)
    mu = float(strategy.client_options().get("mu", 0.0))
    model = new_model(setup, seed)
    current = state_to_numpy(model)
    state: Weights = {}
    store = DirectoryStore(Path(tempfile.mkdtemp(dir=setup.workdir)))
    curve: Curve = []
    for round_number in range(1, setup.rounds + 1):
        files = []
        for number, name in enumerate(names):
            images, labels = data.train_x[shards[name]], data.train_y[shards[name]]
            if name in poisoned and federation.attack == "labelflip":
                labels = flip_labels(labels)
            load_numpy_state(model, current)
            config = train_config(setup, setup.local_epochs, seed * 100_000 + round_number * 100 + number, mu)
            result = train_local(model, images, labels, config)
            trained = state_to_numpy(model)
            if name in poisoned and federation.attack == "signflip":
                trained = reverse_update(trained, current, setup.attack_scale)
            key = f"round-{round_number:04d}/{name}.safetensors"
            save_weights(store, key, trained, {"num_examples": result.num_examples})
            files.append(UpdateFile(name, store, key))
        outcome = strategy.aggregate(current, UpdateSet(current, files), state)
        current, state = outcome.weights, outcome.state
        shutil.rmtree(store.root / f"round-{round_number:04d}", ignore_errors=True)
        load_numpy_state(model, current)
        curve.append(evaluate(model, data.test_x, data.test_y, NUM_CLASSES).accuracy)
    return curve


# --- the table ----------------------------------------------------------------------------------


DIRICHLET_STRATEGIES: list[tuple[str, dict[str, Any]]] = [  # the server optimisers at their default step
    ("fedavg", {}), ("fedprox", {"mu": 0.01}), ("fedadam", {}), ("fedyogi", {})]


def rows(selected: list[str], clients: int) -> dict[str, list[tuple[Federation, Federation | None]]]:
    """Each row's configurations, with the federation it is divided by (None: central training)."""
    attackers = round(0.2 * clients)
    robust: list[tuple[str, dict[str, Any]]] = [("fedmedian", {}), ("trimmedmean", {"beta": attackers / clients}),
              ("krum", {"f": attackers}), ("multikrum", {"f": attackers, "m": clients - 2 * attackers})]
    table: dict[str, list[tuple[Federation, Federation | None]]] = {
        "iid": [(Federation(f"fedavg iid {n} clients", n), None) for n in sorted({4, clients})],
        "dirichlet": [(Federation(f"{name} {parameters or ''} dirichlet 0.3, {clients} clients", clients, name,
                                  parameters, "dirichlet", 0.3), None)
                      for name, parameters in DIRICHLET_STRATEGIES],
        "poisoned": [],
    }
    for name, parameters in [*robust, ("fedavg", {})]:  # FedAvg last: the reference that shows the attack bites
        clean = Federation(f"{name} {parameters or ''} no attack", clients, name, parameters)
        if name == "fedavg":
            clean = Federation(f"fedavg iid {clients} clients", clients)  # the iid row's run: not run twice
        for attack in ("signflip", "labelflip"):
            table["poisoned"].append((Federation(f"{name} {parameters or ''} {attack} {attackers}/{clients}",
                                                 clients, name, parameters, attack=attack, poisoned=attackers),
                                      clean))
    return {name: table[name] for name in selected}


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


# --- running the runs, several at once --------------------------------------------------------------

_SHARED: tuple[Data, Setup] | None = None  # set before the pool forks: every process reads the same arrays


def _run(job: tuple[Federation | None, int]) -> tuple[Curve, float]:
    """One run (central when the federation is None), in a pool process: its curve and its seconds."""
    assert _SHARED is not None
    data, setup = _SHARED
    federation, seed = job
    started = time.perf_counter()
    curve = central(data, setup, seed) if federation is None else federate(data, setup, federation, seed)
    return curve, time.perf_counter() - started


Curves = dict[str, dict[int, Curve]]  # label -> seed -> curve


def label_of(configuration: Federation | None) -> str:
    """A run's name in the table and in the ``--done`` file (None: central training)."""
    return "central" if configuration is None else configuration.label


def finished(done: Path | None) -> Curves:
    """The runs recorded in ``done`` (JSON lines), by label and seed."""
    curves: Curves = {}
    if done is not None and done.exists():
        for line in done.read_text().splitlines():
            record = json.loads(line)
            curves.setdefault(record["label"], {})[record["seed"]] = record["curve"]
    return curves


def run_all(configurations: list[Federation | None], seeds: list[int], processes: int, done: Path | None) -> Curves:
    """Every configuration's curve for every seed, keyed by label (None: "central"), in the given order.

    Each finished run is appended to ``done`` (JSON lines) and one found there is not run again: a long
    table survives an interruption, and a second invocation with more rows reuses the first one's runs.
    Only ``done`` files of the same settings may be reused (the caller names one per setting).
    """
    curves = finished(done)
    jobs = [(configuration, seed) for configuration in configurations for seed in seeds
            if seed not in curves.get(label_of(configuration), {})]
    context = multiprocessing.get_context("fork")
    with context.Pool(processes, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for (configuration, seed), (curve, seconds) in zip(jobs, pool.imap(_run, jobs), strict=True):
            label = label_of(configuration)
            curves.setdefault(label, {})[seed] = curve
            print(f"  {label}, seed {seed}: final {curve[-1]:.3f}, best {max(curve):.3f} ({seconds:.0f} s)", flush=True)
            if done is not None:
                with done.open("a") as file:
                    file.write(json.dumps({"label": label, "seed": seed, "curve": curve}) + "\n")
    return curves


def ratio_curve(curves: list[Curve], baselines: list[Curve]) -> list[list[float]]:
    """Per round, the ratio of each seed's accuracy to its baseline's at the same round."""
    return [[c[r] / b[r] for c, b in zip(curves, baselines, strict=True)] for r in range(len(curves[0]))]


def first_level(ratios: list[list[float]], goal: float) -> int | None:
    """The first round from which the mean ratio stays at or above ``goal`` (None: never)."""
    means = [statistics.mean(r) for r in ratios]
    return next((r + 1 for r in range(len(means)) if all(m >= goal for m in means[r:])), None)


def load_data(args: argparse.Namespace) -> Data:
    root = args.data
    if not (root / "Final_Training").exists():
        generate(root, SynthConfig(args.per_class, args.test_per_class, args.frames_per_track, seed=args.data_seed))
    tree = load_tree(root)
    train_x, train_y = load_samples(tree, list(tree.train), args.image_size, True)
    test_x, test_y = load_samples(tree, list(tree.test), args.image_size, True)
    return Data(train_x, train_y, test_x, test_y, tree.train, {s.sample_id: i for i, s in enumerate(tree.train)})


GOALS = {"iid": 0.98, "dirichlet": 0.95, "poisoned": 0.97}
TAIL = 3  # rounds averaged for the smoothed figure: a constant learning rate leaves the last round noisy


def report(table: dict[str, list[tuple[Federation, Federation | None]]], curves: Curves) -> list[dict[str, Any]]:
    """Print each row's ratios over the seeds both sides have (a table cut short reports what ran)."""
    results: list[dict[str, Any]] = []
    for row, pairs in table.items():
        print(f"{row}:")
        for federation, reference in pairs:
            base_label = label_of(reference)
            seeds = sorted(set(curves.get(federation.label, {})) & set(curves.get(base_label, {})))
            if not seeds:
                print(f"  => {federation.label}: not run")
                continue
            runs = [curves[federation.label][seed] for seed in seeds]
            bases = [curves[base_label][seed] for seed in seeds]
            ratios = ratio_curve(runs, bases)
            tails = [statistics.mean(r[-TAIL:]) / statistics.mean(b[-TAIL:]) for r, b in zip(runs, bases, strict=True)]
            level = first_level(ratios, GOALS[row])
            rounds = len(runs[0])
            print(f"  => {federation.label} / {base_label}, seeds {seeds}: ratio {spread(ratios[-1])}, last "
                  f"{TAIL} rounds {spread(tails)} (accuracy {spread([r[-1] for r in runs])} / "
                  f"{spread([b[-1] for b in bases])}); mean ratio >= {GOALS[row]} from round "
                  f"{level if level else 'never'}; mean ratio by quarter: "
                  + ", ".join(f"r{q}: {statistics.mean(ratios[q - 1]):.2f}"
                              for q in sorted({max(1, rounds * k // 4) for k in (1, 2, 3, 4)})), flush=True)
            results.append({"row": row, "label": federation.label, "baseline": base_label, "seeds": seeds,
                            "curves": runs, "baseline_curves": bases, "final_ratios": ratios[-1],
                            "tail_ratios": tails, "level_round": level})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="iid,dirichlet,poisoned")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--attack-scale", type=float, default=4.0)
    parser.add_argument("--per-class", type=int, default=SynthConfig.per_class)
    parser.add_argument("--test-per-class", type=int, default=SynthConfig.test_per_class)
    parser.add_argument("--frames-per-track", type=int, default=SynthConfig.frames_per_track)
    parser.add_argument("--data-seed", type=int, default=5)
    parser.add_argument("--pretrain-epochs", type=int, default=0, help="warm start; 0: random initial weights")
    parser.add_argument("--processes", type=int, default=2, help="runs at once, one torch thread each")
    parser.add_argument("--data", type=Path, default=Path("/tmp/fedtrain-learning-quality"))
    parser.add_argument("--out", type=Path, default=None, help="write every curve as JSON here")
    parser.add_argument("--done", type=Path, default=None,
                        help="JSON lines of finished runs, appended to and reused (one file per setting)")
    parser.add_argument("--report", action="store_true", help="only report the runs in --done, run nothing")
    parser.add_argument("--strategies", default="", help="only these strategies' configurations (comma-separated)")
    args = parser.parse_args()
    table = rows(args.rows.split(","), args.clients)
    if args.strategies:
        chosen = set(args.strategies.split(","))
        table = {row: [(f, r) for f, r in pairs if f.strategy in chosen] for row, pairs in table.items()}
    if args.report:
        report(table, finished(args.done))
        return
    torch.set_num_threads(1)  # tiny batches: a second thread costs more than it gives on a shared machine
    data = load_data(args)
    workdir = Path(tempfile.mkdtemp(prefix="fedtrain-lq-"))
    setup = Setup(args.rounds, args.local_epochs, args.batch_size, args.lr, args.image_size, args.attack_scale, workdir)
    if args.pretrain_epochs > 0:
        setup = replace(setup, start=warm_start(args, setup, data.test_x, data.test_y))
    seeds = list(range(1, args.seeds + 1))
    print(f"tiny_cnn {args.image_size}px, {len(data.train_y)} train / {len(data.test_y)} test images, "
          f"{args.rounds} rounds x {args.local_epochs} local epochs, Adam lr {args.lr}, seeds {seeds}", flush=True)
    configurations: list[Federation | None] = [None]
    for pairs in table.values():
        for federation, reference in pairs:
            configurations += [c for c in (reference, federation) if c is not None and c not in configurations]
    global _SHARED
    _SHARED = (data, setup)
    started = time.perf_counter()
    curves = run_all(configurations, seeds, args.processes, args.done)
    results = report(table, curves)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=1))


if __name__ == "__main__":
    main()
