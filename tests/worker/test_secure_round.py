"""A secure round through a real store: the unmasked mean equals FedAvg, and no object shows one client's update.

The clients train once, plainly, so that the same trained models go both into a plain FedAvg and
into the secure round's stages (keys, shares, masked uploads, reveals, unmasking) over the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from fedtrain.contract.errors import BadInputError, SecureRoundError
from fedtrain.contract.layout import Layout
from fedtrain.contract.storage import DirectoryStore
from fedtrain.worker.cli import main
from fedtrain.worker.secure import (
    Messages,
    SecureMean,
    SecureRound,
    advertise,
    clipped_delta,
    master_secret,
    plan_for,
    reveal_shares,
    secure_aggregate,
    secure_mean,
    share,
    upload_masked,
)
from fedtrain.worker.strategies import make_strategy
from fedtrain.worker.weights import Weights, read_weights

CLIENTS = ("client-00", "client-01", "client-02", "client-03")
CLIP = 50.0
UNIT = 1000


@pytest.fixture(scope="module")
def trained(synth_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Round 1 of a 4-client federation trained plainly: the base model, each client's model and example count."""
    workdir = tmp_path_factory.mktemp("plain")
    assert main(["init", "--workdir", str(workdir), "--data", str(synth_tree), "--clients", "4", "--architecture",
                 "tiny_cnn", "--image-size", "16", "--seed", "2"]) == 0
    for client in CLIENTS:
        assert main(["train", "--workdir", str(workdir), "--round", "1", "--client", client, "--epochs", "1",
                     "--lr", "0.01", "--device", "cpu"]) == 0
    store = DirectoryStore(workdir)
    base, _ = read_weights(store, Layout().global_weights(0))
    models: dict[str, Weights] = {}
    counts: dict[str, int] = {}
    for client in CLIENTS:
        models[client], meta = read_weights(store, Layout().client_update(1, client, 1))
        counts[client] = int(meta["num_examples"])
    return {"base": base, "models": models, "counts": counts}


def run_secure_round(root: Path, trained: dict[str, Any], dropped_after_sharing: tuple[str, ...] = ()
                     ) -> tuple[Messages, SecureRound]:
    """Every stage of one secure round in a fresh store; clients in ``dropped_after_sharing`` never upload."""
    store, base = DirectoryStore(root / "store"), trained["base"]
    secrets = root / "secrets"
    secrets.mkdir()
    masters = {c: master_secret(secrets / f"{c}.key") for c in CLIENTS}
    secure = SecureRound("tests/secure/uid", 1, 1, 3, None, CLIP, weight_unit=UNIT, advertised=CLIENTS)
    for client in CLIENTS:
        advertise(Messages(store, Layout(), secure), client, masters[client])
    secure = SecureRound(**{**vars(secure), "shared": CLIENTS})
    for client in CLIENTS:
        share(Messages(store, Layout(), secure), client, masters[client])
    survivors = tuple(c for c in CLIENTS if c not in dropped_after_sharing)
    for client in survivors:
        weight = trained["counts"][client] / UNIT
        upload_masked(Messages(store, Layout(), secure), client, masters[client], base, trained["models"][client],
                      weight, {"client": client})
    secure = SecureRound(**{**vars(secure), "survivors": survivors})
    for client in survivors:
        reveal_shares(Messages(store, Layout(), secure), client, masters[client])
    return Messages(store, Layout(), secure), secure


def plain_mean_delta(trained: dict[str, Any], clients: tuple[str, ...]) -> dict[str, NDArray[np.float64]]:
    counts = trained["counts"]
    deltas = {c: clipped_delta(trained["base"], trained["models"][c], CLIP) for c in clients}
    total = sum(counts[c] for c in clients)
    return {name: sum(deltas[c][name] * counts[c] for c in clients) / total for name in trained["base"]}


@pytest.mark.parametrize("dropped", [(), ("client-02",)], ids=["all", "one-dropped-after-sharing"])
def test_the_unmasked_mean_equals_fedavg_of_the_same_updates(trained: dict[str, Any], tmp_path: Path,
                                                             dropped: tuple[str, ...]) -> None:
    messages, secure = run_secure_round(tmp_path, trained, dropped)
    mean, details = secure_mean(messages, trained["base"])
    expected = plain_mean_delta(trained, secure.survivors)
    assert details["secure_aggregation"]["survivors"] == list(secure.survivors)
    for name, values in expected.items():
        assert np.max(np.abs(mean.mean_delta[name] - values), initial=0.0) <= mean.error_bound, name
    assert mean.weight_sum * UNIT == pytest.approx(sum(trained["counts"][c] for c in secure.survivors), abs=0.5)


def test_no_object_in_the_store_equals_or_correlates_with_one_clients_update(trained: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    messages, secure = run_secure_round(tmp_path, trained)
    base = trained["base"]
    plan = plan_for(base, secure)
    clear = {c: plan.quantise(clipped_delta(base, trained["models"][c], CLIP), trained["counts"][c] / UNIT)
             for c in CLIENTS}
    floats = {c: np.concatenate([np.ravel(trained["models"][c][n]).astype(np.float32) for n in sorted(base)])
              for c in CLIENTS}
    keys = messages.store.list("")
    assert len(keys) >= 4 * 4, keys  # keys, shares, masked (+ sidecar) and reveal of each client
    for key in keys:  # as the coordinator's key reads the store: everything
        data = messages.store.read_bytes(key)
        for client in CLIENTS:
            assert floats[client][:16].tobytes() not in data, (key, client)
            assert clear[client][:16].tobytes() not in data, (key, client)
        if key.endswith(".safetensors"):
            vector = load_safetensors(data)["masked"].astype(np.float64)
            for client in CLIENTS:
                r = np.corrcoef(vector, clear[client].view(np.int32).astype(np.float64))[0, 1]
                assert abs(r) < 0.05, (key, client, r)


def test_a_server_optimiser_steps_on_the_unmasked_mean(trained: dict[str, Any], tmp_path: Path) -> None:
    messages, _ = run_secure_round(tmp_path, trained)
    strategy = make_strategy("fedadam", {"eta": 0.01})
    outcome = secure_aggregate(messages, trained["base"], strategy, {})
    plain = SecureMean(trained["base"], plain_mean_delta(trained, CLIENTS), 1.0, 0.0)
    expected = make_strategy("fedadam", {"eta": 0.01}).aggregate(trained["base"], plain, {})  # type: ignore[arg-type]
    assert outcome.state and set(outcome.state) == set(expected.state)
    for name, value in expected.weights.items():
        np.testing.assert_allclose(outcome.weights[name], value, atol=1e-4, err_msg=name)


def test_every_stage_run_again_writes_the_same_or_nothing(trained: dict[str, Any], tmp_path: Path) -> None:
    messages, secure = run_secure_round(tmp_path, trained)
    store, client = messages.store, "client-01"
    before = {key: store.read_bytes(key) for key in store.list("")}
    master = master_secret(tmp_path / "secrets" / f"{client}.key")
    advertise(Messages(store, Layout(), secure), client, master)
    assert share(Messages(store, Layout(), secure), client, master)["already_shared"] is True
    after = {key: store.read_bytes(key) for key in store.list("")}
    assert after == before, "keys derive from the master secret; shares are written once"


def test_a_provided_secret_is_only_read_and_a_missing_one_is_never_made(tmp_path: Path) -> None:
    """On Kubernetes the key is a mounted Secret's (read-only): the worker reads it and never tries to make one."""
    from fedtrain.contract.errors import BadInputError

    given = tmp_path / "client-00.key"
    given.write_bytes(bytes(range(32)))
    assert master_secret(given, create=False) == bytes(range(32))
    missing = tmp_path / "client-01.key"
    with pytest.raises(BadInputError, match="--secret-provided"):
        master_secret(missing, create=False)
    assert not missing.exists()
    given.write_bytes(b"short")
    with pytest.raises(BadInputError, match="32 bytes, this one 5"):
        master_secret(given, create=False)


def test_a_secret_is_made_once_whole_whoever_asks_at_the_same_moment(tmp_path: Path) -> None:
    """Tasks of one client racing to make its secret all get the one that landed, complete; no draft is left."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "client-00.key"
    with ThreadPoolExecutor(8) as pool:
        made = set(pool.map(lambda _: master_secret(path), range(32)))
    assert made == {path.read_bytes()} and len(path.read_bytes()) == 32
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client-00.key"]
    assert master_secret(path) == path.read_bytes()  # made once: read ever after


def test_a_sum_no_honest_round_can_give_fails_the_round_naming_it(trained: dict[str, Any], tmp_path: Path) -> None:
    messages, _ = run_secure_round(tmp_path, trained)
    key = messages.key("client-01", "masked.safetensors")
    vector = load_safetensors(messages.store.read_bytes(key))["masked"]
    noise = np.random.default_rng(0).integers(0, 2**32, vector.size, dtype=np.uint64).astype(np.uint32)
    messages.store.write_bytes(key, save_safetensors({"masked": noise}))  # right size, wrong masks
    with pytest.raises(SecureRoundError, match="a masked vector or a share is wrong"):
        secure_mean(messages, trained["base"])


def test_a_reveal_is_written_once_whatever_roster_a_second_run_names(trained: dict[str, Any], tmp_path: Path) -> None:
    messages, secure = run_secure_round(tmp_path, trained)
    key = messages.key("client-00", "reveal.json")
    before = messages.store.read_bytes(key)
    other = SecureRound(**{**vars(secure), "survivors": ("client-00", "client-01", "client-02")})  # 03 "dropped"
    again = reveal_shares(Messages(messages.store, Layout(), other), "client-00",
                          master_secret(tmp_path / "secrets" / "client-00.key"))
    assert again["already_revealed"] is True and messages.store.read_bytes(key) == before


def test_a_secret_made_again_after_the_keys_stage_fails_the_clients_task_not_the_sum(
        trained: dict[str, Any], tmp_path: Path) -> None:
    messages, secure = run_secure_round(tmp_path, trained)
    fresh = SecureRound(**{**vars(secure), "attempt": 2, "survivors": ()})  # a new round attempt, keys advertised
    store = messages.store
    for client in CLIENTS:
        advertise(Messages(store, Layout(), fresh), client, master_secret(tmp_path / "secrets" / f"{client}.key"))
    lost = tmp_path / "secrets" / "client-02.key"
    lost.unlink()  # its file went away: the next task would make a new one
    with pytest.raises(BadInputError, match="client-02's secret does not derive the keys it advertised"):
        share(Messages(store, Layout(), fresh), "client-02", master_secret(lost))
