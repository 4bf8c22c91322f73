"""``fedtrain-worker``: the command line every Job (and every local subprocess) runs.

Exit codes tell the cause of a failure (see `errors`): 2 bad input, 3 bad data, 4 rejected
updates, 5 a non-finite model, 6 a secure round's sum not recovered, 70 internal error, 75 temporary
storage failure (run the task again later), 77 refused by the site.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

from fedtrain.contract.errors import EXIT_INTERNAL, EXIT_OK, BadInputError, WorkerError
from fedtrain.contract.layout import Layout, is_number
from fedtrain.contract.sitetask import (
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_MAX_WEIGHT_OVER_MEDIAN,
    EXAMPLES_LIMIT,
    MAX_ATTEMPT,
    REASON_KEPT,
    Combination,
    ExampleBounds,
)
from fedtrain.worker.data.synth import SynthConfig
from fedtrain.worker.secure import (
    Messages,
    add_secure_options,
    masked_key_exists,
    run_stage,
    secret_of,
    secure_round_of,
    uploader,
)

WORKDIR_HELP = "the training's store: a directory, or s3://bucket/prefix (settings from FEDTRAIN_S3_* and AWS_*)"


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--architecture", default="mobilenet_v3_small",
                       help="mobilenet_v3_small | mobilenet_v3_large | tiny_cnn")
    group.add_argument("--num-classes", type=int, default=43)
    group.add_argument("--image-size", type=int, default=64, help="square input size in pixels")
    group.add_argument("--pretrained", default=None, help="local .safetensors or .pth weights file")
    group.add_argument("--head-only", action="store_true", help="freeze the backbone, train the classifier only")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--optimizer", default="adam", help="sgd | adam")
    group.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--scheduler", default="none", help="none | cosine (cosine annealing with warm restarts)")
    group.add_argument("--restart-epochs", type=int, default=1, help="epochs per cosine cycle")
    group.add_argument("--mu", type=float, default=0.0, help="FedProx proximal term")
    group.add_argument("--clip-norm", type=float, default=None,
                       help="clip the update (weights minus the global model) to this L2 norm before it leaves")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all sub-commands."""
    parser = argparse.ArgumentParser(prog="fedtrain-worker", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth-gtsrb", help="write a synthetic GTSRB-like data set (official layout)")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--per-class", type=int, default=60)
    synth.add_argument("--test-per-class", type=int, default=20)
    synth.add_argument("--frames-per-track", type=int, default=SynthConfig.frames_per_track)
    synth.add_argument("--min-size", type=int, default=15)
    synth.add_argument("--max-size", type=int, default=250)
    synth.add_argument("--seed", type=int, default=0)

    init = commands.add_parser("init", help="partition the data and write the round-0 model")
    init.add_argument("--workdir", required=True, help=WORKDIR_HELP)
    init.add_argument("--data", default=None, help="GTSRB root (generated there with --synthetic-per-class)")
    init.add_argument("--no-data", action="store_true", help="read no data set (ignoring --data): every client is "
                      "a site with its own data and nothing is scored centrally")
    init.add_argument("--synthetic-per-class", type=int, default=None, help="generate synthetic data first")
    init.add_argument("--synthetic-test-per-class", type=int, default=20)
    init.add_argument("--synthetic-seed", type=int, default=0)
    init.add_argument("--synthetic-frames-per-track", type=int, default=SynthConfig.frames_per_track)
    init.add_argument("--no-roi-crop", action="store_true", help="use whole images, not the ROI")
    init.add_argument("--validation-fraction", type=float, default=0.1, help="per client, by track")
    init.add_argument("--clients", type=int, required=True)
    init.add_argument("--client-names", default="", help="comma-separated names (default: client-00, client-01...)")
    init.add_argument("--own-data-clients", default="", help="comma-separated clients with their own data set "
                      "(left out of the partition)")
    init.add_argument("--partition", default="iid", help="iid | dirichlet | classes | quantity")
    init.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    init.add_argument("--partition-seed", type=int, default=0)
    init.add_argument("--seed", type=int, default=0, help="model initialisation and client seeds")
    _add_model_options(init)

    train = commands.add_parser("train", help="one client, one round")
    train.add_argument("--workdir", required=True, help=WORKDIR_HELP)
    train.add_argument("--round", type=int, required=True)
    train.add_argument("--client", required=True)
    train.add_argument("--data", default=None, help="override the data path recorded by init")
    train.add_argument("--own-data", action="store_true", help="train on the whole training split at --data "
                       "(the client's own data set), not on the client's share of the partition")
    train.add_argument("--device", default="auto")
    train.add_argument("--attempt", type=int, default=1, help="the attempt of this client's task: its update's key "
                       "names it, so that a stale attempt never overwrites the current one's")
    _add_training_options(train)
    train.add_argument("--sites", default="", help="comma-separated clients that are remote sites (a secure round "
                       "reads their messages in sites/<site>/)")

    add_secure_options(train)

    secure = commands.add_parser("secure", help="one client's stage of a secure round (privacy.secureAggregation)")
    secure.add_argument("stage", choices=("keys", "shares", "unmask"))
    secure.add_argument("--workdir", required=True, help=WORKDIR_HELP)
    secure.add_argument("--round", type=int, required=True)
    secure.add_argument("--client", required=True)
    secure.add_argument("--sites", default="", help="comma-separated clients that are remote sites")
    add_secure_options(secure)

    aggregate = commands.add_parser("aggregate", help="one round: strategy over the updates, evaluate, save")
    aggregate.add_argument("--workdir", required=True, help=WORKDIR_HELP)
    aggregate.add_argument("--round", type=int, required=True)
    aggregate.add_argument("--strategy", default="fedavg")
    aggregate.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                           help="strategy parameter, repeatable (e.g. --param mu=0.01)")
    aggregate.add_argument("--min-updates", type=int, default=1)
    aggregate.add_argument("--max-norm-ratio", type=float, default=10.0,
                           help="reject updates whose norm exceeds this many times the median (0: off)")
    aggregate.add_argument("--clients", default="", help="comma-separated clients to use (default: all present)")
    _example_bound_options(aggregate)
    aggregate.add_argument("--max-weight-over-median", type=float, default=DEFAULT_MAX_WEIGHT_OVER_MEDIAN,
                           help="weigh no update more than this many times the median example count of the "
                           "round's accepted updates (spec.clients.maxWeightOverMedian)")
    aggregate.add_argument("--sites", default="", help="comma-separated clients that are remote sites (their "
                           "updates are in sites/<site>/)")
    aggregate.add_argument("--client-attempt", action="append", default=[], metavar="CLIENT=N",
                           help="the attempt of a client's task whose update counts (a late upload of another "
                           "attempt is ignored); repeatable; default: the client's latest upload")
    aggregate.add_argument("--data", default=None)
    aggregate.add_argument("--device", default="auto")
    aggregate.add_argument("--no-evaluate", action="store_true")
    aggregate.add_argument("--dp-clip-norm", type=float, default=None,
                           help="central DP: clip every update to this L2 norm, average equally, add noise")
    aggregate.add_argument("--dp-noise-multiplier", type=float, default=1.0, help="noise std / (clip norm / m)")
    aggregate.add_argument("--dp-sampling-rate", type=float, default=1.0, help="clients per round / clients")
    aggregate.add_argument("--dp-delta", type=float, default=1e-5)
    aggregate.add_argument("--dp-seed", type=int, default=0)
    aggregate.add_argument("--termination-log", type=Path, default=None,
                           help="also write the short JSON result here (Kubernetes: /dev/termination-log)")
    add_secure_options(aggregate, client=False)

    evaluate = commands.add_parser("evaluate", help="score a global model on the test split")
    evaluate.add_argument("--workdir", required=True, help=WORKDIR_HELP)
    evaluate.add_argument("--round", type=int, required=True)
    evaluate.add_argument("--data", default=None)
    evaluate.add_argument("--split", default="test", choices=("test", "train"))
    evaluate.add_argument("--device", default="auto")

    finalize = commands.add_parser("finalize", help="final model, plots and MLflow tracking of a training")
    finalize.add_argument("--workdir", required=True, help=WORKDIR_HELP)
    finalize.add_argument("--round", type=int, required=True, help="the last round")
    finalize.add_argument("--data", default=None)
    finalize.add_argument("--device", default="auto")
    finalize.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: no tracking)")
    finalize.add_argument("--experiment", default="fedtrain")
    finalize.add_argument("--registered-model-name", default=None)
    finalize.add_argument("--no-promote", action="store_true", help="register the model but leave the champion alias")
    finalize.add_argument("--log-clients", action="store_true", help="one nested MLflow run per client")
    finalize.add_argument("--training", default="training", help="training name, for lineage tags")
    finalize.add_argument("--namespace", default="default")
    finalize.add_argument("--uid", default="local")
    finalize.add_argument("--strategy", default="fedavg")
    finalize.add_argument("--spec-json", default="{}", help="the training's spec, logged as MLflow params")
    finalize.add_argument("--termination-log", type=Path, default=None)
    finalize.add_argument("--sites", default="", help="comma-separated evaluating sites: their scores of each "
                          "round's model are combined into federated metrics")
    finalize.add_argument("--no-central", action="store_true", help="no central test set: the champion rule uses "
                          "the last round's federated accuracy")
    finalize.add_argument("--combine", default="weighted", choices=get_args(Combination),
                          help="how to combine a round's site scores the coordinator recorded none for")
    finalize.add_argument("--min-site-scores", type=int, default=1, metavar="N",
                          help="with --no-central: promote the champion only on scores from at least N sites")
    _example_bound_options(finalize)

    site = commands.add_parser("site-task", help="a remote site: run the coordinator's task on the site's own data")
    site.add_argument("--workdir", required=True, help=WORKDIR_HELP)
    site.add_argument("--task-json", required=True, help="the task of the site's task.json posting, as JSON")
    site.add_argument("--data", required=True, help="the site's own GTSRB root")
    site.add_argument("--device", default="auto")
    site.add_argument("--validation-fraction", type=float, default=0.1, help="held-out tracks of the training "
                      "split, fixed per site")
    site.add_argument("--evaluation-split", default="test", choices=("test", "validation"),
                      help="test: the tree's test split (held-out tracks when it has none); validation: held-out "
                      "tracks")
    site.add_argument("--secret-file", type=Path, default=None, help="the site's secure-aggregation master secret "
                      "(made once, mode 0600, unless --secret-provided); a secure round's tasks need it")
    site.add_argument("--secret-provided", action="store_true",
                      help="the secret file is given (a mounted Secret's key): read it, never make it")

    predict = commands.add_parser("predict", help="classify image files with a model file")
    predict.add_argument("--weights", required=True, type=Path)
    predict.add_argument("--top", type=int, default=1)
    predict.add_argument("--device", default="auto")
    predict.add_argument("images", nargs="+", type=Path)

    remove = commands.add_parser("remove", help="delete a training's directory (storage reclaim policy Delete)")
    remove.add_argument("--workdir", required=True, help=WORKDIR_HELP)
    return parser


def remove_training_directory(location: str) -> dict[str, Any]:
    """Delete a training's files, only if they are one (manifest.json, or nothing): never a wrong path or prefix."""
    from fedtrain.contract.storage import DirectoryStore, open_store

    store = open_store(location)
    if isinstance(store, DirectoryStore):
        root = store.root
        if not root.exists():
            return {"removed": False, "reason": "absent"}
        if not root.is_dir() or root.is_symlink():
            raise BadInputError(f"--workdir {root} is not a directory; nothing was removed")
        if any(root.iterdir()) and not (root / "manifest.json").is_file():
            raise BadInputError(f"--workdir {root} has no manifest.json, so it is not a FedTrain training directory; "
                                "nothing was removed")
        shutil.rmtree(root)
        return {"removed": True}
    if not store.exists("manifest.json"):
        if store.list(""):
            raise BadInputError(f"--workdir {location} has no manifest.json, so it is not a FedTrain training; "
                                "nothing was removed")
        return {"removed": False, "reason": "absent"}
    return {"removed": True, "objects": store.remove_all()}


def _parameters(pairs: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    parsed = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadInputError(f"--param {pair!r} must look like KEY=VALUE")
        parsed.append((key, value))
    return tuple(parsed)


def run(args: argparse.Namespace) -> Any:
    """Dispatch one parsed command; returns what is printed as JSON."""
    from fedtrain.contract.storage import open_store
    from fedtrain.worker import jobs  # torch is imported only once arguments parsed
    from fedtrain.worker.data.partition import PartitionConfig
    from fedtrain.worker.data.synth import generate
    from fedtrain.worker.models import ModelConfig
    from fedtrain.worker.training import TrainConfig

    if args.command == "synth-gtsrb":
        return generate(args.out, SynthConfig(args.per_class, args.test_per_class, args.frames_per_track, args.seed,
                                              args.min_size, args.max_size))
    if args.command == "init":
        synth = None
        if args.synthetic_per_class is not None:
            synth = SynthConfig(args.synthetic_per_class, args.synthetic_test_per_class,
                                args.synthetic_frames_per_track, seed=args.synthetic_seed)
        model = ModelConfig(args.architecture, args.num_classes, args.image_size, args.pretrained, not args.head_only)
        if not (args.data or args.no_data):
            raise BadInputError("init needs --data (the GTSRB root), or --no-data when every client is a site")
        data = None if args.no_data else jobs.DataConfig(args.data, not args.no_roi_crop, args.validation_fraction)
        partition = PartitionConfig(args.partition, args.clients, args.alpha, args.partition_seed)
        names = tuple(n for n in args.client_names.split(",") if n)
        own = tuple(n for n in args.own_data_clients.split(",") if n)
        manifest = jobs.init(open_store(args.workdir), data, model, partition, synth, args.seed, names, own)
        return {"clients": manifest["partition"]["histograms"], "num_train_samples": manifest["num_train_samples"]}
    if args.command == "remove":
        return remove_training_directory(args.workdir)
    if args.command == "predict":
        return jobs.predict(args.weights, args.images, jobs.pick_device(args.device), args.top)
    if args.command == "site-task":
        return _site_task(args)
    if args.command == "secure":
        return run_stage(args, open_store(args.workdir), Layout(_names(args.sites)))
    workspace = jobs.Workspace.open(args.workdir, args.data)
    device = jobs.pick_device(args.device)
    if args.command == "train":
        config = TrainConfig(args.epochs, args.batch_size, args.optimizer, args.lr, args.momentum,
                             args.weight_decay, args.scheduler, args.restart_epochs, args.mu)
        config.check()
        if args.own_data and not args.data:
            raise BadInputError("--own-data needs --data: the path of the client's own data set")
        if args.clip_norm is not None and args.clip_norm <= 0:
            raise BadInputError(f"--clip-norm must be > 0, got {args.clip_norm}")
        if not 1 <= args.attempt <= MAX_ATTEMPT:
            raise BadInputError(f"--attempt must be in [1, {MAX_ATTEMPT}], got {args.attempt}")
        secure = secure_round_of(args, args.round)
        upload = None
        if secure is not None:
            messages = Messages(workspace.store, Layout(_names(args.sites)), secure)
            if masked_key_exists(messages, args.client):  # masking a second update with the same masks would
                return {"client": args.client, "masked": messages.key(args.client, "masked.safetensors"),  # show
                        "already_uploaded": True}  # the difference of the two
            upload = uploader(messages, args.client, secret_of(args), args.equal_weights)
        return jobs.train(workspace, args.round, args.client, config, device, args.own_data, args.clip_norm,
                          args.attempt, upload)
    if args.command == "aggregate":
        clients = tuple(c for c in args.clients.split(",") if c)
        privacy = None
        if args.dp_clip_norm is not None:
            privacy = jobs.PrivacyConfig(args.dp_clip_norm, args.dp_noise_multiplier, args.dp_sampling_rate,
                                         args.dp_delta, args.dp_seed)
            privacy.check()
        config_ = jobs.AggregateConfig(args.strategy, _parameters(args.param), args.min_updates,
                                       args.max_norm_ratio, clients, not args.no_evaluate, privacy,
                                       example_bounds_of(args), attempts=client_attempts_of(args),
                                       max_weight_over_median=weight_over_median_of(args),
                                       secure=secure_round_of(args, args.round))
        result = jobs.aggregate(replace(workspace, sites=_names(args.sites)), args.round, config_, device)
        if args.termination_log is not None:
            args.termination_log.write_text(jobs.termination_message(result))
        return {k: v for k, v in result.items() if k not in ("confusion", "per_class_accuracy")}
    if args.command == "finalize":
        return _finalize(args, workspace, device)
    weights, _ = workspace.load_global(args.round)
    return jobs.evaluate_weights(workspace, weights, device, args.split).to_json()


def _example_bound_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES,
                        help="the most examples an update or a site's score may claim (spec.clients.maxExamples)")
    parser.add_argument("--client-max-examples", action="append", default=[], metavar="CLIENT=N",
                        help="a client's own bound (spec.clients.list[].maxExamples); repeatable")


def _named_numbers(items: list[str], option: str, name: str, most: int) -> tuple[tuple[str, int], ...]:
    """``NAME=N`` options (``--client-attempt munich=2``), each N in [1, ``most``]."""
    found = []
    for item in items:
        named, _, number = item.partition("=")
        if not named or not is_number(number) or not 1 <= int(number) <= most:
            raise BadInputError(f"{option} {item!r}: use {name}=N with 1 <= N <= {most}")
        found.append((named, int(number)))
    return tuple(found)


def client_attempts_of(args: argparse.Namespace) -> tuple[tuple[str, int], ...]:
    """``--client-attempt CLIENT=N``: which attempt's update of each client the aggregation reads."""
    return _named_numbers(args.client_attempt, "--client-attempt", "CLIENT", MAX_ATTEMPT)


def example_bounds_of(args: argparse.Namespace) -> ExampleBounds:
    """The bounds from ``--max-examples`` and ``--client-max-examples``, each checked."""
    own = _named_numbers(args.client_max_examples, "--client-max-examples", "CLIENT", EXAMPLES_LIMIT)
    if not 1 <= args.max_examples <= EXAMPLES_LIMIT:
        raise BadInputError(f"--max-examples must be in [1, {EXAMPLES_LIMIT}], got {args.max_examples}")
    return ExampleBounds(args.max_examples, own)


def weight_over_median_of(args: argparse.Namespace) -> float:
    """``--max-weight-over-median``, checked: a finite multiple in [1, `EXAMPLES_LIMIT`]."""
    ratio = args.max_weight_over_median
    if not 1 <= ratio <= EXAMPLES_LIMIT:  # NaN fails too
        raise BadInputError(f"--max-weight-over-median must be in [1, {EXAMPLES_LIMIT}], got {ratio}")
    return float(ratio)


def _names(text: str) -> frozenset[str]:
    """``a,b,,c`` -> {a, b, c}."""
    return frozenset(n for n in text.split(",") if n)


def _site_task(args: argparse.Namespace) -> Any:
    from fedtrain.contract.storage import open_store
    from fedtrain.worker import jobs, site

    task = site.read_task(args.task_json)
    data = site.SiteData(args.data, args.validation_fraction, args.evaluation_split)
    secret = site.SiteSecret(args.secret_file, args.secret_provided) if args.secret_file is not None else None
    return site.run_task(open_store(args.workdir), task, data, jobs.pick_device(args.device), secret)


def _finalize(args: argparse.Namespace, workspace: Any, device: Any) -> Any:
    from fedtrain.worker.finalize import EvaluationConfig, TrackingConfig, finalize
    from fedtrain.worker.tracking import TrainingIdentity

    try:
        spec = json.loads(args.spec_json)
    except ValueError as error:
        raise BadInputError(f"--spec-json is not JSON ({error})") from error
    identity = TrainingIdentity(args.training, args.namespace, args.uid, args.strategy, spec)
    tracking = TrackingConfig(args.tracking_uri, args.experiment, args.registered_model_name, args.log_clients,
                              promote=not args.no_promote)
    if args.min_site_scores < 1:
        raise BadInputError(f"--min-site-scores must be >= 1, got {args.min_site_scores}")
    evaluation = EvaluationConfig(tuple(sorted(_names(args.sites))), central=not args.no_central,
                                  examples=example_bounds_of(args), combine=args.combine,
                                  min_sites=args.min_site_scores)
    summary = finalize(workspace, args.round, identity, tracking, device, evaluation)
    if args.termination_log is not None:
        short = {k: summary.get(k) for k in ("model_uri", "model_version", "champion", "accuracy",
                                             "federated_accuracy")}
        short["champion_reason"] = (summary.get("champion_reason") or "")[:REASON_KEPT] or None
        short["tracking_error"] = (summary.get("tracking_error") or "")[:2000] or None
        args.termination_log.write_text(json.dumps(short))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, print the result as JSON; map failures to exit codes."""
    args = build_parser().parse_args(argv)
    try:
        # stdout carries only the JSON result: what libraries print meanwhile (MLflow's run links) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            output = run(args)
    except WorkerError as error:
        print(f"fedtrain-worker {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except Exception as error:
        traceback.print_exc()
        print(f"fedtrain-worker {args.command}: error: internal error: {type(error).__name__}: {error}",
              file=sys.stderr)
        return EXIT_INTERNAL
    print(json.dumps(output, indent=2))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
