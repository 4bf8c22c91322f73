"""A store's environment for the operator's own client, from an `S3Spec` and its credentials Secret.

Both roles of the operator read an object store with a Secret's keys: the coordinator to post and
read site tasks, a site to read its task and answer it. The Secret is read by name only (never
listed or watched) and its values stay in this process's memory; worker Pods get the same keys by
``secretKeyRef`` instead.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from pathlib import Path

from fedtrain.contract.errors import BadInputError
from fedtrain.contract.storage import S3_ENV
from fedtrain.operator.kube import Kube, Paths
from fedtrain.spec import S3Spec
from fedtrain.tasks import s3_environment


async def secret_environment(kube: Kube, namespace: str, s3: S3Spec, field: str) -> tuple[dict[str, str], str]:
    """The store's whole environment with the keys of ``s3.credentialsSecret``, and the Secret's resourceVersion.

    ``field`` is where the spec names the Secret (``spec.store.s3.credentialsSecret``), for the error a
    Secret without the named keys raises (`BadInputError`). A CA bundle from ``tls.caConfigMap`` is
    written to a file (`ca_file`), which boto3 reads.
    """
    ref = s3.credentials_secret
    assert ref is not None
    secret = await kube.get(Paths.core(namespace, "secrets", ref.name))
    data = secret.get("data") or {}
    missing = [key for key in (ref.access_key_id_key, ref.secret_access_key_key) if key not in data]
    if missing:
        raise BadInputError(f"{field}: Secret {namespace}/{ref.name} has no key {missing[0]}; add it or name the "
                            "right key (accessKeyIdKey, secretAccessKeyKey)")
    environment = {**s3_environment(s3), S3_ENV["credentials_from"]: f"Secret {namespace}/{ref.name}",
                   S3_ENV["access_key_id"]: base64.b64decode(data[ref.access_key_id_key]).decode(),
                   S3_ENV["secret_access_key"]: base64.b64decode(data[ref.secret_access_key_key]).decode()}
    if s3.tls.ca_config_map is not None:
        found = await kube.get(Paths.core(namespace, "configmaps", s3.tls.ca_config_map.name))
        environment[S3_ENV["ca_bundle"]] = ca_file((found.get("data") or {}).get(s3.tls.ca_config_map.key, ""))
    return environment, str(secret["metadata"].get("resourceVersion", ""))


def ca_file(bundle: str) -> str:
    """A file holding ``bundle`` (boto3 reads a path), named by its sha256: one file per bundle, not per call."""
    path = Path(tempfile.gettempdir()) / f"fedtrain-ca-{hashlib.sha256(bundle.encode()).hexdigest()[:16]}.pem"
    if not path.exists():
        partial = path.with_suffix(f".{os.getpid()}.part")
        partial.write_text(bundle)
        partial.replace(path)
    return str(path)
