"""Run a Pod's container the way a kubelet with containerd runs it, with podman or docker.

What the manifests declare, and nothing more lenient: the Pod's uid and gid with no passwd entry for
them (podman invents one unless told `--passwd=false`; containerd and CRI-O do not), a read-only root
with only the declared volumes writable (podman's `--read-only` would add writable tmpfs mounts on
/tmp, /var/tmp and /run: `--read-only-tmpfs=false` takes them away), no capabilities, no privilege
escalation, ``command`` as the entrypoint and ``args`` after it, and the termination message file
mounted where the container says. Volumes are host folders given by name; their group is the Pod's
fsGroup with the setgid bit, as the kubelet leaves them; secret volumes are mounted read-only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def engine() -> str | None:
    """podman, else docker (FEDTRAIN_CONTAINER_ENGINE picks one); None when neither is installed."""
    wanted = os.environ.get("FEDTRAIN_CONTAINER_ENGINE")
    for name in [wanted] if wanted else ["podman", "docker"]:
        if name and shutil.which(name):
            return name
    return None


def own_volume(folder: Path, fs_group: int | None) -> None:
    """Give a volume's folder to the Pod's fsGroup (group-writable, setgid), as the kubelet does."""
    folder.mkdir(parents=True, exist_ok=True)
    if fs_group is None:
        return
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, -1, fs_group)
        path.chmod(path.stat().st_mode | 0o060 | (0o2010 if path.is_dir() else 0))


@dataclass
class Kubelet:
    """Turns (Pod spec, container) into a container engine's command line and starts it."""

    engine: str

    def run_args(self, pod_name: str, pod_spec: dict[str, Any], container: dict[str, Any],
                 volumes: dict[str, Path], environment: dict[str, str],
                 termination_log: Path | None, read_only: Collection[str] = ()) -> list[str]:
        """The whole command line; ``volumes`` maps each mounted volume's name to a host folder or file.

        ``read_only``: volumes the kubelet mounts read-only whatever the mount says (secret volumes).
        """
        pod_security = pod_spec.get("securityContext") or {}
        security = container.get("securityContext") or {}
        user = security.get("runAsUser", pod_security.get("runAsUser"))
        group = security.get("runAsGroup", pod_security.get("runAsGroup"))
        args = [self.engine, "run", "--rm", "--name", pod_name, "--network=host", "--pull=never"]
        if self.engine == "podman":
            args.append("--passwd=false")
        if user is not None:
            args += ["--user", f"{user}:{group if group is not None else user}"]
        if (security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))) and user in (None, 0):
            raise ValueError(f"{pod_name}: runAsNonRoot without a non-root runAsUser (the image's user decides)")
        if pod_security.get("fsGroup") is not None:
            args += ["--group-add", str(pod_security["fsGroup"])]
        if security.get("readOnlyRootFilesystem"):
            args += ["--read-only"] + (["--read-only-tmpfs=false"] if self.engine == "podman" else [])
        if "ALL" in (security.get("capabilities") or {}).get("drop", []):
            args.append("--cap-drop=ALL")
        if security.get("allowPrivilegeEscalation") is False:
            args.append("--security-opt=no-new-privileges")
        for mount in container.get("volumeMounts") or []:
            suffix = ":ro" if mount.get("readOnly") or mount["name"] in read_only else ""
            args += ["--volume", f"{volumes[mount['name']]}:{mount['mountPath']}{suffix}"]
        if termination_log is not None:
            args += ["--volume", f"{termination_log}:{container.get('terminationMessagePath', '/dev/termination-log')}"]
        for key, value in environment.items():
            args += ["--env", f"{key}={value}"]
        if container.get("workingDir"):
            args += ["--workdir", container["workingDir"]]
        command = list(container.get("command") or [])
        if command:  # the image's ENTRYPOINT gives way to it (docker takes one word there: the rest goes after)
            args += ["--entrypoint", command[0]]
        return [*args, container["image"], *command[1:], *(container.get("args") or [])]

    def start(self, pod_name: str, argv: list[str], stdout: Path, stderr: Path) -> ContainerProcess:
        """Start the container; its output goes to the two files."""
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        return ContainerProcess(self.engine, pod_name, process)


@dataclass
class ContainerProcess:
    """A running container, as the test cluster's Job runner follows a process: poll, wait, terminate."""

    engine: str
    name: str
    process: subprocess.Popen[bytes]

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self) -> int:
        return self.process.wait()

    def terminate(self) -> None:
        """Stop and remove the container (its Pod was deleted), whether or not it still runs."""
        subprocess.run([self.engine, "rm", "--force", "--time", "2", self.name], capture_output=True, check=False)
        self.process.wait()
