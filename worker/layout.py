"""Keys of the files inside a training's store (a PVC subdirectory, a local folder or an S3 prefix).

::

    <workdir>/manifest.json                              data, model, partition
    <workdir>/round-0000/global.safetensors (+ .json)    initial weights
    <workdir>/round-0001/clients/<client>.safetensors (+ .json)
    <workdir>/round-0001/global.safetensors (+ .json), result.json, strategy-state.safetensors
    <workdir>/final/model.safetensors, plots/*.png

Keys are relative, ``/``-separated strings; `storage` maps them to files or objects. Kept free of
torch and numpy so that the control plane can name the same files and clients.
"""

from __future__ import annotations

from dataclasses import dataclass


def client_names(count: int) -> list[str]:
    """Default client names, stable and DNS-label-safe: ``client-00``, ``client-01``, ... (wider past 100)."""
    width = max(2, len(str(count - 1)))
    return [f"client-{i:0{width}d}" for i in range(count)]


@dataclass(frozen=True)
class Layout:
    """Named keys of one training's files (the same in every store)."""

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

    def client_update(self, round_number: int, client: str) -> str:
        """One client's update in one round."""
        return f"{self.client_dir(round_number)}/{client}.safetensors"

    def result(self, round_number: int) -> str:
        """The aggregation's JSON result of a round."""
        return f"{self.round_dir(round_number)}/result.json"

    def strategy_state(self, round_number: int) -> str:
        """Server optimiser state after a round."""
        return f"{self.round_dir(round_number)}/strategy-state.safetensors"

    @property
    def final_dir(self) -> str:
        """The final model and plots."""
        return "final"
