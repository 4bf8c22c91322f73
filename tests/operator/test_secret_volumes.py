"""The test kubelet's secret volumes are as strict as a real one's: selected keys only, modes, owners, read-only."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from tests.operator import secret_volumes
from tests.operator.secret_volumes import MountFailed, SecretFile, identity, project, unreadable, write

SECRET = {"data": {"a.key": base64.b64encode(b"A" * 32).decode(), "b.key": base64.b64encode(b"B" * 32).decode()}}
POD = {"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}}


def volume(**source: object) -> dict[str, object]:
    return {"name": "keys", "secret": {"secretName": "s", **source}}


def test_only_the_selected_key_is_written_as_the_atomic_writer_lays_it_out(tmp_path: Path) -> None:
    files = project(volume(items=[{"key": "a.key", "path": "a.key"}], defaultMode=0o400), SECRET, fs_group=1000)
    written = write("keys", tmp_path / "keys", files, chown=False)
    assert sorted(p.name for p in written.folder.iterdir() if not p.name.startswith("..")) == ["a.key"]
    link = written.folder / "a.key"
    assert link.is_symlink() and os.readlink(link) == "..data/a.key" and link.read_bytes() == b"A" * 32
    assert (files[0].mode, files[0].group) == (0o440, 1000)  # fsGroup: the group's, 0440 ORed in
    assert written.changed() == []
    link.resolve().write_bytes(b"x")
    (written.folder / "c.key").write_bytes(b"x")
    assert written.changed() == ["a.key changed", "c.key added"]


def test_without_items_every_key_is_written_with_the_default_mode() -> None:
    files = project(volume(), SECRET, fs_group=None)
    assert [(f.path, f.mode, f.group) for f in files] == [("a.key", 0o644, 0), ("b.key", 0o644, 0)]


@pytest.mark.parametrize(("secret", "source", "message"), [
    (None, {}, 'MountVolume.SetUp failed for volume "keys" : secret "s" not found'),
    (SECRET, {"items": [{"key": "c.key", "path": "c.key"}]},
     'MountVolume.SetUp failed for volume "keys" : references non-existent secret key: c.key'),
])
def test_a_missing_secret_or_key_fails_the_mount(secret: dict[str, object] | None, source: dict[str, object],
                                                 message: str) -> None:
    with pytest.raises(MountFailed) as failed:
        project(volume(**source), secret, fs_group=1000)
    assert str(failed.value) == message
    assert project(volume(optional=True, **source), secret, fs_group=1000) == ()


@pytest.mark.parametrize(("mode", "group", "readable"), [
    (0o400, 0, False),  # root:root 0400 (no fsGroup): not the worker's
    (0o440, 1000, True),  # root:1000 0440, as with fsGroup 1000
    (0o440, 2000, False),  # another group's
    (0o444, 0, True),  # world-readable
])
def test_the_pods_user_reads_a_file_only_as_its_mode_owner_and_groups_allow(mode: int, group: int,
                                                                            readable: bool) -> None:
    uid, groups = identity(POD, {"name": "worker"})
    files = (SecretFile("a.key", b"A" * 32, mode, group),)
    assert (unreadable(files, uid, groups) == []) is readable
    assert unreadable(files, 0, set()) == []  # root reads anything


def test_the_container_identity_wins_over_the_pods() -> None:
    assert identity(POD, {"securityContext": {"runAsUser": 7, "runAsGroup": 8}}) == (7, {8, 1000})
    assert secret_volumes.identity({"securityContext": {"supplementalGroups": [5]}}, {}) == (None, {5})
