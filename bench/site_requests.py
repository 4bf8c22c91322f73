"""S3 requests of a site (``fedtrain site run``) and of the coordinator (``fedtrain run``), counted at the store.

Usage: python bench/site_requests.py [--idle-minutes 6] [--sites 3] [--rounds 3] [--skip-idle] [--skip-rounds]
       [--aws]

moto's S3 server runs in this process behind a WSGI middleware that records every request it is sent:
the time, the access key that signed it (each process runs with a key of its own, so requests are
told apart by who made them, the site's worker processes included), the method, the key and the
answer's status. Nothing is sampled: every HTTP request counts, retries included.

Idle: two sites run for ``--idle-minutes`` with nothing to do, at the participation's default pace
(``spec.pollSeconds`` 30): ``empty``, whose training has posted nothing (its ``task.json`` is missing),
and ``still``, whose posting says the training runs but has no task for it and never changes.
Printed: requests per minute over the whole time, over the first minute (the pace grows from 0.2 s
to ``pollSeconds``), and after it (the steady state), and a year of the steady state at AWS S3's
published GET price.

With ``--aws`` the idle sites sign with IAM users of moto that hold their ``fedtrain site policy``, and
the server is `tests.strict_s3`'s, which answers as AWS S3 does: a GET of the missing posting is 403
AccessDenied (the site may list only its own folder), so the site's store lists the key to tell
"missing" from "refused" (`S3Store.listed_absent`). The price of a year then counts LISTs at AWS's
LIST price.

Rounds: the local sites sample (``samples/sites/``: tiny CNN at 32 px, 2 local epochs, federated
evaluation every round) with its store in the bucket: ``fedtrain run`` of the coordinator and N
``fedtrain site run --threads 1``, each with its own key. Printed: each site's requests per minute
while the training runs (from the coordinator's first request to its last), by kind; the
coordinator's; and its checks of awaited answers (HEAD of ``sites/<site>/results/<task>.json`` from
its first to the answer's read), per awaited site task per minute.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from tests.strict_s3 import access_key_of  # noqa: E402

BUCKET = "fedtrain-bench"
PREFIX = "bench"
GET_PRICE = 0.0004 / 1000  # US dollars per GET request: AWS S3 Standard, us-east-1, published price
LIST_PRICE = 0.005 / 1000  # per LIST (and PUT) request, the same table
MINUTES_A_YEAR = 365 * 24 * 60
SITES = ("munich", "hamburg", "berlin")


@dataclass(frozen=True)
class Request:
    """One HTTP request the store answered."""

    at: float  # time.monotonic()
    key_id: str  # the access key that signed it
    method: str
    path: str  # /bucket/key, unquoted
    status: int


class Counting:
    """WSGI middleware: record each request, then hand it to moto."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        at = time.monotonic()
        key_id = access_key_of(environ) or "-"
        method, path = environ["REQUEST_METHOD"], unquote(environ.get("PATH_INFO", ""))

        def respond(status: str, headers: list[tuple[str, str]], *rest: Any) -> Any:
            with self.lock:
                self.requests.append(Request(at, key_id, method, path, int(status.split()[0])))
            return start_response(status, headers, *rest)

        return self.app(environ, respond)

    def of(self, key_id: str, since: float = 0.0, until: float = float("inf")) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.key_id == key_id and since <= r.at < until]


def serve(aws: bool = False) -> tuple[str, Counting]:
    """moto's S3 on a free loopback port, in a thread of this process, behind `Counting` (and `StrictS3`: ``aws``)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    from tests.strict_s3 import StrictS3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    app = DomainDispatcherApplication(create_backend_app)
    counting = Counting(StrictS3(app) if aws else app)
    server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=MotoRequestHandler)
    os.environ.setdefault("MOTO_PORT", str(server.server_port))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                 aws_secret_access_key="setup").create_bucket(Bucket=BUCKET)
    return endpoint, counting


def environment(endpoint: str, key_id: str, secret: str = "secret") -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FEDTRAIN_S3_"))}
    return {**clean, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "PYTHONUNBUFFERED": "1",
            "FEDTRAIN_S3_ENDPOINT": endpoint, "FEDTRAIN_S3_REGION": "us-east-1"}


def site_user(endpoint: str, site: str, training_id: str) -> tuple[str, str]:
    """An IAM user of moto for ``site`` holding its ``fedtrain site policy``; its access key and secret."""
    import boto3

    from fedtrain.sites.bucket_policy import site_policy

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName=f"site-{site}")
    iam.put_user_policy(UserName=f"site-{site}", PolicyName="federation",
                        PolicyDocument=json.dumps(site_policy(BUCKET, PREFIX, training_id, site)))
    key = iam.create_access_key(UserName=f"site-{site}")["AccessKey"]
    return str(key["AccessKeyId"]), str(key["SecretAccessKey"])


def start(arguments: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fedtrain.cli", *arguments], stdout=out,
                                stderr=subprocess.STDOUT, env=env)


def sample(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "samples" / "sites" / f"{name}.yaml").read_text()))


def site_file(scratch: Path, site: str, endpoint: str, training_id: str, seed: int, **synthetic: int) -> Path:
    """munich's participation renamed to ``site``, its store the bucket, the default pace."""
    document = sample("munich")
    document["metadata"]["name"] = document["spec"]["site"] = site
    document["spec"]["store"] = {"s3": {"endpoint": endpoint, "bucket": BUCKET, "prefix": PREFIX,
                                        "region": "us-east-1"}}
    document["spec"]["training"] = {"id": training_id, "name": training_id}
    document["spec"]["data"]["synthetic"].update(seed=seed, **synthetic)
    path = scratch / f"{site}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def kind(request: Request) -> str:
    """What a request was for, from its method and key."""
    name = request.path.rsplit("/", 1)[-1]
    if request.path.endswith("/task.json"):
        return f"{request.method} task.json ({request.status})"
    if "/results/" in request.path:
        return f"{request.method} an answer ({request.status})"
    if name.endswith(".safetensors"):
        return f"{request.method} weights"
    return f"{request.method} {'list' if request.method == 'GET' and request.path.count('/') == 1 else 'other'}"


def per_minute(count: int, seconds: float) -> float:
    return 60.0 * count / seconds if seconds > 0 else float("nan")


def idle(scratch: Path, endpoint: str, counting: Counting, minutes: float, aws: bool = False) -> None:
    """Two sites with nothing to do: nothing posted, and a posting that never changes (``aws``: IAM users)."""
    from fedtrain.contract.sitetask import Posting, encode
    from fedtrain.contract.storage import open_store, s3_location

    trainings = {"empty": "default/empty-00000000", "still": "default/still-00000000"}
    store = open_store(s3_location(BUCKET, PREFIX, trainings["still"]), environment(endpoint, "poster"))
    store.write_bytes("sites/still/task.json", encode(Posting("Running", None)))
    seeds = {"empty": 21, "still": 22}
    files = {site: site_file(scratch, site, endpoint, training, seeds[site], imagesPerClass=2, testImagesPerClass=1,
                             framesPerTrack=2) for site, training in trainings.items()}
    keys = {site: site_user(endpoint, site, training) if aws else (f"site-{site}", "secret")
            for site, training in trainings.items()}
    began = time.monotonic()
    processes = {site: start(["site", "run", str(path), "--workdir", str(scratch / site), "--threads", "1"],
                             scratch / f"{site}.log", environment(endpoint, *keys[site]))
                 for site, path in files.items()}
    time.sleep(minutes * 60)
    ended = time.monotonic()
    for process in processes.values():
        process.terminate()
        process.wait(timeout=60)
    print(f"idle, {minutes:g} min, pollSeconds 30 (the default){', AWS semantics' if aws else ''}; load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    for site in files:
        requests = counting.of(keys[site][0], began, ended)
        if not requests:
            print(f"  {site}: no requests (see {scratch / site}.log)")
            continue
        first = requests[0].at
        early = [r for r in requests if r.at < first + 60]
        steady = [r for r in requests if r.at >= first + 60]
        steady_rate = per_minute(len(steady), ended - first - 60)
        listings = sum(kind(r) == "GET list" for r in steady)
        price = ((len(steady) - listings) * GET_PRICE + listings * LIST_PRICE) / (ended - first - 60) * 60
        kinds = Counter(kind(r) for r in requests)
        print(f"  {site:5}: {len(requests)} requests in {(ended - first) / 60:.1f} min from its first "
              f"({per_minute(len(requests), ended - first):.2f}/min); first minute {len(early)}; after it "
              f"{len(steady)} in {(ended - first - 60) / 60:.1f} min = {steady_rate:.2f}/min ({listings} LISTs), "
              f"{steady_rate * MINUTES_A_YEAR:,.0f} a year = ${price * MINUTES_A_YEAR:.2f} a year "
              f"at $0.0004 per 1,000 GETs and $0.005 per 1,000 LISTs; by kind: {dict(kinds)}")


def rounds(scratch: Path, endpoint: str, counting: Counting, sites: list[str], count: int) -> None:
    """The local sites sample through the bucket: requests per site and of the coordinator while it runs."""
    uid = "5e1e0000" + "0" * 24
    training_id = f"default/sites-demo-{uid[:8]}"
    work = scratch / "coordinator"
    work.mkdir()
    (work / "uid").write_text(uid + "\n")  # the training's folder, which the sites are told, fixed in advance
    coordinator = sample("coordinator")
    coordinator["metadata"]["namespace"] = "default"
    coordinator["spec"].update(rounds=count, storage={"s3": {"endpoint": endpoint, "bucket": BUCKET,
                                                               "prefix": PREFIX, "region": "us-east-1"}})
    coordinator["spec"]["clients"]["list"] = [{"name": site, "site": {}} for site in sites]
    (scratch / "coordinator.yaml").write_text(yaml.safe_dump(coordinator))
    files = {site: site_file(scratch, site, endpoint, training_id, 11 + n) for n, site in enumerate(sites)}
    for site, path in files.items():  # each site's data first, as bench/sites_local.py does
        from fedtrain.sites.local import site_data
        from fedtrain.sites.participation import load_participation

        site_data(load_participation(path), scratch / site)
    began = time.monotonic()
    processes = [start(["run", str(scratch / "coordinator.yaml"), "--workdir", str(work)], scratch / "coordinator.log",
                       environment(endpoint, "coordinator"))]
    processes += [start(["site", "run", str(path), "--workdir", str(scratch / site), "--threads", "1"],
                        scratch / f"{site}.log", environment(endpoint, f"site-{site}")) for site, path in files.items()]
    processes[0].wait()
    for process in processes[1:]:
        process.wait(timeout=120)
    ended = time.monotonic()
    status = json.loads((work / "status.json").read_text())
    assert status["phase"] == "Succeeded", status.get("message")
    mine = counting.of("coordinator", began, ended)
    first, last = mine[0].at, mine[-1].at
    print(f"rounds: {count} rounds, {len(sites)} sites, {last - first:.1f} s from the coordinator's first request to "
          f"its last; median round {statistics.median(r['finishedAt'] - r['startedAt'] for r in status['rounds']):.1f}"
          f" s; federated accuracy {status['federatedAccuracy']:.4f}; load average {os.getloadavg()[0]:.1f} at the end")
    for site in sites:
        requests = counting.of(f"site-{site}", first, last)
        print(f"  site {site}: {len(requests)} requests = {per_minute(len(requests), last - first):.1f}/min; "
              f"by kind: {dict(sorted(Counter(kind(r) for r in requests).items()))}")
    print(f"  coordinator: {len(mine)} requests = {per_minute(len(mine), last - first):.1f}/min; by kind: "
          f"{dict(sorted(Counter(kind(r) for r in mine).items()))}")
    checks: dict[str, list[Request]] = defaultdict(list)
    for request in mine:
        if "/results/" in request.path:
            checks[request.path].append(request)
    heads = sum(sum(r.method == "HEAD" for r in found) - 1 for found in checks.values())
    awaited = sum(found[-1].at - found[0].at for found in checks.values())
    print(f"  coordinator's checks of awaited answers: {len(checks)} site tasks awaited {awaited / 60:.2f} min in "
          f"all (from the first check to the answer's read), {heads} checks that found nothing = "
          f"{per_minute(heads, awaited):.0f} per awaited site task per minute")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle-minutes", type=float, default=6.0)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--skip-rounds", action="store_true")
    parser.add_argument("--aws", action="store_true", help="idle sites with IAM users, answered as AWS S3 answers")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="fedtrain-site-requests-"))
    endpoint, counting = serve(args.aws)
    print(f"moto at {endpoint}; logs in {scratch}; load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    sites = list(SITES[:args.sites]) + [f"site{n:02d}" for n in range(len(SITES) + 1, args.sites + 1)]
    threads = []
    if not args.skip_idle:
        (scratch / "idle").mkdir()
        threads.append(threading.Thread(target=idle, args=(scratch / "idle", endpoint, counting, args.idle_minutes,
                                                          args.aws)))
    if not args.skip_rounds:
        (scratch / "rounds").mkdir()
        threads.append(threading.Thread(target=rounds, args=(scratch / "rounds", endpoint, counting, sites,
                                                              args.rounds)))
    for thread in threads:  # side by side: each is told apart by its keys
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
