"""Paths inside a training's work directory (a PVC subdirectory or a local folder).

::

    <workdir>/manifest.json                              data, model, partition
    <workdir>/round-0000/global.safetensors (+ .json)    initial weights
    <workdir>/round-0001/clients/<client>.safetensors (+ .json)
    <workdir>/round-0001/global.safetensors (+ .json), result.json, strategy-state.safetensors
    <workdir>/final/model.safetensors, plots/*.png

Kept free of torch and numpy so that the control plane can name the same paths and clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def client_names(count: int) -> list[str]:
    """Default client names, stable and DNS-label-safe: ``client-00``, ``client-01``, ... (wider past 100)."""
    width = max(2, len(str(count - 1)))
    return [f"client-{i:0{width}d}" for i in range(count)]


@dataclass(frozen=True)
class Layout:
    """Named paths under one training's work directory."""

    root: Path

    @property
    def manifest(self) -> Path:
        """Data, model and partition settings, written once by ``init``."""
        return self.root / "manifest.json"

    def round_dir(self, round_number: int) -> Path:
        """``round-0003``."""
        return self.root / f"round-{round_number:04d}"

    def global_weights(self, round_number: int) -> Path:
        """The global model after ``round_number`` (round 0: the initial model)."""
        return self.round_dir(round_number) / "global.safetensors"

    def client_dir(self, round_number: int) -> Path:
        """Where the clients of a round put their updates."""
        return self.round_dir(round_number) / "clients"

    def client_update(self, round_number: int, client: str) -> Path:
        """One client's update in one round."""
        return self.client_dir(round_number) / f"{client}.safetensors"

    def result(self, round_number: int) -> Path:
        """The aggregation's JSON result of a round."""
        return self.round_dir(round_number) / "result.json"

    def strategy_state(self, round_number: int) -> Path:
        """Server optimiser state after a round."""
        return self.round_dir(round_number) / "strategy-state.safetensors"

    @property
    def final_dir(self) -> Path:
        """The final model and plots."""
        return self.root / "final"
