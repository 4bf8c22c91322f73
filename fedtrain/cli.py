"""``fedtrain``: run a FederatedTraining on this machine, look at it, and use its model.

fedtrain run samples/gtsrb-fedavg-local.yaml     train (or continue) a federation locally
fedtrain status runs/gtsrb-fedavg-local          where a local training stands
fedtrain predict --model models:/gtsrb-signs@champion IMAGE...
fedtrain site run samples/sites/munich.yaml      take part in a training as a site (see fedtrain site --help)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedtrain.engine.status import TrainingStatus
from fedtrain.local.lock import WorkdirBusy
from fedtrain.local.progress import LiveProgress, PlainProgress
from fedtrain.sites.command import add_site_commands, site_command
from fedtrain.spec import SpecError, SyntheticSpec, load_manifest

console = Console(stderr=True)
EXIT_FAILED = 1
EXIT_BAD_SPEC = 2


def build_parser() -> argparse.ArgumentParser:
    """Sub-commands run, status, predict."""
    parser = argparse.ArgumentParser(prog="fedtrain", description="Federated training of traffic-sign models.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run or continue a FederatedTraining on this machine")
    run.add_argument("file", type=Path, help="a FederatedTraining YAML file")
    run.add_argument("--workdir", type=Path, default=None, help="default: spec.storage.local, else runs/<name>")
    run.add_argument("--tracking-uri", default=None, help="MLflow URI (default: sqlite store in the work directory)")
    run.add_argument("--parallelism", type=int, default=None, help="tasks at once (default: spec.worker.parallelism)")
    status = commands.add_parser("status", help="show where a local training stands")
    status.add_argument("workdir", type=Path)
    predict = commands.add_parser("predict", help="classify images with a registered or local model")
    predict.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, or a .safetensors")
    predict.add_argument("--tracking-uri", default=None)
    predict.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    predict.add_argument("images", nargs="+", type=Path)
    cam = commands.add_parser("cam", help="class activation maps over test images, saved as a PNG")
    cam.add_argument("--model", required=True, type=Path, help="a model file (e.g. runs/NAME/final/model.safetensors)")
    cam.add_argument("--data", required=True, type=Path, help="a GTSRB tree; its test images are used")
    cam.add_argument("--count", type=int, default=8, help="how many test images")
    cam.add_argument("--out", type=Path, default=Path("cam.png"))
    site = commands.add_parser("site", help="take part in a training as a site; print a site's bucket policy")
    add_site_commands(site)
    return parser


def progress_display(out: Console, total_rounds: int, clients_per_round: int) -> LiveProgress | PlainProgress:
    """Live bars when ``out`` is a terminal, plain lines (one per round and per event) otherwise."""
    if out.is_terminal:
        return LiveProgress(out, total_rounds, clients_per_round)
    return PlainProgress(out.file, total_rounds)


def summary_table(status: TrainingStatus) -> Table:
    """Per-round results of a training."""
    table = Table(title=f"{status.phase}: {status.message}")
    sites = any(record.federated is not None for record in status.rounds)
    columns = ["round", "clients ok", "failed", "dropped", "rejected", "accuracy", "loss"]
    for column in columns + (["federated", "worst site"] if sites else []):
        table.add_column(column, justify="right")
    for record in status.rounds:
        accuracy = f"{record.accuracy:.4f}" if record.accuracy is not None else "-"
        loss = f"{record.loss:.4f}" if record.loss is not None else "-"
        row = [str(record.round), str(record.count("succeeded")), str(record.count("failed")),
               str(record.count("dropped")), str(len(record.rejected)), accuracy, loss]
        if sites:
            federated = record.federated
            row += [f"{federated.accuracy:.4f} ({federated.sites} sites)", f"{federated.worst_site} "
                    f"{federated.worst_accuracy:.4f}"] if federated is not None else ["-", "-"]
        table.add_row(*row)
    return table


def _run(args: argparse.Namespace) -> int:
    from fedtrain.local.runner import RunOptions, run_training

    manifest = load_manifest(args.file)
    spec = manifest.spec
    if spec.dataset.path is None:
        synthetic = spec.dataset.synthetic or SyntheticSpec()
        console.print(f"[cyan]No dataset.path in the spec: training on generated synthetic GTSRB "
                      f"({synthetic.images_per_class} images per class; see docs/data.md)")
    display = progress_display(Console(), spec.rounds, spec.clients.round_size)
    with display:
        result = run_training(manifest, RunOptions(args.workdir, args.tracking_uri, args.parallelism),
                              display.event, display.status)
    _print_summary(result.status, result.workdir)
    return 0 if result.status.phase in ("Succeeded", "Suspended") else EXIT_FAILED


def _print_summary(status: TrainingStatus, workdir: Path) -> None:
    out = Console()
    out.print(summary_table(status))
    final = workdir / "final"
    summary_path = final / "summary.json"
    if status.phase == "Succeeded" and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        out.print(f"final model: {summary['model_path']}")
        out.print(f"plots: {', '.join(summary.get('plots', []))}")
        if summary.get("model_uri"):
            champion = " (now champion)" if summary.get("champion") else ""
            out.print(f"MLflow: run {summary.get('run_id')}, model {summary['model_uri']}{champion}")
        for what, why in (summary.get("not_logged") or {}).items():
            out.print(f"[yellow]not logged to MLflow: {what} ({why})[/yellow]")
    elif status.phase == "Failed":
        out.print(f"[red]training failed: {status.message}[/red]; logs in {workdir / 'executor' / 'logs'}")
    elif status.phase == "Suspended":
        out.print("suspended (spec.suspend: true); set it to false and run the same command to continue")


def _status(args: argparse.Namespace) -> int:
    from fedtrain.local.runner import load_status

    if not (args.workdir / "status.json").exists():
        console.print(f"[red]{args.workdir}: no status.json here; is it a fedtrain work directory?[/red]")
        return EXIT_BAD_SPEC
    status = load_status(args.workdir)
    Console().print(summary_table(status))
    for condition in status.conditions:
        if condition.status == "True":
            Console().print(f"{condition.type}: {condition.reason} {condition.message}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fedtrain.local.predict import predict_images

    rows = predict_images(args.model, args.images, args.tracking_uri)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    table = Table()
    for column in ("image", "class", "sign", "probability"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["image"], str(row["class_id"]), row["sign_name"], f"{row['probability']:.3f}")
    Console().print(table)
    return 0


def _cam(args: argparse.Namespace) -> int:
    from fedtrain.worker.cam import class_activation_maps, save_cam_sheet
    from fedtrain.worker.data.gtsrb import load_tree, sign_names
    from fedtrain.worker.data.images import load_samples
    from fedtrain.worker.jobs import load_model_from_weights

    model, config = load_model_from_weights(args.model)
    tree = load_tree(args.data, config.num_classes)
    samples = list(tree.test[:args.count])
    images, labels = load_samples(tree, samples, max(config.image_size, 64), roi_crop=False)
    inputs, _ = load_samples(tree, samples, config.image_size, roi_crop=False)
    maps, predicted, probability = class_activation_maps(model, inputs)
    names = sign_names(args.data)
    titles = [f"predicted {names[p]} ({q:.2f})\ntrue {names[t]}" for p, q, t in zip(predicted, probability, labels,
                                                                                  strict=True)]
    Console().print(f"wrote {save_cam_sheet(args.out, images, maps, titles)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit 0 on success, 1 when the training failed, 2 for a bad spec or input."""
    args = build_parser().parse_args(argv)
    handlers: dict[str, Any] = {"run": _run, "status": _status, "predict": _predict, "cam": _cam,
                                "site": site_command}
    try:
        return int(handlers[args.command](args))
    except SpecError as error:
        console.print(f"[red]{error}[/red]")
        return EXIT_BAD_SPEC
    except WorkdirBusy as error:
        console.print(str(error), style="red", markup=False)  # paths may hold [brackets]
        return EXIT_BAD_SPEC
    except KeyboardInterrupt:
        console.print("interrupted: run the same command again to continue from the last finished round")
        return 130


if __name__ == "__main__":
    sys.exit(main())
