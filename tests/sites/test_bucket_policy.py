"""The per-site bucket policy, enforced by the store: a site reads the global models and its own folder only,
and writes only its own folder; the coordinator does everything under the training."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fedtrain.cli import main
from fedtrain.sites.bucket_policy import coordinator_policy, site_policy
from fedtrain.worker.errors import BadInputError
from fedtrain.worker.layout import Layout
from fedtrain.worker.storage import Store
from tests.sites.conftest import BUCKET, PREFIX, TRAINING_ID, FederationStore

LAYOUT = Layout(sites=frozenset({"munich", "hamburg"}))
GLOBAL = LAYOUT.global_weights(0)
HAMBURG_UPDATE = LAYOUT.client_update(1, "hamburg")


@pytest.fixture(scope="module")
def published(federation_store: FederationStore) -> FederationStore:
    """What the coordinator and hamburg wrote before munich looks: the initial model, hamburg's update."""
    coordinator = federation_store.store("coordinator")
    coordinator.write_bytes(GLOBAL, b"global weights")
    coordinator.write_bytes(GLOBAL.replace(".safetensors", ".json"), b"{}")
    coordinator.write_bytes(LAYOUT.manifest, b"{}")
    coordinator.write_bytes(LAYOUT.site_task("munich"), b"{}")
    federation_store.store("hamburg").write_bytes(HAMBURG_UPDATE, b"hamburg's update")
    return federation_store


def refused(action: Callable[[], object]) -> str:
    with pytest.raises(BadInputError) as caught:
        action()
    assert "AccessDenied" in str(caught.value)
    return str(caught.value)


def test_a_site_reads_the_global_models_and_its_task(published: FederationStore) -> None:
    munich = published.store("munich")
    assert munich.read_bytes(GLOBAL) == b"global weights"
    assert munich.read_bytes(GLOBAL.replace(".safetensors", ".json")) == b"{}"
    assert munich.read_bytes(LAYOUT.site_task("munich")) == b"{}"


def test_a_site_writes_its_own_folder(published: FederationStore) -> None:
    munich: Store = published.store("munich")
    update = LAYOUT.client_update(1, "munich")
    munich.write_bytes(update, b"munich's update")
    munich.write_bytes(LAYOUT.site_result("munich", "r0001-munich-a1"), b"{}")
    assert munich.read_bytes(update) == b"munich's update"
    assert published.store("coordinator").read_bytes(update) == b"munich's update"


def test_a_site_cannot_touch_another_sites_folder(published: FederationStore) -> None:
    munich = published.store("munich")
    refused(lambda: munich.read_bytes(HAMBURG_UPDATE))
    refused(lambda: munich.write_bytes(HAMBURG_UPDATE, b"poisoned"))
    refused(lambda: munich.write_bytes(LAYOUT.site_result("hamburg", "r0001-hamburg-a1"), b"{}"))
    assert published.store("hamburg").read_bytes(HAMBURG_UPDATE) == b"hamburg's update"


def test_a_site_cannot_write_global_models_or_read_the_rest(published: FederationStore) -> None:
    munich = published.store("munich")
    refused(lambda: munich.write_bytes(LAYOUT.global_weights(1), b"forged global"))
    refused(lambda: munich.write_bytes(GLOBAL, b"forged initial model"))
    refused(lambda: munich.read_bytes(LAYOUT.manifest))
    refused(lambda: munich.write_bytes(LAYOUT.site_task("munich"), b"{}"))  # its task is the coordinator's to write
    # Listing is granted (AWS answers 403 for a missing key otherwise): names are visible, contents are not.
    assert HAMBURG_UPDATE in munich.list("sites/")
    refused(lambda: published.store("munich", "team/other-00000000").read_bytes(GLOBAL))


def test_the_coordinator_does_everything_under_the_training(published: FederationStore) -> None:
    coordinator = published.store("coordinator")
    coordinator.write_bytes(LAYOUT.global_weights(1), b"round 1")
    assert coordinator.read_bytes(HAMBURG_UPDATE) == b"hamburg's update"
    assert HAMBURG_UPDATE in coordinator.list("sites/")
    refused(lambda: published.store("coordinator", "team/other-00000000").write_bytes(GLOBAL, b"x"))


def test_the_policies_come_from_the_layouts_grants() -> None:
    statements = site_policy(BUCKET, PREFIX, TRAINING_ID, "munich", list_bucket=False)["Statement"]
    assert [s["Action"] for s in statements[:2]] == [["s3:GetObject"], ["s3:PutObject", "s3:AbortMultipartUpload"]]
    assert statements[2]["Effect"] == "Deny"
    assert statements[1]["Resource"] == [f"arn:aws:s3:::{BUCKET}/{PREFIX}/{TRAINING_ID}/sites/munich/results/*",
                                         f"arn:aws:s3:::{BUCKET}/{PREFIX}/{TRAINING_ID}/sites/munich/round-*"]
    assert len(statements) == 3
    listing = site_policy(BUCKET, PREFIX, TRAINING_ID, "munich")["Statement"][-1]
    assert listing["Action"] == ["s3:ListBucket"]
    assert coordinator_policy(BUCKET, PREFIX, TRAINING_ID)["Statement"][0]["Resource"] == [
        f"arn:aws:s3:::{BUCKET}/{PREFIX}/{TRAINING_ID}/*"]


@pytest.mark.parametrize("site", ["*", "munich/*", "../hamburg", "sites/munich", "Munich", "", "a" * 64, "munich?"])
def test_a_policy_is_for_exactly_one_site(site: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(BadInputError, match="is not one site's name"):
        site_policy(BUCKET, PREFIX, TRAINING_ID, site)
    code = main(["site", "policy", "--bucket", BUCKET, "--training-id", TRAINING_ID, "--site", site])
    assert code == 2 and "a policy covers exactly one site" in " ".join(capsys.readouterr().err.split())
