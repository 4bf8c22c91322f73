"""Layer contracts: imports only point downwards, and the control plane never loads torch.

kopf handlers (operator/) -> round engine (fedtrain/engine) -> executors (fedtrain/local, Kubernetes) and
worker (worker/) -> the contract they share (fedtrain/contract: store layout and access, the site protocol,
scores, exit codes). Checked on the source, so a violation fails here before it ships in an image.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FOLDERS = {"worker": "fedtrain.worker", "operator": "fedtrain.operator", "fedtrain": "fedtrain"}
# fedtrain.kubeflow (pipeline steps) sits on top of everything and nothing imports it.
FORBIDDEN = {
    # The contract is the bottom layer: it imports nothing else of FedTrain's, and neither torch nor numpy.
    "fedtrain.contract": ("fedtrain.worker", "fedtrain.engine", "fedtrain.local", "fedtrain.operator", "fedtrain.cli",
                          "fedtrain.spec", "fedtrain.tasks", "fedtrain.kubeflow", "fedtrain.sites", "fedtrain.crd",
                          "torch", "torchvision", "numpy"),
    "fedtrain.worker": ("fedtrain.engine", "fedtrain.local", "fedtrain.operator", "fedtrain.cli", "fedtrain.spec",
                        "fedtrain.tasks", "fedtrain.kubeflow", "fedtrain.sites"),
    "fedtrain.engine": ("fedtrain.local", "fedtrain.operator", "fedtrain.cli", "fedtrain.kubeflow"),
    "fedtrain.spec": ("fedtrain.engine", "fedtrain.local", "fedtrain.operator", "fedtrain.cli", "torch",
                      "fedtrain.kubeflow"),
    "fedtrain.tasks": ("fedtrain.local", "fedtrain.operator", "fedtrain.cli", "fedtrain.kubeflow"),
    "fedtrain.crd": ("fedtrain.engine", "fedtrain.local", "fedtrain.operator", "fedtrain.cli", "torch",
                     "fedtrain.kubeflow"),
    "fedtrain.local": ("fedtrain.operator", "fedtrain.kubeflow"),
    # Sites run beside the local runner and under the site operator: they may use the local executor, not the runner.
    "fedtrain.sites": ("fedtrain.operator", "fedtrain.local.runner", "fedtrain.cli", "fedtrain.kubeflow"),
    # What the site operator imports stays free of torch.
    "fedtrain.sites.participation": ("torch", "torchvision"),
    "fedtrain.sites.policy": ("torch", "torchvision"),
    "fedtrain.sites.agent": ("torch", "torchvision"),
    "fedtrain.sites.bucket_policy": ("torch", "torchvision"),
    "fedtrain.operator": ("fedtrain.local", "fedtrain.cli", "torch", "torchvision", "fedtrain.kubeflow"),
    "fedtrain.cli": ("fedtrain.kubeflow",),
}


def modules() -> list[tuple[str, Path]]:
    found = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found.append((name, path))
    return found


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(("name", "path"), modules(), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_point_downwards(name: str, path: Path) -> None:
    for layer, forbidden in FORBIDDEN.items():
        if name == layer or name.startswith(layer + "."):
            bad = sorted(i for i in imported(path) for f in forbidden if i == f or i.startswith(f + "."))
            assert not bad, f"{name} ({path.relative_to(ROOT)}) imports {bad}, a higher layer"


def test_nothing_is_importable_as_operator() -> None:
    """Run from the repository root, ``import operator`` must still be the standard library's."""
    done = subprocess.run([sys.executable, "-c", "import operator; print(operator.__file__)"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert "/operator/" not in done.stdout  # the standard library module, not our folder


def test_control_plane_does_not_load_torch() -> None:
    code = ("import sys, fedtrain.spec, fedtrain.engine, fedtrain.tasks, fedtrain.crd, fedtrain.operator.handlers,"
            " fedtrain.contract.sitetask, fedtrain.contract.storage, fedtrain.contract.federated;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
