"""The per-site bucket policy, enforced by the store: a site reads the global models and its own folder only,
writes and lists only its own folder; the coordinator does everything under the training.

The store is moto behind `tests.strict_s3`, which evaluates the listing grant's ``s3:prefix``
condition and answers 403 for a missing key to a user without unconditional ``s3:ListBucket``, as
AWS S3 does (moto alone does neither).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, cast

import boto3
import pytest
from botocore.exceptions import ClientError

from fedtrain.cli import main
from fedtrain.contract.errors import BadDataError, BadInputError
from fedtrain.contract.layout import Layout
from fedtrain.contract.storage import ABSENCE_TRUSTED_SECONDS, S3Store, Store
from fedtrain.sites.bucket_policy import coordinator_policy, site_policy
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
    assert "AccessDenied" in str(caught.value) or "(403)" in str(caught.value)  # a HEAD's 403 has no body
    return str(caught.value)


def raw_client(federation: FederationStore, user: str) -> object:
    key_id, secret = federation.keys[user]
    return boto3.client("s3", endpoint_url=federation.endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                        aws_secret_access_key=secret)


def error_code(action: Callable[[], object]) -> str:
    with pytest.raises(ClientError) as caught:
        action()
    return str(caught.value.response["Error"]["Code"])


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
    refused(lambda: published.store("munich", "team/other-00000000").read_bytes(GLOBAL))


def test_a_site_lists_its_own_folder_and_nothing_else(published: FederationStore) -> None:
    munich = published.store("munich")
    munich.write_bytes(LAYOUT.client_update(2, "munich"), b"munich's round 2")
    assert LAYOUT.client_update(2, "munich") in munich.list("sites/munich")
    assert LAYOUT.site_task("munich") in munich.list("sites/munich/")
    for folder in ("sites/hamburg", "sites", "", "round-0000", "sites/munich-2"):
        refused(partial(munich.list, folder))
    refused(lambda: published.store("munich", "team/other-00000000").list("sites/munich"))
    # Below the store: a prefix without its final "/" would match munich-2's folder too.
    client: Any = raw_client(published, "munich")
    base = f"{PREFIX}/{TRAINING_ID}"
    for prefix in (f"{base}/sites/munich", f"{base}/sites/hamburg/", f"{base}/", f"{PREFIX}/team/other-00000000/sites/"
                   "munich/", None):
        arguments = {"Bucket": BUCKET, **({"Prefix": prefix} if prefix is not None else {})}
        assert error_code(partial(client.list_objects_v2, **arguments)) == "AccessDenied"
        assert error_code(partial(client.list_objects, **arguments)) == "AccessDenied"
    assert client.list_objects_v2(Bucket=BUCKET, Prefix=f"{base}/sites/munich/")["KeyCount"] >= 2


def test_a_missing_key_in_its_own_folder_is_missing_not_refused(published: FederationStore) -> None:
    """AWS answers 403 to the HEAD (the listing grant's condition needs a prefix); the store lists the key instead."""
    munich, answer = published.store("munich"), LAYOUT.site_result("munich", "r0009-munich-a1")
    client: Any = raw_client(published, "munich")
    key = f"{PREFIX}/{TRAINING_ID}/{answer}"
    assert error_code(lambda: client.head_object(Bucket=BUCKET, Key=key)) == "403"
    assert error_code(lambda: client.get_object(Bucket=BUCKET, Key=key)) == "AccessDenied"
    assert munich.exists(answer) is False
    with pytest.raises(BadDataError, match="missing"):
        munich.read_bytes(answer)
    with pytest.raises(BadDataError, match="missing"):
        munich.read_bounded(answer, 100)
    assert munich.exists(LAYOUT.site_task("munich")) is True
    # Outside its folder nothing is learnt: hamburg's keys, present or not, and the manifest stay refused.
    refused(lambda: munich.exists(HAMBURG_UPDATE))
    refused(lambda: munich.exists(LAYOUT.site_result("hamburg", "r0001-hamburg-a1")))
    refused(lambda: munich.exists(LAYOUT.manifest))
    refused(lambda: munich.read_bytes(LAYOUT.global_weights(7)))  # a global model not written yet: 403 too
    assert published.store("coordinator").exists(answer) is False  # the coordinator's HEAD gets its 404


def test_a_listed_absence_answers_for_its_key_for_ten_minutes(published: FederationStore) -> None:
    """A site waiting for a key of its own folder lists it once per `ABSENCE_TRUSTED_SECONDS`, not on every 403."""
    munich, answer = cast(S3Store, published.store("munich")), LAYOUT.site_result("munich", "r0010-munich-a1")
    listings: list[dict[str, Any]] = []
    listing = munich.client.list_objects_v2
    munich.client.list_objects_v2 = lambda **request: listings.append(request) or listing(**request)  # type: ignore[method-assign]
    assert [munich.exists(answer) for _ in range(3)] == [False] * 3  # three 403s
    assert len(listings) == 1
    munich.absent_since[answer] -= ABSENCE_TRUSTED_SECONDS  # ten minutes later: listed again
    assert munich.exists(answer) is False and len(listings) == 2
    published.store("coordinator").write_bytes(answer, b"{}")  # written meanwhile by another party
    assert munich.exists(answer) is True and munich.read_bytes(answer) == b"{}"  # a readable key: never hidden
    assert len(listings) == 2
    refused(lambda: munich.exists(HAMBURG_UPDATE))  # outside its folder: no listing is allowed, nothing stands
    refused(lambda: munich.exists(HAMBURG_UPDATE))


def test_the_coordinator_does_everything_under_the_training(published: FederationStore) -> None:
    coordinator = published.store("coordinator")
    coordinator.write_bytes(LAYOUT.global_weights(1), b"round 1")
    assert coordinator.read_bytes(HAMBURG_UPDATE) == b"hamburg's update"
    assert HAMBURG_UPDATE in coordinator.list("sites/")
    refused(lambda: published.store("coordinator", "team/other-00000000").write_bytes(GLOBAL, b"x"))


def test_the_policies_come_from_the_layouts_grants() -> None:
    statements = site_policy(BUCKET, PREFIX, TRAINING_ID, "munich")["Statement"]
    assert [s["Action"] for s in statements[:2]] == [["s3:GetObject"], ["s3:PutObject", "s3:AbortMultipartUpload"]]
    assert statements[2]["Effect"] == "Deny"
    assert statements[1]["Resource"] == [f"arn:aws:s3:::{BUCKET}/{PREFIX}/{TRAINING_ID}/sites/munich/results/*",
                                         f"arn:aws:s3:::{BUCKET}/{PREFIX}/{TRAINING_ID}/sites/munich/round-*"]
    assert statements[3] == {"Sid": "ListOwnFolderOnly", "Effect": "Allow", "Action": ["s3:ListBucket"],
                             "Resource": [f"arn:aws:s3:::{BUCKET}"], "Condition": {"StringLike": {
                                 "s3:prefix": [f"{PREFIX}/{TRAINING_ID}/sites/munich/*"]}}}
    assert len(statements) == 4
    assert coordinator_policy(BUCKET, PREFIX, TRAINING_ID)["Statement"][0]["Resource"] == [
        f"arn:aws:s3:::{BUCKET}/{PREFIX}/{TRAINING_ID}/*"]


@pytest.mark.parametrize("site", ["*", "munich/*", "../hamburg", "sites/munich", "Munich", "", "a" * 64, "munich?"])
def test_a_policy_is_for_exactly_one_site(site: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(BadInputError, match="is not one site's name"):
        site_policy(BUCKET, PREFIX, TRAINING_ID, site)
    code = main(["site", "policy", "--bucket", BUCKET, "--training-id", TRAINING_ID, "--site", site])
    assert code == 2 and "a policy covers exactly one site" in " ".join(capsys.readouterr().err.split())
