"""Fixtures: FedTrain's two images, built with the project's own build command, and a container kubelet.

The images are built once a session by ``deploy/images/build`` (tagged ``localhost/fedtrain-test/*:test``)
on ``FEDTRAIN_TEST_BASE`` when given (``python:3.11-slim`` where a registry is reachable), else on a
base made from Debian packages by ``deploy/images/debian-base`` (mmdebstrap), as an air-gapped user
builds. Without podman or docker, or without a way to a base, every test here skips and says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.containers.kubelet import Kubelet, engine

ROOT = Path(__file__).parents[2]
REGISTRY, TAG = "localhost/fedtrain-test", "test"
DEBIAN_BASE = "localhost/fedtrain/python:3.11-bookworm"


@dataclass(frozen=True)
class Images:
    """The built images' references."""

    operator: str
    worker: str


@pytest.fixture(scope="session")
def kubelet() -> Kubelet:
    found = engine()
    if found is None:
        pytest.skip("neither podman nor docker is installed: the container tests need one (apt-get install podman; "
                    "see docs/operator.md for this machine's /etc/containers/containers.conf)")
    return Kubelet(found)


def _exists(kubelet: Kubelet, image: str) -> bool:
    return subprocess.run([kubelet.engine, "image", "inspect", image], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def base_image(kubelet: Kubelet) -> str:
    """The base both images are built on."""
    given = os.environ.get("FEDTRAIN_TEST_BASE")
    if given:
        return given
    if _exists(kubelet, DEBIAN_BASE):
        return DEBIAN_BASE
    if shutil.which("mmdebstrap") is None:
        pytest.skip(f"no base image: set FEDTRAIN_TEST_BASE (e.g. python:3.11-slim) or install mmdebstrap, with "
                    f"which deploy/images/debian-base makes {DEBIAN_BASE}")
    subprocess.run([str(ROOT / "deploy" / "images" / "debian-base"), DEBIAN_BASE], check=True,
                   env={**os.environ, "FEDTRAIN_CONTAINER_ENGINE": kubelet.engine})
    return DEBIAN_BASE


@pytest.fixture(scope="session")
def images(kubelet: Kubelet, base_image: str) -> Iterator[Images]:
    """Both images, built as a user builds them (the layers that install the lock come from the engine's cache)."""
    result = subprocess.run([str(ROOT / "deploy" / "images" / "build"), "--registry", REGISTRY, "--version", TAG,
                             "--base", base_image], capture_output=True, text=True,
                            env={**os.environ, "FEDTRAIN_CONTAINER_ENGINE": kubelet.engine})
    assert result.returncode == 0, result.stderr[-5000:]
    built = result.stdout.split()
    assert built == [f"{REGISTRY}/operator:{TAG}", f"{REGISTRY}/worker:{TAG}"], result.stdout
    yield Images(*built)
