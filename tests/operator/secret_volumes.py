"""Secret volumes as a kubelet (1.28) writes them, for the test cluster's Job runner.

What the worker can rely on, and nothing more: only the keys ``items`` selects (all of the
Secret's without ``items``), each file at its ``path`` with its ``mode`` (else ``defaultMode``,
else 0644), laid out by the kubelet's AtomicWriter (the files in a ``..<timestamp>`` folder,
``..data`` linking to it, one link per top-level name through ``..data``). With a Pod ``fsGroup``
``SetVolumeOwnership`` gives every file to that group and ORs 0440 into its mode (the volume is
read-only); the owner stays root. The volume is read-only to the container.

The runner's processes run as this machine's user, not as the Pod's, so permissions are judged
here (`unreadable`) from the Pod's uid and groups, and writes are found afterwards (`changed`).
A Secret or key that is missing fails the mount (`MountFailed`): the Pod waits in
``ContainerCreating``, as a real one does until they appear (this runner does not mount again).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_MODE = 0o644  # SecretVolumeSourceDefaultMode
READ_ONLY_MASK = 0o440  # volume.SetVolumeOwnership's roMask for a read-only volume with an fsGroup


class MountFailed(Exception):
    """``MountVolume.SetUp failed for volume ...``: what the kubelet's FailedMount event says."""


@dataclass(frozen=True)
class SecretFile:
    path: str  # inside the volume
    data: bytes
    mode: int
    group: int  # its owner is root


@dataclass(frozen=True)
class SecretVolume:
    """A written secret volume: where it is and what it holds."""

    name: str
    folder: Path
    files: tuple[SecretFile, ...]

    def changed(self) -> list[str]:
        """What the container changed in a volume it could only read (empty when nothing)."""
        found = []
        for item in self.files:
            target = self.folder / item.path
            if not target.is_file() or target.read_bytes() != item.data:
                found.append(f"{item.path} changed")
        tops = {item.path.split("/")[0] for item in self.files}
        extra = sorted(p.name for p in self.folder.iterdir() if not p.name.startswith("..") and p.name not in tops)
        return found + [f"{name} added" for name in extra]


def project(volume: dict[str, Any], secret: dict[str, Any] | None, fs_group: int | None) -> tuple[SecretFile, ...]:
    """The files a ``secret`` volume source projects from the Secret (None: not found); `MountFailed` if it cannot."""
    source = volume["secret"]
    optional = bool(source.get("optional"))
    if secret is None:
        if optional:
            return ()
        raise MountFailed(f'MountVolume.SetUp failed for volume "{volume["name"]}" : secret "{source["secretName"]}" '
                          "not found")
    data = secret.get("data") or {}
    items = source.get("items") or [{"key": key, "path": key} for key in sorted(data)]
    files = []
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise MountFailed(f'MountVolume.SetUp failed for volume "{volume["name"]}" : references non-existent '
                              f"secret key: {item['key']}")
        mode = int(item.get("mode", source.get("defaultMode", DEFAULT_MODE)))
        if fs_group is not None:
            mode |= READ_ONLY_MASK
        files.append(SecretFile(item["path"], base64.b64decode(data[item["key"]]), mode,
                                fs_group if fs_group is not None else 0))
    return tuple(files)


def write(name: str, folder: Path, files: tuple[SecretFile, ...], chown: bool) -> SecretVolume:
    """Lay the files out as AtomicWriter does; ``chown``: give them to their group on this machine (a container reads
    them under the Pod's identity)."""
    stamp = folder / f"..{datetime.now(UTC).strftime('%Y_%m_%d_%H_%M_%S.%f')}"
    stamp.mkdir(parents=True)
    for item in files:
        target = stamp / item.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(item.data)
        if chown:
            os.chown(target, 0, item.group)
        target.chmod(item.mode)
    (folder / "..data").symlink_to(stamp.name)
    for top in sorted({item.path.split("/")[0] for item in files}):
        (folder / top).symlink_to(f"..data/{top}")
    return SecretVolume(name, folder, files)


def identity(pod_spec: dict[str, Any], container: dict[str, Any]) -> tuple[int | None, set[int]]:
    """The container's uid and groups: runAsUser; runAsGroup, fsGroup and supplementalGroups (container wins)."""
    pod = pod_spec.get("securityContext") or {}
    own = container.get("securityContext") or {}
    uid = own.get("runAsUser", pod.get("runAsUser"))
    groups = {own.get("runAsGroup", pod.get("runAsGroup")), pod.get("fsGroup"), *(pod.get("supplementalGroups") or [])}
    return uid, {int(g) for g in groups if g is not None}


def unreadable(files: tuple[SecretFile, ...], uid: int | None, groups: set[int]) -> list[SecretFile]:
    """The files a process of ``uid`` (None: the image's user, not root) in ``groups`` cannot read."""
    if uid == 0:
        return []
    return [f for f in files if not (f.mode & 0o004 or (f.group in groups and f.mode & 0o040))]
