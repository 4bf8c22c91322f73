"""How fast the site operator reacts: a task posted → its Job created, and its Job finished → its answer in the store.

Usage: python bench/site_operator_reaction.py [--tasks 40] [--gaps 0.5,1,2,4]

The site's cluster of tests/operator (kmock API server over HTTP, Jobs run by the test Job runner)
with the site operator as deployed (``kopf run`` of fedtrain.operator.handlers in a process of its
own) and one FederatedParticipation at its defaults (``pollSeconds`` 30, so the site reads its
posting as `fedtrain.sites.pace` says); its store is a moto S3 server in this process. This process
plays the coordinator: it posts a training task, waits for the site's answer, waits a gap (cycling
through ``--gaps``: the time a coordinator takes to aggregate before it posts the next task), and
posts the next. Every Job fails at once (the runner's sabotage, exit 3), so the answer is the one
the operator writes; a worker that succeeds writes its own answer before its Job ends.

Measured per task:

- posting → Job: from the moment the PUT of ``task.json`` returned to the Job's
  ``creationTimestamp`` (stamped by the API server, same clock). It includes the wait for the
  site's next read (`fedtrain.sites.pace`: 0.2 s after the last answer, then 1.5 times later each
  time, so it grows with the gap), the operator's pass and the Job's create.
- Job finished → answer: from the Job's end (its Failed condition's ``lastTransitionTime``, stamped
  by the test cluster's Job controller as it writes the Job's end) to the first of this process's
  reads (a HEAD every 20 ms) that finds the answer.

Printed: p50 and p99 of each over all tasks, and by gap.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: the repo's operator/ must not shadow stdlib

import aiohttp

from fedtrain.contract.sitetask import Posting, SiteTask, TrainSettings, encode
from fedtrain.contract.storage import open_store
from tests.operator.cluster import Sabotage
from tests.operator.conftest import ClusterThread, SiteCluster, kubeconfig

BUCKET, PREFIX, NAMESPACE, SITE = "fedtrain-bench", "sites", "site-munich", "munich"
TRAINING_ID = "team-signs/reaction-0123abcd"


def stamp(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def moto() -> str:
    """moto's S3 on a free loopback port, in a thread of this process, with the bucket made."""
    import boto3
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=True,
                         request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="coordinator",
                 aws_secret_access_key="x").create_bucket(Bucket=BUCKET)
    return endpoint


def task(number: int, count: int) -> SiteTask:
    return SiteTask(id=f"r{number:04d}-{SITE}-a1", kind="train", round=number, site=SITE,
                    training="team-signs/reaction", total_rounds=count, strategy="fedavg", architecture="tiny_cnn",
                    global_key="round-0000/global.safetensors", global_sha256="0" * 64, deadline=time.time() + 600,
                    train=TrainSettings())


async def wait_for(check: Any, timeout: float = 120.0, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(every)


async def measure(count: int, gaps: list[float]) -> list[dict[str, float]]:
    endpoint = moto()
    environment = {"FEDTRAIN_S3_ENDPOINT": endpoint, "FEDTRAIN_S3_REGION": "us-east-1",
                   "AWS_ACCESS_KEY_ID": "coordinator", "AWS_SECRET_ACCESS_KEY": "x",
                   "FEDTRAIN_S3_CREDENTIALS_FROM": "the bench"}
    store = open_store(f"s3://{BUCKET}/{PREFIX}/{TRAINING_ID}", environment)
    root = Path(tempfile.mkdtemp(prefix="fedtrain-site-reaction-"))
    thread = ClusterThread(root / "site-node", lambda job: Sabotage(exit_code=3, message="simulated failure"))
    thread.start()
    assert thread.started.wait(60) and thread.server is not None and thread.runner is not None
    config = kubeconfig(root / "site-kubeconfig", thread.url)
    found: list[dict[str, float]] = []
    async with aiohttp.ClientSession(base_url=thread.url) as session:
        cluster = SiteCluster(thread.url, thread.server, thread.runner, session, config, root / "site-operator.log", {})
        try:
            import base64

            keys = {"AWS_ACCESS_KEY_ID": "site-munich", "AWS_SECRET_ACCESS_KEY": "x"}
            await cluster.request("POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", {
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "site-s3", "namespace": NAMESPACE},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}})
            await cluster.start_operator()
            await cluster.apply({
                "apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedParticipation",
                "metadata": {"name": "signs", "namespace": NAMESPACE},
                "spec": {"site": SITE, "training": {"id": TRAINING_ID},
                         "store": {"s3": {"endpoint": endpoint, "bucket": BUCKET, "prefix": PREFIX,
                                          "region": "us-east-1", "credentialsSecret": {"name": "site-s3"}}},
                         "data": {"claimName": "signs-data", "path": "gtsrb"},
                         "worker": {"image": "fedtrain/worker:test", "device": "cpu"}}})
            await asyncio.sleep(2.0)  # the operator's first pass has read the (missing) posting
            jobs = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
            for number in range(1, count + 1):
                posted = task(number, count)
                await asyncio.to_thread(store.write_bytes, f"sites/{SITE}/task.json",
                                        encode(Posting("Running", posted)))
                posted_at = time.time()

                async def job(ident: str = posted.id) -> dict[str, Any] | None:
                    return next((j for j in await cluster.list(jobs) if j["metadata"]["name"].endswith(ident)
                                 and j.get("status", {}).get("conditions")), None)

                async def answered(ident: str = posted.id) -> float | None:
                    there = await asyncio.to_thread(store.exists, f"sites/{SITE}/results/{ident}.json")
                    return time.time() if there else None

                answer_at = await wait_for(answered)
                finished = await wait_for(job)
                created = stamp(finished["metadata"]["creationTimestamp"])
                completed = stamp(finished["status"]["conditions"][0]["lastTransitionTime"])  # Failed
                gap = gaps[(number - 1) % len(gaps)] if number > 1 else float("nan")
                found.append({"gap": gap, "posted_to_job": created - posted_at,
                              "job_to_answer": answer_at - completed})
                await asyncio.sleep(gaps[number % len(gaps)])
        finally:
            if cluster.process is not None:
                await cluster.stop_operator()
            thread.stop()
    return found


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, values: list[float]) -> str:
    return (f"{name}: n={len(values)} p50 {quantile(values, 0.5):.3f} s, p99 {quantile(values, 0.99):.3f} s, "
            f"max {max(values):.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--gaps", default="0.5,1,2,4", help="seconds between an answer and the next posting")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    os.environ["FEDTRAIN_METRICS_PORT"] = "0"
    gaps = [float(g) for g in args.gaps.split(",")]
    load = os.getloadavg()[0]
    found = asyncio.run(measure(args.tasks, gaps))
    print(f"{args.tasks} tasks; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} "
          f"cores")
    later = found[1:]
    print(summary("posting -> Job created (all but the first)", [f["posted_to_job"] for f in later]))
    print(summary("Job finished -> answer in the store", [f["job_to_answer"] for f in found]))
    for gap in gaps:
        some = [f for f in later if f["gap"] == gap]
        if some:
            print(f"  gap {gap:g} s: posting -> Job p50 {statistics.median(f['posted_to_job'] for f in some):.3f} s, "
                  f"max {max(f['posted_to_job'] for f in some):.3f} s; n={len(some)}")


if __name__ == "__main__":
    main()
