"""The coordinator's memory while a site writes answers of every size: honest, the largest allowed, 1 GB.

The relay (`fedtrain.sites.relay.SiteRelay`) is the code in the operator and in ``fedtrain run`` that
reads a site's answers. Each case runs in a fresh process (spawned: nothing of this one's memory
carries over) that imports what the operator imports for it, publishes round 1's task, finds the
site's answer in the store and observes it once; printed: the process's peak resident memory
(VmHWM) after that, and the same process's peak before the answer was read (the baseline measured
in the same run). Stores: a directory (``fedtrain run``) and S3, as a moto server on loopback (the
operator's store for sites): the 1 GB answer is uploaded to it as a real object.

    python bench/hostile_answers.py            # all cases
    python bench/hostile_answers.py --gib 0.25 # a smaller "huge" answer, for a quick look
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: the repo's operator/ must not shadow stdlib

BUCKET = "bench"
TASK = "r0001-munich-a1"
KEY = f"sites/munich/results/{TASK}.json"


def answer(size: int) -> bytes:
    """A well-formed honest answer, padded with JSON whitespace to ``size`` bytes."""
    from fedtrain.contract.sitetask import PROTOCOL_VERSION

    body = json.dumps({"task": TASK, "site": "munich", "state": "succeeded", "exit_code": 0, "reason": None,
                       "output": {"num_examples": 40, "metrics": {"train_loss": 0.5}, "sha256": "a" * 64},
                       "version": PROTOCOL_VERSION}).encode()
    return body + b" " * max(0, size - len(body))


def write_answer(path: Path, size: int) -> Path:
    """The answer as a file of ``size`` bytes: valid JSON up to the limit; past it, sparse (it costs no disk here)."""
    from fedtrain.contract.sitetask import RESULT_LIMIT

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as stream:
        stream.write(answer(min(size, RESULT_LIMIT)))
        stream.truncate(max(size, stream.tell()))
    return path


def observe_once(location: str, environment: dict[str, str], queue: Any, whole: bool) -> None:
    """In a fresh process: post round 1's task, then read the site's answer once; report the figures.

    ``whole``: read it as the relay did before answers had a size bound (the object whole, then parsed),
    the baseline of the huge case.
    """
    import numpy as np

    from fedtrain.contract.layout import Layout
    from fedtrain.contract.storage import open_store
    from fedtrain.engine import Observation, TrainingStatus, decide
    from fedtrain.sites.relay import SiteRelay
    from fedtrain.spec import parse_spec
    from fedtrain.worker.weights import save_weights

    os.environ.update(environment)
    spec = parse_spec({"rounds": 1, "roundDeadlineSeconds": 600,
                       "clients": {"list": [{"name": "hq"}, {"name": "munich", "site": {}}]}})
    store = open_store(location, environment)
    save_weights(store, Layout().global_weights(0), {"w": np.zeros(3, np.float32)}, {"round": 0})
    first = decide(spec, TrainingStatus(), {}, time.time()).status
    status = decide(spec, first, {"init-a1": Observation("succeeded", 0)}, time.time()).status
    relay = SiteRelay(store, spec, "bench/hostile")
    relay.publish(status)
    from operator_scale import peak_rss_mib  # a sibling script: bench/ is on the path

    before = peak_rss_mib()
    started = time.perf_counter()
    if whole:
        data = store.read_bytes(KEY)
        state, reason = "read", f"{len(data)} bytes in memory"
    else:
        seen = relay.observe(status)[TASK]
        state, reason = seen.state, (seen.reason or "")[-90:]
    queue.put({"before": before, "after": peak_rss_mib(), "seconds": time.perf_counter() - started, "state": state,
               "reason": reason})


def measure(location: str, environment: dict[str, str], whole: bool = False) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=observe_once, args=(location, environment, queue, whole))
    process.start()
    found = queue.get(timeout=600)
    process.join(60)
    return dict(found)


def start_moto(folder: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    from tests.conftest import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=(folder / "moto.log").open("wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2).close()
            break
        except OSError:
            time.sleep(0.2)
    environment = {"FEDTRAIN_S3_ENDPOINT": endpoint, "FEDTRAIN_S3_REGION": "us-east-1",
                   "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    return process, environment


def put(environment: dict[str, str], key: str, source: Path) -> None:
    """Upload as the site would (multipart for a large file)."""
    import boto3

    client = boto3.client("s3", endpoint_url=environment["FEDTRAIN_S3_ENDPOINT"], region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
    client.upload_file(str(source), BUCKET, key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the huge answer in GiB")
    args = parser.parse_args()
    from fedtrain.contract.sitetask import RESULT_LIMIT

    sizes = {"honest (about 300 B)": 0, f"largest allowed ({RESULT_LIMIT // 1024} KiB)": RESULT_LIMIT,
             f"huge ({args.gib:g} GiB)": int(args.gib * 2**30)}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        moto, environment = start_moto(folder)
        try:
            import boto3

            boto3.client("s3", endpoint_url=environment["FEDTRAIN_S3_ENDPOINT"], region_name="us-east-1",
                         aws_access_key_id="bench", aws_secret_access_key="bench").create_bucket(Bucket=BUCKET)
            print(f"{'store':9} {'answer':37} {'peak before MiB':>15} {'peak after MiB':>14} {'read s':>7}  outcome")
            for name, size in sizes.items():
                label = name.split()[0]
                source = write_answer(folder / "answer.json", size)
                target = write_answer(folder / label / KEY, size)
                put(environment, f"{label}/{KEY}", source)
                source.unlink()
                for store, location in (("directory", str(folder / label)), ("s3", f"s3://{BUCKET}/{label}")):
                    for whole in (False, True) if size > RESULT_LIMIT else (False,):
                        found = measure(location, environment if store == "s3" else {}, whole)
                        shown = f"{name} read whole" if whole else name
                        print(f"{store:9} {shown:37} {found['before']:15.1f} {found['after']:14.1f} "
                              f"{found['seconds']:7.3f}  {found['state']}: {found['reason']}")
                target.unlink()
        finally:
            os.killpg(moto.pid, signal.SIGTERM)
            moto.wait(30)


if __name__ == "__main__":
    main()
