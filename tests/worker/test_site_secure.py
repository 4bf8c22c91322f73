"""A site's secure-aggregation stages, as its worker runs them: messages from the task, its own in its own folder.

munich is a site; hq and hamburg are the others of its share set, whose messages reach munich only
inside its tasks. A share relayed from another round attempt, or altered, is refused by name and
the site reveals the rest; the site's secret is read before anything else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from fedtrain.contract.errors import BadInputError
from fedtrain.contract.layout import Layout
from fedtrain.contract.sitetask import SecureSettings, SiteTask, parse_result, parse_task
from fedtrain.contract.storage import DirectoryStore
from fedtrain.worker.secagg import Advertisement, ClientKeys, Context, Reveal, SharesMessage, make_shares, open_share
from fedtrain.worker.site import SiteData, SiteSecret, run_task

IDENTITY = "team-signs/signs/0123abcd"
CONTEXT = Context(IDENTITY, 1, 1)
MEMBERS = ("hamburg", "hq", "munich")
LAYOUT = Layout(sites=frozenset({"munich"}))
DATA = SiteData("/nowhere")
CPU = torch.device("cpu")


def keys(client: str, context: Context = CONTEXT) -> ClientKeys:
    return ClientKeys.derive(client.encode().ljust(32, b"#"), context, client)


def task(kind: str, **secure: Any) -> SiteTask:
    """munich's task of round 1 as the relay posts it, read back through its JSON."""
    letter = {"keys": "k", "shares": "s", "unmask": "u"}[kind]
    settings = SecureSettings(**{"identity": IDENTITY, "round_attempt": 1, "threshold": 2, "clip_norm": 5.0,
                                 "weight_unit": 300, "advertised": MEMBERS, "peers": MEMBERS, "survivors": MEMBERS,
                                 **secure})
    posted = SiteTask(id=f"{letter}0001-munich-a1", kind=kind, round=1, site="munich",  # type: ignore[arg-type]
                      training="team-signs/signs", total_rounds=2, strategy="fedavg", architecture="tiny_cnn",
                      global_key="round-0000/global.safetensors", global_sha256="ab" * 32, deadline=1e10,
                      secure=settings)
    return parse_task(posted.to_json())


@pytest.fixture
def site(tmp_path: Path) -> tuple[DirectoryStore, SiteSecret]:
    """The training's store and munich's secret file (made by its first secure task)."""
    return DirectoryStore(tmp_path / "store"), SiteSecret(tmp_path / "munich" / "secure.key")


def advertised(store: DirectoryStore, secret: SiteSecret) -> Advertisement:
    secret.path.parent.mkdir(parents=True, exist_ok=True)
    assert run_task(store, task("keys"), DATA, CPU, secret) == {}
    return Advertisement.parse(store.read_bytes(LAYOUT.secure_message(1, 1, "munich", "keys.json")), CONTEXT,
                               "munich")


def others() -> dict[str, Advertisement]:
    return {c: keys(c).advertisement() for c in ("hamburg", "hq")}


def test_the_site_advertises_and_shares_in_its_own_folder_and_its_secret_stays_beside_it(
        site: tuple[DirectoryStore, SiteSecret]) -> None:
    store, secret = site
    mine = advertised(store, secret)
    assert secret.path.stat().st_mode & 0o077 == 0 and len(secret.path.read_bytes()) == 32
    assert mine == ClientKeys.derive(secret.path.read_bytes(), CONTEXT, "munich").advertisement()
    output = run_task(store, task("shares", advertisements=others()), DATA, CPU, secret)
    assert output == {"recipients": 3}
    shares = SharesMessage.parse(store.read_bytes(LAYOUT.secure_message(1, 1, "munich", "shares.json")), CONTEXT,
                                 "munich")
    assert open_share(keys("hq"), mine, shares).sender == "munich"  # hq, in the cluster, opens what it was sent
    answer = parse_result(store.read_bytes(LAYOUT.site_result("munich", "s0001-munich-a1")))
    assert answer.state == "succeeded" and answer.output == output
    stored = sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file())
    assert all(p.startswith("sites/munich/") for p in stored), stored
    assert secret.path.read_bytes() not in b"".join((store.root / p).read_bytes() for p in stored)


def test_a_shares_task_without_a_members_advertisement_fails_naming_it(
        site: tuple[DirectoryStore, SiteSecret]) -> None:
    store, secret = site
    advertised(store, secret)
    with pytest.raises(Exception, match="hamburg's key advertisement: the coordinator relayed none in the task"):
        run_task(store, task("shares", advertisements={"hq": keys("hq").advertisement()}), DATA, CPU, secret)


def relayed_shares(sender: str, master: bytes, context: Context = CONTEXT) -> SharesMessage:
    """``sender``'s shares for munich (whose secret is ``master``) as the relay passes them on: one ciphertext."""
    advertisements = {c: keys(c, context).advertisement() for c in MEMBERS if c != "munich"}
    munich = ClientKeys.derive(master, context, "munich").advertisement()
    return make_shares(keys(sender, context), {**advertisements, "munich": munich}, MEMBERS, 2).addressed_to("munich")


def hamburgs(kind: str, master: bytes) -> SharesMessage:
    """hamburg's share for munich from attempt 2 of the round (replayed), or presented as attempt 1's (forged)."""
    other = relayed_shares("hamburg", master, Context(IDENTITY, 1, 2))
    return other if kind == "replayed" else other.model_copy(update={"attempt": 1})


@pytest.mark.parametrize(("kind", "said"), [
    ("replayed", "hamburg's shares: of training 'team-signs/signs/0123abcd', round 1, attempt 2, not of "),
    ("forged", "hamburg's share for munich: fails authentication"),
])
def test_an_unmask_task_refuses_a_replayed_or_forged_share_by_name_and_reveals_the_rest(
        site: tuple[DirectoryStore, SiteSecret], kind: str, said: str) -> None:
    store, secret = site
    advertised(store, secret)
    master = secret.path.read_bytes()
    run_task(store, task("shares", advertisements=others()), DATA, CPU, secret)
    inbox = {"hq": relayed_shares("hq", master), "hamburg": hamburgs(kind, master)}
    output = run_task(store, task("unmask", advertisements=others(), shares=inbox), DATA, CPU, secret)
    assert output["opened"] == ["hq", "munich"]
    assert list(output["refused"]) == ["hamburg"] and output["refused"]["hamburg"].startswith(said), output
    reveal = Reveal.parse(store.read_bytes(LAYOUT.secure_message(1, 1, "munich", "reveal.json")), CONTEXT, "munich")
    assert sorted(reveal.seeds) == ["hq", "munich"] and reveal.masking_keys == {}


def test_a_secure_task_needs_the_sites_secret_and_a_usable_one(site: tuple[DirectoryStore, SiteSecret]) -> None:
    store, secret = site
    with pytest.raises(BadInputError, match="--secret-file must name the site's master secret"):
        run_task(store, task("keys"), DATA, CPU, None)
    secret.path.parent.mkdir(parents=True)
    secret.path.write_bytes(b"short")
    with pytest.raises(BadInputError, match="a secure-aggregation secret is 32 bytes, this one 5"):
        run_task(store, task("keys"), DATA, CPU, secret)
    given = dataclasses.replace(secret, path=secret.path.with_name("mounted.key"), provided=True)
    with pytest.raises(BadInputError, match="never made here"):
        run_task(store, task("keys"), DATA, CPU, given)
    assert not list(store.root.rglob("keys.json"))
