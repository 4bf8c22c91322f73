"""The test store's IAM evaluator (`tests.strict_s3.allowed`): what moto leaves out, decided as AWS does."""

from __future__ import annotations

from typing import Any

import pytest

from fedtrain.sites.bucket_policy import coordinator_policy, site_policy
from tests.strict_s3 import UnsupportedPolicy, access_key_of, allowed

BUCKET_ARN = "arn:aws:s3:::federation"
MUNICH = site_policy("federation", "fed", "team/signs-1a2b3c4d", "munich")
COORDINATOR = coordinator_policy("federation", "fed", "team/signs-1a2b3c4d")


@pytest.mark.parametrize(("policy", "context", "expected"), [
    (MUNICH, {"s3:prefix": "fed/team/signs-1a2b3c4d/sites/munich/"}, True),
    (MUNICH, {"s3:prefix": "fed/team/signs-1a2b3c4d/sites/munich/results/r0001-munich-a1.json"}, True),
    (MUNICH, {"s3:prefix": "fed/team/signs-1a2b3c4d/sites/munich"}, False),  # would match munich-2/
    (MUNICH, {"s3:prefix": "fed/team/signs-1a2b3c4d/sites/hamburg/"}, False),
    (MUNICH, {"s3:prefix": "fed/team/signs-1a2b3c4d/"}, False),
    (MUNICH, {"s3:prefix": "fed/team/other-00000000/sites/munich/"}, False),
    (MUNICH, {"s3:prefix": ""}, False),
    (MUNICH, {}, False),  # a GET or HEAD carries no prefix: no 404 for a missing key
    (COORDINATOR, {}, True),
    (COORDINATOR, {"s3:prefix": "anything/"}, True),
])
def test_listing_is_decided_on_the_requests_prefix(policy: dict[str, Any], context: dict[str, str],
                                                   expected: bool) -> None:
    assert allowed([policy], "s3:ListBucket", BUCKET_ARN, context) is expected


def test_an_explicit_deny_wins_and_actions_and_resources_match_with_wildcards() -> None:
    task = "arn:aws:s3:::federation/fed/team/signs-1a2b3c4d/sites/munich/task.json"
    assert allowed([MUNICH], "s3:GetObject", task, {})
    assert not allowed([MUNICH], "s3:PutObject", task, {})  # allowed by no statement, and denied by one
    update = "arn:aws:s3:::federation/fed/team/signs-1a2b3c4d/sites/munich/round-0001/update-a1.safetensors"
    assert allowed([MUNICH], "S3:putobject", update, {})  # action names are case-insensitive, resources are not
    assert not allowed([MUNICH], "s3:PutObject", update.replace("munich", "MUNICH"), {})
    assert not allowed([MUNICH], "s3:DeleteObject", update, {})


def test_what_it_cannot_decide_fails_loudly() -> None:
    for statement in ({"Effect": "Allow", "Action": "s3:ListBucket", "Resource": BUCKET_ARN,
                       "Condition": {"StringNotLike": {"s3:prefix": "x/*"}}},
                      {"Effect": "Allow", "NotAction": "s3:GetObject", "Resource": BUCKET_ARN},
                      {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": BUCKET_ARN,
                       "Condition": {"StringLike": {"s3:prefix": "${aws:username}/*"}}}):
        with pytest.raises(UnsupportedPolicy):
            allowed([{"Statement": [statement]}], "s3:ListBucket", BUCKET_ARN, {"s3:prefix": "x/"})


def test_the_signer_is_read_from_the_header_or_a_presigned_url() -> None:
    header = ("AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/20250101/us-east-1/s3/aws4_request, SignedHeaders=host, "
              "Signature=0")
    assert access_key_of({"HTTP_AUTHORIZATION": header}) == "AKIAEXAMPLE"
    assert access_key_of({"QUERY_STRING": "X-Amz-Credential=AKIAOTHER%2F20250101%2Fus-east-1%2Fs3"}) == "AKIAOTHER"
    assert access_key_of({}) is None
