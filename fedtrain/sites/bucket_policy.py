"""IAM policies for a federation's object store: what each site's key, and the coordinator's, may do.

A site's key may read the training's global models and its own folder (``sites/<site>/``: its
task, its answers, its updates) and write only its own folder, but not its task there, which is
the coordinator's; it can neither read nor overwrite another site's update or scores. The key
patterns come from `fedtrain.contract.layout.site_grants`, the one source of what a site touches;
this module only turns them into AWS/MinIO policy JSON (``fedtrain site policy`` prints it). The
coordinator's key may do anything under the training.

A site may list only its own folder: ``s3:ListBucket`` on the bucket with the condition
``StringLike s3:prefix <prefix>/<training id>/sites/<site>/*``. AWS S3 and MinIO both evaluate
``s3:prefix`` on a ListObjects/ListObjectsV2 request against the request's ``prefix`` parameter; a
listing without a prefix, or with one outside the folder (another site's, the training's root,
another training's), matches no grant and is refused with 403 AccessDenied. So a site sees no key
name, size or date beyond what it may read anyway.

That grant does not make AWS S3 answer 404 for a GET or HEAD of a missing key in the site's folder
(its task before the coordinator posts it, its answer before it wrote one): AWS answers 404 only to
a caller with ``s3:ListBucket`` on the bucket, and such a request carries no prefix, so the
conditioned grant does not apply and the answer is 403. MinIO answers 404 to any authenticated
caller that may read the key. The site's store tells the two apart by listing exactly that key
(`fedtrain.contract.storage.S3Store`), which the condition allows.
"""

from __future__ import annotations

import re
from typing import Any

from fedtrain.contract.errors import BadInputError
from fedtrain.contract.layout import Layout, site_grants
from fedtrain.contract.sitetask import NAME_PATTERN

MAX_SITE_NAME = 63  # a DNS label, as the wire format's site names

POLICY_VERSION = "2012-10-17"
READ_ACTIONS = ["s3:GetObject"]
# Uploads larger than a part go up in parts: PutObject covers creating and completing them.
WRITE_ACTIONS = ["s3:PutObject", "s3:AbortMultipartUpload"]


def training_key(prefix: str, training_id: str, pattern: str = "") -> str:
    """``prefix/training_id/pattern`` with empty pieces left out: a key (or key pattern) in the bucket."""
    return "/".join(p.strip("/") for p in (prefix, training_id, pattern) if p.strip("/"))


def training_arn(bucket: str, prefix: str, training_id: str, pattern: str = "") -> str:
    """``arn:aws:s3:::bucket/prefix/training_id/pattern`` with empty pieces left out."""
    path = training_key(prefix, training_id, pattern)
    return f"arn:aws:s3:::{bucket}/{path}" if path else f"arn:aws:s3:::{bucket}"


def check_site_name(site: str) -> None:
    """Refuse what is not exactly one site's name: ``*`` or ``munich/..`` in an ARN would grant every site's folder."""
    if not re.fullmatch(NAME_PATTERN, site) or len(site) > MAX_SITE_NAME:
        raise BadInputError(f"--site {site!r} is not one site's name: use the name of its clients.list entry (lower "
                            f"case letters, digits and '-', at most {MAX_SITE_NAME} characters); a policy covers "
                            "exactly one site")


def site_policy(bucket: str, prefix: str, training_id: str, site: str) -> dict[str, Any]:
    """The IAM policy of one site's key: read the global models and its own folder, write and list only its folder."""
    check_site_name(site)
    grants = site_grants(site)
    folder = Layout().site_dir(site)
    return {"Version": POLICY_VERSION, "Statement": [
        {"Sid": "ReadGlobalModelsAndOwnFolder", "Effect": "Allow", "Action": READ_ACTIONS,
         "Resource": [training_arn(bucket, prefix, training_id, p) for p in grants["read"]]},
        {"Sid": "WriteOwnFolder", "Effect": "Allow", "Action": WRITE_ACTIONS,
         "Resource": [training_arn(bucket, prefix, training_id, p) for p in grants["write"]]},
        # The task in the site's folder is the coordinator's word: the site reads it, never rewrites it.
        {"Sid": "TaskIsTheCoordinators", "Effect": "Deny", "Action": [*WRITE_ACTIONS, "s3:DeleteObject"],
         "Resource": [training_arn(bucket, prefix, training_id, Layout().site_task(site))]},
        # Only listings of its own folder: "<folder>/" and below, never "<folder>" (that would match munich-2/).
        {"Sid": "ListOwnFolderOnly", "Effect": "Allow", "Action": ["s3:ListBucket"],
         "Resource": [f"arn:aws:s3:::{bucket}"],
         "Condition": {"StringLike": {"s3:prefix": [f"{training_key(prefix, training_id, folder)}/*"]}}},
    ]}


def coordinator_policy(bucket: str, prefix: str, training_id: str) -> dict[str, Any]:
    """The IAM policy of the coordinator's key: everything under the training, and listing the bucket."""
    return {"Version": POLICY_VERSION, "Statement": [
        {"Sid": "Training", "Effect": "Allow", "Action": ["s3:*"],
         "Resource": [training_arn(bucket, prefix, training_id, "*")]},
        {"Sid": "List", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [f"arn:aws:s3:::{bucket}"]},
    ]}
