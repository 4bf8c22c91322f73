"""Keys of the files inside a training's store (a PVC subdirectory, a local folder or an S3 prefix).

::

    <workdir>/manifest.json                              data, model, partition
    <workdir>/round-0000/global.safetensors (+ .json)    initial weights
    <workdir>/round-0001/clients/<client>-a2.safetensors (+ .json)   a client's update, by its task's attempt
    <workdir>/round-0001/global.safetensors (+ .json), result.json, strategy-state.safetensors
    <workdir>/round-0001/federated.json                  the site scores the coordinator accepted for the round
    <workdir>/round-0001/secure-a1/<client>/keys.json, shares.json, masked.safetensors, reveal.json
                                                         secure aggregation's messages (a site's: in its folder)
    <workdir>/final/model.safetensors, plots/*.png
    <workdir>/sites/<site>/task.json                     the coordinator's current task for a site
    <workdir>/sites/<site>/results/<task id>.json        the site's answer: done, failed or refused
    <workdir>/sites/<site>/round-0001/update-a2.safetensors (+ .json)   a site's update, by the task's attempt
    <workdir>/sites/<site>/round-0001/evaluation.json    a site's scores of the round's global model

Everything a site may write is under ``sites/<site>/`` (all of it but its task); all it may read besides is the global
models (``round-*/global.safetensors`` and their sidecars). That is what a per-site bucket policy
grants (see `site_grants`).

Keys are relative, ``/``-separated strings; `storage` maps them to files or objects. Kept free of
torch and numpy so that the control plane can name the same files and clients.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


def is_number(text: str) -> bool:
    """Whether part of a key others wrote is a plain decimal number (``isdigit`` takes '²', ``int`` refuses it)."""
    return text.isascii() and text.isdigit()


def sidecar_of(key: str) -> str:
    """``round-0001/clients/client-00-a1.safetensors`` -> ``.../client-00-a1.json``."""
    return key.removesuffix(".safetensors") + ".json"


def client_names(count: int) -> list[str]:
    """Default client names, stable and DNS-label-safe: ``client-00``, ``client-01``, ... (wider past 100)."""
    width = max(2, len(str(count - 1)))
    return [f"client-{i:0{width}d}" for i in range(count)]


@dataclass(frozen=True)
class Layout:
    """Named keys of one training's files (the same in every store).

    ``sites`` are the clients that are other organisations' sites: their updates live under
    ``sites/<site>/``, where only that site may write.
    """

    sites: frozenset[str] = frozenset()

    @property
    def manifest(self) -> str:
        """Data, model and partition settings, written once by ``init``."""
        return "manifest.json"

    def round_dir(self, round_number: int) -> str:
        """``round-0003``."""
        return f"round-{round_number:04d}"

    def global_weights(self, round_number: int) -> str:
        """The global model after ``round_number`` (round 0: the initial model)."""
        return f"{self.round_dir(round_number)}/global.safetensors"

    def client_dir(self, round_number: int) -> str:
        """Where the clients of a round put their updates."""
        return f"{self.round_dir(round_number)}/clients"

    def client_update(self, round_number: int, client: str, attempt: int = 1) -> str:
        """One client's update in one round, by the attempt of its task (a site's is in its own folder).

        The key names the attempt: a task the engine gave up on (a straggler, a Job that outlived
        its deadline, a site on its own clock) may still write late, and it must never overwrite
        the update of the attempt that counts (the aggregator reads that one by its attempt).
        """
        return f"{self._update_stem(round_number, client)}{attempt}.safetensors"

    def _update_stem(self, round_number: int, client: str) -> str:
        """A client's update key up to its attempt number."""
        if client in self.sites:
            return f"{self.site_round_dir(client, round_number)}/update-a"
        return f"{self.client_dir(round_number)}/{client}-a"

    def update_folder(self, round_number: int, client: str) -> str:
        """The folder that holds a client's updates of a round, to list for `update_attempts`."""
        return self._update_stem(round_number, client).rsplit("/", 1)[0]

    def update_attempts(self, keys: Iterable[str], client: str, round_number: int) -> list[int]:
        """The attempts whose update of ``round_number`` is among ``keys`` (a listing of `update_folder`), sorted."""
        stem = self._update_stem(round_number, client)
        found = {key.removeprefix(stem).removesuffix(".safetensors") for key in keys
                 if key.startswith(stem) and key.endswith(".safetensors")}
        return sorted(int(text) for text in found if is_number(text) and len(text) <= 4)

    def updating_clients(self, keys: Iterable[str], round_number: int) -> set[str]:
        """In-cluster clients with an update of ``round_number`` among ``keys`` (a listing of `client_dir`)."""
        folder = self.client_dir(round_number) + "/"
        names = (key.removeprefix(folder).removesuffix(".safetensors") for key in keys
                 if key.startswith(folder) and key.endswith(".safetensors"))
        return {client for client, _, attempt in (name.rpartition("-a") for name in names)
                if client and "/" not in client and is_number(attempt) and len(attempt) <= 4}

    def site_dir(self, site: str) -> str:
        """Everything a site writes, and its task: ``sites/munich``."""
        return f"sites/{site}"

    def site_task(self, site: str) -> str:
        """The coordinator's current task for a site (overwritten as the training moves on)."""
        return f"{self.site_dir(site)}/task.json"

    def site_result(self, site: str, task_id: str) -> str:
        """A site's answer to one task."""
        return f"{self.site_dir(site)}/results/{task_id}.json"

    def site_round_dir(self, site: str, round_number: int) -> str:
        """``sites/munich/round-0003``."""
        return f"{self.site_dir(site)}/{self.round_dir(round_number)}"

    def site_evaluation(self, site: str, round_number: int) -> str:
        """A site's scores of the global model after ``round_number`` (metrics only)."""
        return f"{self.site_round_dir(site, round_number)}/evaluation.json"

    def result(self, round_number: int) -> str:
        """The aggregation's JSON result of a round."""
        return f"{self.round_dir(round_number)}/result.json"

    def federated_scores(self, round_number: int) -> str:
        """The sites' scores of a round's global model that the coordinator accepted (its record, not theirs)."""
        return f"{self.round_dir(round_number)}/federated.json"

    def strategy_state(self, round_number: int) -> str:
        """Server optimiser state after a round."""
        return f"{self.round_dir(round_number)}/strategy-state.safetensors"

    def secure_message(self, round_number: int, round_attempt: int, client: str, name: str) -> str:
        """A client's secure-aggregation message ``name`` (keys.json, shares.json, masked.safetensors, reveal.json).

        Each attempt of a round has its own folder (new keys, new masks); a site's is in its own
        folder, where only it may write, like its update.
        """
        if client in self.sites:
            return f"{self.site_round_dir(client, round_number)}/secure-a{round_attempt}/{name}"
        return f"{self.round_dir(round_number)}/secure-a{round_attempt}/{client}/{name}"

    @property
    def final_dir(self) -> str:
        """The final model and plots."""
        return "final"


def site_grants(site: str) -> dict[str, list[str]]:
    """Key patterns (relative to a training, ``*`` matching anything) a site may read and write.

    The one source of what a per-site bucket policy allows: `fedtrain site policy` turns these into
    IAM statements, and the tests run the store with exactly that policy.
    """
    folder = Layout().site_dir(site)
    return {"read": ["round-*/global.safetensors", "round-*/global.json", f"{folder}/*"],
            "write": [f"{folder}/results/*", f"{folder}/round-*"]}  # not its task.json: the coordinator's word
