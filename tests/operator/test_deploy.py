"""deploy/ (the kustomization), the Dockerfiles and the Kubernetes samples, read as data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fedtrain import __version__
from fedtrain.spec import DEFAULT_WORKER_IMAGE, IMAGE_REGISTRY, WORKER_IMAGE_ENV

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomized() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/` applies: resources and nested kustomizations, the `images:` renames and the
    generated ConfigMaps (named without kustomize's hash suffix, which kustomize also writes into the references)."""
    def walk(folder: Path) -> list[dict[str, Any]]:
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        found: list[dict[str, Any]] = []
        for entry in kustomization["resources"]:
            target = (folder / entry).resolve()
            found += walk(target) if target.is_dir() else documents(target)
        for generator in kustomization.get("configMapGenerator") or []:
            data = dict(literal.split("=", 1) for literal in generator["literals"])
            found.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                          "data": data})
        for document in found:
            for container in _containers(document):
                container["image"] = _renamed(container["image"], kustomization.get("images") or [])
        return found
    return walk(DEPLOY)


def _containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    pod = document.get("spec", {}).get("template", {}).get("spec", {})
    return [*pod.get("containers", []), *pod.get("initContainers", [])]


def _renamed(image: str, renames: list[dict[str, str]]) -> str:
    name, _, tag = image.partition(":")
    for rename in renames:
        if rename["name"] == name:
            return f"{rename.get('newName', name)}:{rename.get('newTag', tag)}"
    return image


def test_kustomization_has_namespace_crd_rbac_and_deployment() -> None:
    kinds = sorted(d["kind"] for d in kustomized())
    assert kinds == ["ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
                     "CustomResourceDefinition", "CustomResourceDefinition", "Deployment", "Namespace", "Service",
                     "ServiceAccount"]
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    namespace = next(d for d in kustomized() if d["kind"] == "Namespace")
    assert kustomization["namespace"] == namespace["metadata"]["name"]
    binding = next(d for d in kustomized() if d["kind"] == "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == namespace["metadata"]["name"]


def test_deployment_is_one_non_root_recreated_replica_with_probe_and_resources() -> None:
    deployment = next(d for d in kustomized() if d["kind"] == "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert pod["serviceAccountName"] == "fedtrain-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert {"requests", "limits"} <= set(container["resources"])
    assert "fedtrain.operator.handlers" in container["args"]


def test_deployment_gives_kopf_its_identity_and_the_worker_image_from_one_setting() -> None:
    """kopf names itself after POD_ID (no passwd lookup); FEDTRAIN_WORKER_IMAGE comes from the generated ConfigMap."""
    applied = kustomized()
    deployment = next(d for d in applied if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"{IMAGE_REGISTRY}/operator:{__version__}"
    identity = next(e for e in container["env"] if e["name"] == "POD_ID")
    assert identity["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    settings = next(d for d in applied if d["kind"] == "ConfigMap")
    assert container["envFrom"] == [{"configMapRef": {"name": settings["metadata"]["name"]}}]
    assert settings["data"] == {WORKER_IMAGE_ENV: DEFAULT_WORKER_IMAGE}


def test_dockerfiles_install_the_lock_as_non_root_under_an_init() -> None:
    operator = (ROOT / "operator" / "Dockerfile").read_text()
    worker = (ROOT / "worker" / "Dockerfile").read_text()
    assert "/src/pyproject.toml operator >" in operator and "torch" not in operator.replace("No torch", "")
    assert "/src/pyproject.toml worker,tracking,kubeflow >" in worker
    for dockerfile in (operator, worker):
        assert "--constraint /src/requirements.lock" in dockerfile
        assert "USER 1000:1000" in dockerfile and 'ENTRYPOINT ["tini", "--",' in dockerfile
        assert "ARG BASE=python:3.11-slim" in dockerfile and "FROM ${BASE}" in dockerfile


def test_kubernetes_samples_name_a_claim_and_leave_the_worker_image_to_the_operator() -> None:
    """One place names the worker image (the operator's setting): a sample that named it would need editing."""
    samples = sorted((ROOT / "samples" / "k8s").glob("**/*.yaml"))
    assert len(samples) >= 5
    for path in samples:
        for document in documents(path):
            spec = document["spec"]
            assert "image" not in (spec.get("worker") or {}), path
            if document["kind"] == "FederatedTraining":
                assert set(spec["storage"]) & {"persistentVolumeClaim", "create", "s3"}, path


def _role(name: str) -> dict[str, Any]:
    return next(d for d in kustomized() if d["kind"] == "ClusterRole" and d["metadata"]["name"] == name)


def _grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_user_roles_aggregate_into_kubernetes_and_kubeflow_roles() -> None:
    """Profile users get trainings through Kubeflow's and Kubernetes' aggregated roles, and nothing else."""
    edit, view = _role("fedtrain-edit"), _role("fedtrain-view")
    assert edit["metadata"]["labels"] == {"rbac.authorization.k8s.io/aggregate-to-edit": "true",
                                          "rbac.authorization.kubeflow.org/aggregate-to-kubeflow-edit": "true"}
    assert view["metadata"]["labels"] == {"rbac.authorization.k8s.io/aggregate-to-view": "true",
                                          "rbac.authorization.kubeflow.org/aggregate-to-kubeflow-view": "true"}
    kinds = ("federatedtrainings", "federatedparticipations")
    assert _grants(edit) == {("fedtrain.io", kind, verb) for kind in kinds
                             for verb in ("get", "list", "watch", "create", "update", "patch", "delete",
                                          "deletecollection")} | {("fedtrain.io", f"{kind}/status", "get")
                                                                  for kind in kinds}
    assert _grants(view) == {("fedtrain.io", resource, verb) for kind in kinds for resource in (kind, f"{kind}/status")
                             for verb in ("get", "list", "watch")}
    # Users never write status (the operator's alone) and these roles reach nothing but trainings and participations.
    assert not {g for g in _grants(edit) | _grants(view) if g[1].endswith("/status") and g[2] != "get"
                and g[2] not in ("list", "watch")}
