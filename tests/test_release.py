"""The release workflow: valid for GitHub Actions (actionlint), and naming the images as the project does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fedtrain.spec import IMAGE_REGISTRY

ROOT = Path(__file__).parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"


def test_release_workflow_passes_actionlint() -> None:
    actionlint = shutil.which("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed (it comes with the dev extra: pip install -e '.[dev]')")
    result = subprocess.run([actionlint, str(WORKFLOW.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_release_pushes_the_images_the_project_names_for_each_build_of_torch() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert workflow["env"]["REGISTRY"] == IMAGE_REGISTRY
    assert workflow[True]["push"]["tags"] == ["v*"]  # YAML 1.1 reads the key `on` as true
    builds = workflow["jobs"]["images"]["strategy"]["matrix"]["include"]
    assert {(b["image"], b["torch"], b["suffix"]) for b in builds} == {
        ("operator", "cuda", ""), ("worker", "cuda", ""), ("worker", "cpu", "-cpu")}
    steps = workflow["jobs"]["images"]["steps"]
    assert any("fedtrain/__init__.py" in step.get("run", "") for step in steps), "the tag is not checked"
