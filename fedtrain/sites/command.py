"""``fedtrain site``: run a site on this machine, show where it stands, print a site's bucket policy.

fedtrain site run samples/sites/munich.yaml          take part in a training until it is over
fedtrain site status runs/site-munich                 where the site stands
fedtrain site policy --bucket B --prefix P --training-id NS/NAME-UID8 --site munich
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedtrain.contract.errors import WorkerError
from fedtrain.sites.bucket_policy import coordinator_policy, site_policy
from fedtrain.sites.participation import ParticipationError, load_participation

EXIT_BAD_INPUT = 2


def add_site_commands(site: argparse.ArgumentParser) -> None:
    """The ``run``, ``status`` and ``policy`` sub-commands of ``fedtrain site``."""
    commands = site.add_subparsers(dest="site_command", required=True)
    run = commands.add_parser("run", help="take part in a training from this machine until it is over")
    run.add_argument("file", type=Path, help="a FederatedParticipation YAML file")
    run.add_argument("--workdir", type=Path, default=None, help="the site's own files (default: runs/site-<name>)")
    run.add_argument("--threads", type=int, default=None, help="compute threads per task (default: every core; "
                     "give each site a share when several run on one machine)")
    status = commands.add_parser("status", help="show where a site run on this machine stands")
    status.add_argument("workdir", type=Path)
    policy = commands.add_parser("policy", help="print the IAM policy of a site's (or the coordinator's) store key")
    policy.add_argument("--bucket", required=True)
    policy.add_argument("--prefix", default="fedtrain", help="the store's prefix (spec.storage.s3.prefix)")
    policy.add_argument("--training-id", required=True, help="<namespace>/<name>-<uid8>, the coordinator's "
                        "status.trainingId")
    who = policy.add_mutually_exclusive_group(required=True)
    who.add_argument("--site", help="the site's name in clients.list")
    who.add_argument("--coordinator", action="store_true", help="the coordinator's key instead")


def site_command(args: argparse.Namespace) -> int:
    """Run one ``fedtrain site`` sub-command; 2 for a bad file or argument."""
    handlers = {"run": _run, "status": _status, "policy": _policy}
    try:
        return handlers[args.site_command](args)
    except (ParticipationError, WorkerError) as error:
        Console(stderr=True).print(f"[red]{error}[/red]", highlight=False)
        return EXIT_BAD_INPUT


def _run(args: argparse.Namespace) -> int:
    from fedtrain.sites.local import SiteLoop

    manifest = load_participation(args.file)
    workdir = args.workdir or Path("runs") / f"site-{manifest.metadata.name}"
    if args.threads is not None and args.threads < 1:
        raise ParticipationError([f"--threads must be 1 or more, got {args.threads}"], "fedtrain site run")
    return SiteLoop(manifest, workdir, sys.stdout, threads=args.threads).run()


def _status(args: argparse.Namespace) -> int:
    from fedtrain.sites.local import STATUS_FILE, load_site_status

    if not (args.workdir / STATUS_FILE).exists():
        Console(stderr=True).print(f"[red]{args.workdir}: no {STATUS_FILE} here; is it a site's work directory?[/red]")
        return EXIT_BAD_INPUT
    status = load_site_status(args.workdir)
    table = Table(title=f"site: {status.phase}")
    table.add_column("field")
    table.add_column("value")
    rows = {"training phase": status.training_phase, "rounds done": status.rounds_done, "last task": status.last_task,
            "last accuracy": f"{status.last_accuracy:.4f}" if status.last_accuracy is not None else None,
            "epsilon": f"{status.epsilon:.4g}" if status.epsilon is not None else None,
            "last refusal": status.last_refusal, "message": status.message}
    for name, value in rows.items():
        table.add_row(name, "-" if value is None else str(value))
    Console().print(table)
    return 0


def _policy(args: argparse.Namespace) -> int:
    if args.coordinator:
        document = coordinator_policy(args.bucket, args.prefix, args.training_id)
    else:
        document = site_policy(args.bucket, args.prefix, args.training_id, args.site)
    print(json.dumps(document, indent=2))
    return 0
