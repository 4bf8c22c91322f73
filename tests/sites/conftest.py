"""A federation's object store: a moto S3 server of its own, with one IAM user per site and the coordinator.

Each user's policy is exactly what ``fedtrain site policy`` prints, so the tests hold the store to
the policy a federation would deploy. Users are created with the setup credentials before moto
starts enforcing IAM (``reset-auth``); from then on every request is signed and checked, and
`tests.strict_s3` checks what moto does not: listings against their ``s3:prefix`` condition, and
a missing key answered 403 to a user who may not list the bucket, as AWS S3 does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedtrain.contract.storage import Store, open_store, s3_location
from tests.conftest import free_port

ROOT = Path(__file__).parents[2]
BUCKET = "federation"
PREFIX = "fed"
TRAINING_ID = "team/signs-1a2b3c4d"
SITES = ("munich", "hamburg")


@dataclass(frozen=True)
class FederationStore:
    """The store's endpoint and each user's key (``munich``, ``hamburg``, ``coordinator``)."""

    endpoint: str
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)

    def environment(self, user: str) -> dict[str, str]:
        """A worker's environment with ``user``'s key."""
        key_id, secret = self.keys[user]
        return {**os.environ, "FEDTRAIN_S3_ENDPOINT": self.endpoint, "FEDTRAIN_S3_REGION": "us-east-1",
                "FEDTRAIN_S3_MAX_ATTEMPTS": "1", "FEDTRAIN_S3_CREDENTIALS_FROM": f"{user}'s key",
                "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}

    def store(self, user: str, training_id: str = TRAINING_ID) -> Store:
        """The training's store as ``user`` sees it."""
        return open_store(s3_location(BUCKET, PREFIX, training_id), self.environment(user))


def printed_policy(*args: str) -> str:
    """``fedtrain site policy`` for this federation, as a deployment would take it."""
    done = subprocess.run([sys.executable, "-m", "fedtrain.cli", "site", "policy", "--bucket", BUCKET, "--prefix",
                           PREFIX, "--training-id", TRAINING_ID, *args], capture_output=True, text=True, check=True,
                          cwd=ROOT)
    json.loads(done.stdout)
    return done.stdout


def _wait_for(endpoint: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.2)


@pytest.fixture(scope="session")
def federation_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FederationStore]:
    """moto in server mode with IAM enforced: users munich, hamburg and coordinator, each with its printed policy."""
    import boto3

    root = tmp_path_factory.mktemp("federation-moto")
    port = free_port()
    with (root / "server.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "tests.strict_s3", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    endpoint = f"http://127.0.0.1:{port}"
    _wait_for(endpoint, process, root / "server.log")
    setup = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
             "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", **setup)
    keys = {}
    for user, args in [*((s, ("--site", s)) for s in SITES), ("coordinator", ("--coordinator",))]:
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="federation", PolicyDocument=printed_policy(*args))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
    boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).close()  # from now on, requests need valid signed credentials
    yield FederationStore(endpoint, keys)
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)
