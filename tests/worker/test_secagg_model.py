"""Secure aggregation of MobileNetV3-small's full state: every tensor, buffers and 0-d counters included, exact."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedtrain.worker.models import ModelConfig, build_model
from fedtrain.worker.secagg import (
    ClientKeys,
    Context,
    QuantisationPlan,
    make_shares,
    mask,
    open_share,
    reveal,
    share_sets,
    unmask,
)
from fedtrain.worker.strategies.arrays import cast_like, weighted_mean
from fedtrain.worker.training import state_to_numpy

Weights = dict[str, NDArray[Any]]
CLIENTS = {"munich": (1200, 37), "lyon": (800, 25), "turin": (2000, 63)}  # examples, batches trained
MAX_EXAMPLES = 2000


def fine_tuned(global_: Weights, batches: int, rng: np.random.Generator) -> Weights:
    """A client's model after local training: small weight steps, drifted BatchNorm statistics, counters advanced."""
    update: Weights = {}
    for name, tensor in global_.items():
        if name.endswith("num_batches_tracked"):
            update[name] = tensor + batches
        elif name.endswith("running_var"):
            update[name] = (tensor * np.exp(rng.normal(0, 0.3, tensor.shape))).astype(tensor.dtype)
        elif name.endswith("running_mean"):
            update[name] = (tensor + rng.normal(0, 0.1, tensor.shape)).astype(tensor.dtype)
        else:
            update[name] = (tensor + rng.normal(0, 1e-3, tensor.shape)).astype(tensor.dtype)
    return update


def float_norm(delta: Weights) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v))) for v in delta.values() if v.dtype.kind == "f"))


def secure_sum(plan: QuantisationPlan, deltas: dict[str, Weights], weights: dict[str, float]) -> NDArray[np.uint32]:
    """One secure round of the three clients (complete graph, threshold 2), none dropping."""
    context = Context("team-a/gtsrb", 4, 1)
    names = sorted(deltas)
    sets = share_sets(names, 2, seed="round-4")
    keys = {c: ClientKeys.derive(c.encode().ljust(32, b"#"), context, c) for c in names}
    ads = {c: k.advertisement() for c, k in keys.items()}
    messages = {c: make_shares(keys[c], ads, sets[c], 2) for c in names}
    masked = {c: mask(plan.quantise(deltas[c], weights[c]), keys[c], ads) for c in names}
    reveals = {r: reveal(keys[r], {s: open_share(keys[r], ads[s], messages[s]) for s in names}, names, [])
               for r in names}
    return unmask(masked, reveals, ads, sets, names, 2, context)


def test_the_secure_mean_of_mobilenet_v3_small_equals_fedavg_for_every_tensor() -> None:
    global_ = state_to_numpy(build_model(ModelConfig("mobilenet_v3_small", num_classes=43, image_size=64)))
    global_ = {k: v + 500 if k.endswith("num_batches_tracked") else v for k, v in global_.items()}  # round 4
    rng = np.random.default_rng(4)
    updates = {c: fine_tuned(global_, batches, rng) for c, (_, batches) in CLIENTS.items()}
    deltas = {c: {k: u[k].astype(np.float64) - global_[k].astype(np.float64) if u[k].dtype.kind == "f"
                  else u[k] - global_[k] for k in u} for c, u in updates.items()}
    clip = max(float_norm(d) for d in deltas.values())
    weights = {c: examples / MAX_EXAMPLES for c, (examples, _) in CLIENTS.items()}
    plan = QuantisationPlan.for_model(global_, clip_norm=clip, max_clients=len(CLIENTS))

    sums, weight_sum = plan.dequantise(secure_sum(plan, deltas, weights))

    assert {np.ndim(global_[n]) for n in plan.names if n.endswith("num_batches_tracked")} == {0}
    plain = weighted_mean([updates[c] for c in CLIENTS], [examples for examples, _ in CLIENTS.values()])
    secure = {k: global_[k].astype(np.float64) + sums[k] / weight_sum for k in global_}
    bounds = plan.error_bound(weight_sum)
    assert set(secure) == set(global_) and len(global_) > 200
    for name in global_:
        error = float(np.max(np.abs(secure[name] - plain[name]))) if global_[name].size else 0.0
        assert secure[name].shape == global_[name].shape
        assert error <= bounds[name], f"{name}: error {error} beyond its bound {bounds[name]}"
    exact, ours = cast_like(plain, global_), cast_like(secure, global_)
    integers = [n for n in global_ if global_[n].dtype.kind in "iu"]
    assert integers and all(np.array_equal(ours[n], exact[n]) and ours[n].dtype == global_[n].dtype
                            for n in integers)
