"""Real site documents for the tests: tasks as the coordinator writes them, read back through their JSON."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedtrain.contract.sitetask import PrivacySettings, SecureSettings, SiteTask, TrainSettings, parse_task
from fedtrain.sites.participation import ParticipationSpec, parse_participation_spec

DEADLINE = 10_000.0


def site_task(**changes: Any) -> SiteTask:
    """A train task for munich in round 3 of 5 (fedavg, tiny_cnn, 2 epochs), with ``changes``, through its JSON."""
    task = SiteTask(id="r0003-munich-a1", kind="train", round=3, site="munich", training="team/signs",
                    total_rounds=5, strategy="fedavg", architecture="tiny_cnn",
                    global_key="round-0002/global.safetensors", global_sha256="ab" * 32, deadline=DEADLINE, seed=7,
                    train=TrainSettings(epochs=2))
    return parse_task(dataclasses.replace(task, **changes).to_json())


def private(noise_multiplier: float = 1.0, sampling_rate: float = 0.5) -> PrivacySettings:
    """The coordinator's central DP settings."""
    return PrivacySettings(clip_norm=1.0, noise_multiplier=noise_multiplier, delta=1e-5, sampling_rate=sampling_rate)


def secure(**changes: Any) -> SecureSettings:
    """A secure round's settings as the relay posts them, with an empty inbox (a key stage's)."""
    return SecureSettings(**{"identity": "team/signs/0123abcd", "round_attempt": 1, "threshold": 2, "clip_norm": 5.0,
                             "weight_unit": 300, **changes})


def participation(policy: dict[str, Any] | None = None, **fields: Any) -> ParticipationSpec:
    """munich's participation in a local store, synthetic data, with ``policy`` and other spec fields."""
    return parse_participation_spec({"site": "munich", "training": {"id": ""}, "store": {"local": "/tmp/store"},
                                     "data": {"synthetic": {"imagesPerClass": 2, "seed": 1}},
                                     "policy": policy or {}, **fields})
