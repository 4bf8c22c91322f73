"""Shared fixtures: a small synthetic GTSRB tree, a real MLflow server and a real S3 server per session."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[1]

@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic GTSRB tree in the official layout (43 classes, 8 training images each)."""
    from fedtrain.worker.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("gtsrb")
    generate(root, SynthConfig(per_class=8, test_per_class=2, frames_per_track=4, seed=3, max_size=64))
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not start:\n{Path(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield uri
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


@dataclass(frozen=True)
class S3Server:
    """A moto S3 server on loopback with IAM enforced: one bucket, one user allowed to use only it.

    ``admin`` holds the keys of an IAM administrator, with which `user` adds users (per-site keys) while
    authentication is enforced.
    """

    endpoint: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    admin: tuple[str, str] = ("", "")

    def user(self, name: str, policy_document: dict[str, Any]) -> tuple[str, str]:
        """A new IAM user with ``policy_document`` as its only (inline) policy: its access key id and secret."""
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id=self.admin[0], aws_secret_access_key=self.admin[1])
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="fedtrain", PolicyDocument=json.dumps(policy_document))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return str(key["AccessKeyId"]), str(key["SecretAccessKey"])

    def environment(self, credentials_from: str = "Secret tests/fedtrain-s3") -> dict[str, str]:
        """What the operator puts into a worker's environment for this store."""
        return {"FEDTRAIN_S3_ENDPOINT": self.endpoint, "FEDTRAIN_S3_REGION": "us-east-1",
                "FEDTRAIN_S3_CREDENTIALS_FROM": credentials_from, "AWS_ACCESS_KEY_ID": self.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret_access_key}

    def client(self) -> Any:
        """A boto3 client with the test user's credentials (to look behind the store)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """``moto`` in server mode: a real HTTP S3 API. Set up unauthenticated, then every request is checked.

    moto runs behind `tests.strict_s3`, which holds it to AWS S3 where moto is lenient: ``s3:prefix``
    conditions on listings, and 403 rather than 404 for a missing key to a user who may not list the bucket.
    """
    import boto3

    root = tmp_path_factory.mktemp("moto")
    port = free_port()
    log = (root / "server.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "tests.strict_s3", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto did not start:\n{(root / 'server.log').read_text()[-3000:]}") from None
            time.sleep(0.2)
    setup = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
             "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="fedtrain")
    key = iam.create_access_key(UserName="fedtrain")["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": [
        "arn:aws:s3:::fedtrain-test", "arn:aws:s3:::fedtrain-test/*"]}]}
    iam.put_user_policy(UserName="fedtrain", PolicyName="bucket", PolicyDocument=json.dumps(policy))
    boto3.client("s3", **setup).create_bucket(Bucket="fedtrain-test")
    iam.create_user(UserName="admin")
    iam.put_user_policy(UserName="admin", PolicyName="iam", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iam:*", "Resource": "*"}]}))
    admin = iam.create_access_key(UserName="admin")["AccessKey"]
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).close()  # from now on, requests need valid signed credentials
    yield S3Server(endpoint, "fedtrain-test", key["AccessKeyId"], key["SecretAccessKey"],
                   (admin["AccessKeyId"], admin["SecretAccessKey"]))
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)
