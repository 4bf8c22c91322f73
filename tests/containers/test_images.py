"""The images as a cluster runs them: packages equal to the lock, the worker's Jobs and the operator as containers.

Each Pod runs through `tests.containers.kubelet`: the uid of its manifest with no passwd entry, a
read-only root, only its declared volumes writable, no capabilities. The operator container talks to
the test API server; the test cluster's Job runner starts every Job it creates as a container of the
worker image.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.containers.conftest import ROOT, Images
from tests.containers.kubelet import Kubelet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def lock() -> dict[str, str]:
    """requirements.lock as {normalised name: version}."""
    found = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, _, version = line.strip().partition("==")
        if version:
            found[normalised(name)] = version
    return found


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(kubelet: Kubelet, image: str) -> dict[str, str]:
    """Every distribution in the image's Python environment, as {normalised name: version}."""
    script = ("import importlib.metadata as m, json; "
              "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    result = subprocess.run([kubelet.engine, "run", "--rm", "--entrypoint", "python3", image, "-c", script],
                            capture_output=True, text=True, check=True)
    return {normalised(k): v for k, v in json.loads(result.stdout).items()}


@pytest.mark.parametrize("which", ["operator", "worker"])
def test_each_image_holds_exactly_the_locked_versions(kubelet: Kubelet, images: Images, which: str) -> None:
    """What CI tested is what ships: every package in the image is in requirements.lock at its version."""
    found = installed(kubelet, getattr(images, which))
    assert found.pop("fedtrain") is not None
    locked = lock()
    # A CPU build's torch is 2.14.1+cpu: the same release as the lock's 2.14.1.
    differ = {name: (version, locked.get(name)) for name, version in found.items()
              if locked.get(name) != version.split("+")[0]}
    assert not differ, f"packages of the {which} image that are not the lock's (pip stays in the build stage): {differ}"
    assert ("torch" in found) == (which == "worker")
