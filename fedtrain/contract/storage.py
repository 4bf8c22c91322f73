"""Where a training's files live: a directory (a PVC or a local folder) or an S3-compatible bucket.

Every worker command reads and writes through one small `Store` interface, addressed by keys that
`layout` names (``round-0001/global.safetensors``), so the same command runs on a claim, a laptop
folder or an object store. A training's location is one string, the worker's ``--workdir``:

- ``/store/team-a/signs-1a2b3c4d`` or ``runs/signs``: a directory;
- ``s3://bucket/prefix/team-a/signs-1a2b3c4d``: an object store, configured from the environment
  (`S3_ENV`), which the operator fills from the spec and the credentials Secret.

Writes are atomic on both: a directory writes a temporary file and renames it; S3 makes an object
visible only once its PUT (or multipart upload) completes, so a killed writer leaves the old object
or none, never half of one. Weights also carry a sha256 in their sidecar, checked on every read.
Large files stream in both directions (multipart, 8 MiB parts) instead of sitting in memory.

Failures are sorted by what helps. botocore retries short hiccups itself (standard mode: connection
errors, timeouts, HTTP 5xx, 429 and throttling answers, with exponential back-off and jitter, up to
``FEDTRAIN_S3_MAX_ATTEMPTS`` attempts per request); what outlasts that is a `TemporaryStorageError`
(exit 75: run the task again later). Refused credentials are a `BadInputError` naming the Secret, a
missing bucket a `BadInputError` naming the spec field, a missing or corrupt object a `BadDataError`.

This module imports neither torch nor boto3 at import time: the operator uses its names.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlparse

from fedtrain.contract.errors import BadDataError, BadInputError, TemporaryStorageError, TooLargeError

# The environment contract between the operator (which fills it) and the worker (which reads it).
S3_ENV = {
    "endpoint": "FEDTRAIN_S3_ENDPOINT",  # https://minio.example:9000; empty: AWS
    "region": "FEDTRAIN_S3_REGION",
    "addressing_style": "FEDTRAIN_S3_ADDRESSING_STYLE",  # path | virtual
    "ca_bundle": "FEDTRAIN_S3_CA_BUNDLE",  # a PEM file trusted for the endpoint
    "verify_tls": "FEDTRAIN_S3_VERIFY_TLS",  # "false" turns verification off (test endpoints only)
    "credentials_from": "FEDTRAIN_S3_CREDENTIALS_FROM",  # e.g. "Secret team-a/fedtrain-s3": named in errors
    "max_attempts": "FEDTRAIN_S3_MAX_ATTEMPTS",  # attempts per request, the first included; default 5
    "access_key_id": "AWS_ACCESS_KEY_ID",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY",
}
PART_SIZE = 8 * 1024 * 1024
CREDENTIAL_ERRORS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                     "InvalidClientTokenId", "AccessDenied", "Forbidden", "403")
# Answers that say "not now" rather than "no": with HTTP 5xx and 429 they are worth another try later.
TEMPORARY_ERRORS = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
                    "ServiceUnavailable", "InternalError", "TooManyRequests", "RequestLimitExceeded",
                    "TooManyRequestsException", "429")
MAX_ATTEMPTS = 5
# How long a listing that showed a key absent answers for that key's 403s (`S3Store.listed_absent`): a
# site waiting for its first posting on AWS lists once per this, not once per read.
ABSENCE_TRUSTED_SECONDS = 600.0


class Store(Protocol):
    """A training's files by key (``round-0001/clients/c.safetensors``); keys use ``/`` everywhere."""

    @property
    def location(self) -> str:
        """The training's ``--workdir``: a directory or ``s3://bucket/prefix``."""
        ...

    @property
    def reads_are_local(self) -> bool:
        """Whether a read is a local file read: no request charge, no round trip; what polls it may poll often."""
        ...

    def describe(self, key: str) -> str:
        """Where ``key`` is, for messages: a path or an ``s3://`` URL."""
        ...

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds a complete file."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """The whole file; `BadDataError` naming it when it is missing."""
        ...

    def read_bounded(self, key: str, limit: int) -> bytes:
        """The whole file if it holds at most ``limit`` bytes; past that a `BadDataError`, without reading it whole.

        For what others wrote (a site's answer, an update's sidecar): its size is known before its
        bytes are, and at most ``limit + 1`` bytes are read, so no file can make its reader's memory grow.
        """
        ...

    def read_if_changed(self, key: str, limit: int, seen: str | None) -> Version:
        """The file if its version differs from ``seen`` (a tag a previous answer gave), within ``limit`` bytes.

        For what is polled (a site's ``task.json``): an unchanged file costs one conditional request
        (S3: a GET with If-None-Match, answered 304 without a body; a directory: one local read,
        tagged by its digest) instead of an existence check and a read.
        """
        ...

    def write_bytes(self, key: str, data: bytes) -> None:
        """Replace ``key`` atomically: readers see the old file or the new one."""
        ...

    def upload(self, key: str, source: Path) -> None:
        """Stream a local file to ``key``, atomically."""
        ...

    def download(self, key: str, target: Path) -> None:
        """Stream ``key`` into a local file (written atomically too)."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (a folder such as ``round-0001/clients/``), sorted, at any depth."""
        ...

    def remove_all(self) -> int:
        """Delete every file of this training; how many were deleted."""
        ...


@dataclass(frozen=True)
class Version:
    """What a conditional read found: the file's bytes when it changed, its tag, whether it exists."""

    data: bytes | None  # None: unchanged since ``seen``, or missing
    tag: str | None  # the version read (an ETag, or a local file's sha256); None: missing
    changed: bool  # the version differs from the one the caller had seen

    @property
    def missing(self) -> bool:
        """Whether there is no such file now."""
        return self.tag is None


def open_store(location: str, environment: Mapping[str, str] | None = None) -> Store:
    """The store behind a ``--workdir``: ``s3://bucket/prefix`` or a directory path."""
    if location.startswith("s3://"):
        return S3Store.from_url(location, environment if environment is not None else os.environ)
    if "://" in location and not location.startswith("file://"):
        scheme = location.split("://", 1)[0]
        raise BadInputError(f"--workdir {location}: scheme {scheme}:// is not supported (use a path or s3://)")
    return DirectoryStore(Path(location.removeprefix("file://")))


def s3_location(bucket: str, prefix: str, *parts: str) -> str:
    """``s3://bucket/prefix/part/part`` with empty pieces left out."""
    path = "/".join(p.strip("/") for p in (prefix, *parts) if p.strip("/"))
    return f"s3://{bucket}/{path}" if path else f"s3://{bucket}"


def too_large(where: str, size: int | str, limit: int) -> TooLargeError:
    """The refusal of a file over its limit (`Store.read_bounded`)."""
    return TooLargeError(f"{where}: {size} bytes, over the {limit} bytes allowed for it; refused without reading it")


def _check_key(key: str) -> str:
    """Keys are relative and never climb out of the training (a client name ends up in one)."""
    pure = PurePosixPath(key)
    if not key or pure.is_absolute() or ".." in pure.parts:
        raise BadInputError(f"storage key {key!r} must be a relative path inside the training")
    return key


# --- directory ------------------------------------------------------------------------------------


class _Missing(BadDataError):
    """No file behind a key in a directory store (a conditional read reports it; anything else it raises)."""


@dataclass(frozen=True)
class DirectoryStore:
    """A training's directory on a claim or a local disk."""

    root: Path

    @property
    def location(self) -> str:
        return str(self.root)

    @property
    def reads_are_local(self) -> bool:
        return True

    def path(self, key: str) -> Path:
        """The file behind ``key`` (local stores only: plots and MLflow's sqlite sit beside the weights)."""
        return self.root / _check_key(key)

    def describe(self, key: str) -> str:
        return str(self.path(key))

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def _inside(self, key: str) -> Path:
        """The file behind ``key``, refused if its folder leads out of the store through a link."""
        path = self.path(key)
        if not path.parent.resolve().is_relative_to(self.root.resolve()):
            raise BadDataError(f"{self.describe(key)}: its folder leads out of the store (a link); refused")
        return path

    def _open(self, key: str) -> BinaryIO:
        """The file behind ``key``, opened to read only if it is a regular file in the store.

        Whoever shares the directory (a site on the same machine or filesystem) writes its folder:
        a link there could lead a read to a file of the coordinator's, and a named pipe would block
        the reader's open for ever. Both are refused, as a missing file is, by name.
        """
        path = self._inside(key)
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError) as error:
            raise _Missing(f"{self.describe(key)}: missing") from error
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise BadDataError(f"{self.describe(key)}: a link, not a file; refused") from error
            raise
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            os.close(descriptor)
            if stat.S_ISDIR(mode):
                raise _Missing(f"{self.describe(key)}: missing")
            raise BadDataError(f"{self.describe(key)}: not a regular file; refused")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")

    def read_bytes(self, key: str) -> bytes:
        with self._open(key) as stream:
            return stream.read()

    def read_bounded(self, key: str, limit: int) -> bytes:
        with self._open(key) as stream:
            size = os.fstat(stream.fileno()).st_size
            if size > limit:
                raise too_large(self.describe(key), size, limit)
            data = stream.read(limit + 1)  # at most one byte more: a file that grew since fstat is refused too
        if len(data) > limit:
            raise too_large(self.describe(key), f"more than {limit}", limit)
        return data

    def read_if_changed(self, key: str, limit: int, seen: str | None) -> Version:
        # A local read costs what a stat costs, and a file rewritten in place within one clock tick keeps its
        # size and mtime: the tag is the content's digest, so no change is ever taken for none.
        try:
            data = self.read_bounded(key, limit)
        except _Missing:
            return Version(None, None, seen is not None)
        tag = hashlib.sha256(data).hexdigest()
        return Version(None, tag, False) if tag == seen else Version(data, tag, True)

    def write_bytes(self, key: str, data: bytes) -> None:
        with _atomic_file(self._inside(key)) as stream:
            stream.write(data)

    def upload(self, key: str, source: Path) -> None:
        with source.open("rb") as reader, _atomic_file(self._inside(key)) as stream:
            shutil.copyfileobj(reader, stream, PART_SIZE)

    def download(self, key: str, target: Path) -> None:
        with self._open(key) as reader, _atomic_file(target) as stream:
            shutil.copyfileobj(reader, stream, PART_SIZE)

    def list(self, prefix: str) -> list[str]:
        folder = self.root / prefix
        if not folder.is_dir():
            return []
        found = (p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        return sorted(p.relative_to(self.root).as_posix() for p in found)

    def remove_all(self) -> int:
        if not self.root.exists():
            return 0
        count = sum(1 for p in self.root.rglob("*") if p.is_file())
        shutil.rmtree(self.root)
        return count


class _atomic_file:
    """A writable file that appears at ``path`` only when closed without an error (temp file + rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, self.temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.stream = os.fdopen(handle, "wb")
        return self.stream

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        try:
            if kind is None:
                self.stream.flush()
                os.fsync(self.stream.fileno())
            self.stream.close()
            if kind is None:
                os.replace(self.temporary, self.path)
        finally:
            Path(self.temporary).unlink(missing_ok=True)


# --- S3 -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Settings:
    """How to reach the object store; read from the environment (`S3_ENV`)."""

    endpoint: str | None = None
    region: str | None = None
    addressing_style: str = "path"
    ca_bundle: str | None = None
    verify_tls: bool = True
    credentials_from: str = "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    max_attempts: int = MAX_ATTEMPTS

    @classmethod
    def from_environment(cls, environment: Mapping[str, str]) -> S3Settings:
        """Settings from ``FEDTRAIN_S3_*`` and the AWS credential variables; wrong values are named."""
        values = {field: environment.get(name) or None for field, name in S3_ENV.items()}
        style = values["addressing_style"] or "path"
        if style not in ("path", "virtual"):
            raise BadInputError(f"{S3_ENV['addressing_style']}={style!r}: use path or virtual")
        verify = (values["verify_tls"] or "true").lower()
        if verify not in ("true", "false"):
            raise BadInputError(f"{S3_ENV['verify_tls']}={verify!r}: use true or false")
        if values["ca_bundle"] and not Path(values["ca_bundle"]).is_file():
            raise BadInputError(f"{S3_ENV['ca_bundle']}={values['ca_bundle']}: no such file")
        attempts = values["max_attempts"] or str(MAX_ATTEMPTS)
        if not attempts.isdigit() or int(attempts) < 1:
            raise BadInputError(f"{S3_ENV['max_attempts']}={attempts!r}: use a whole number of attempts, 1 or more")
        return cls(values["endpoint"], values["region"], style, values["ca_bundle"], verify == "true",
                   values["credentials_from"] or cls.credentials_from, values["access_key_id"],
                   values["secret_access_key"], int(attempts))


class S3Store:
    """A training's files as objects under ``s3://bucket/prefix/``.

    A read of a missing key (`exists`, `read_bytes`, `read_bounded`, `download`) is answered 404 by
    MinIO, and by AWS S3 to a caller with ``s3:ListBucket`` on the bucket (the coordinator); AWS
    answers 403 AccessDenied to a caller without it, and a site's key may list only its own folder
    (a grant narrowed by an ``s3:prefix`` condition, which a GET or HEAD does not satisfy: it carries
    no prefix). So a 403 on a read is followed by a ListObjectsV2 of exactly that key
    (``Prefix=<key>``, one result), which the site's grant allows for keys in its folder: the key
    counts as missing only when that listing is allowed and shows no such key. Any other outcome
    (the listing refused too, or the key listed: it exists and may not be read) keeps the 403, a
    refusal of the credentials. This is safe where mapping every 403 to "missing" would not be: the
    store itself, under the same key, says the key is absent. The coordinator's requests are
    unchanged (it gets 404s, never reaches the listing).

    A listing that showed a key absent stands for that key's 403s for `ABSENCE_TRUSTED_SECONDS`:
    a site polling a posting not yet written costs one GET a read and one LIST per ten minutes,
    not a LIST per read (about $0.70 a year at AWS's prices instead of $5.79). The price: a key that
    appears in that time and may not be read (a read grant withdrawn, an object encrypted with a
    key the site may not use) reads as missing until the next listing, at most ten minutes, and
    then as refused. A readable key is never affected (its GET succeeds), nor any 403 of a key
    that was not listed absent.
    """

    def __init__(self, bucket: str, prefix: str, settings: S3Settings) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.settings = settings
        self.location = s3_location(bucket, self.prefix)
        self.reads_are_local = False  # every read is a request: billed, and a round trip away
        # botocore's standard retry mode: connection errors, timeouts, 5xx, 429 and throttling codes are
        # retried with exponential back-off and jitter before anything reaches `_S3Errors`.
        retries = {"mode": "standard", "total_max_attempts": settings.max_attempts}
        config = Config(s3={"addressing_style": settings.addressing_style}, retries=retries,
                        connect_timeout=10, read_timeout=60)
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=settings.endpoint, region_name=settings.region or "us-east-1",
            aws_access_key_id=settings.access_key_id, aws_secret_access_key=settings.secret_access_key,
            verify=settings.ca_bundle or settings.verify_tls, config=config)
        self.transfer = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                                       max_concurrency=4)
        self.absent_since: dict[str, float] = {}  # key -> when a listing last showed it absent (monotonic)

    @classmethod
    def from_url(cls, url: str, environment: Mapping[str, str]) -> S3Store:
        """``s3://bucket/prefix`` with settings from ``environment``."""
        parsed = urlparse(url)
        if not parsed.netloc:
            raise BadInputError(f"--workdir {url}: name a bucket (s3://bucket/prefix)")
        return cls(parsed.netloc, parsed.path, S3Settings.from_environment(environment))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{_check_key(key)}" if self.prefix else _check_key(key)

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def exists(self, key: str) -> bool:
        with self._errors(key, missing_ok=True, read=True) as outcome:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        return not outcome.missing

    def read_bytes(self, key: str) -> bytes:
        with self._errors(key, read=True):
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return bytes(answer["Body"].read())
        raise AssertionError("unreachable")

    def read_bounded(self, key: str, limit: int) -> bytes:
        with self._errors(key, read=True):
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return self._bounded_body(key, answer, limit)
        raise AssertionError("unreachable")

    def _bounded_body(self, key: str, answer: Mapping[str, Any], limit: int) -> bytes:
        """A GET's body, refused past ``limit`` bytes without reading it whole."""
        body = answer["Body"]
        try:  # the size comes with the answer's headers, before any of its bytes
            size = int(answer.get("ContentLength") or 0)
            if size > limit:
                raise too_large(self.describe(key), size, limit)
            data = bytes(body.read(limit + 1))
        finally:
            body.close()  # unread bytes are dropped with the connection, never buffered
        if len(data) > limit:
            raise too_large(self.describe(key), f"more than {limit}", limit)
        return data

    def read_if_changed(self, key: str, limit: int, seen: str | None) -> Version:
        from botocore.exceptions import ClientError

        conditional = {"IfNoneMatch": seen} if seen else {}
        with self._errors(key, missing_ok=True, read=True) as outcome:
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **conditional)
            except ClientError as error:
                status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
                if status == 304:  # Not Modified: no body was sent
                    return Version(None, seen, False)
                raise
            return Version(self._bounded_body(key, answer, limit), str(answer.get("ETag") or ""), True)
        assert outcome.missing
        return Version(None, None, seen is not None)

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key):  # one PUT when small, a multipart upload in parts when large
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), Config=self.transfer)
        self.absent_since.pop(key, None)

    def upload(self, key: str, source: Path) -> None:
        with self._errors(key):
            self.client.upload_file(str(source), self.bucket, self._key(key), Config=self.transfer)
        self.absent_since.pop(key, None)

    def download(self, key: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(key, read=True), _atomic_file(target) as stream:
            self.client.download_fileobj(self.bucket, self._key(key), stream, Config=self.transfer)

    def list(self, prefix: str) -> list[str]:
        folder = "/".join(part for part in (self.prefix, prefix.strip("/")) if part)
        keys: list[str] = []
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                           Prefix=f"{folder}/" if folder else "")
            for page in pages:
                keys += [item["Key"] for item in page.get("Contents", [])]
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[cut:] for k in keys)

    def remove_all(self) -> int:
        keys = [self._key(k) for k in self.list("")]
        with self._errors(""):
            for start in range(0, len(keys), 1000):
                batch = [{"Key": k} for k in keys[start:start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def listed_absent(self, key: str) -> bool:
        """Whether listing exactly ``key`` is allowed and shows no such object (see the class's docstring).

        Keys come back in byte order and ``key`` is a prefix of every other key the listing can
        return, so if it exists it is the first: one result is enough. An absence listed less than
        `ABSENCE_TRUSTED_SECONDS` ago is not listed again.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        now = time.monotonic()
        listed = self.absent_since.get(key)
        if listed is not None and now - listed < ABSENCE_TRUSTED_SECONDS:
            return True
        full = self._key(key)
        try:
            answer = self.client.list_objects_v2(Bucket=self.bucket, Prefix=full, MaxKeys=1)
        except ClientError:
            return False  # the listing is refused too: the read's refusal stands
        except BotoCoreError as error:  # refused, reset, timed out: the store failed, not this key's grant
            raise TemporaryStorageError(f"{self.describe(key)}: cannot reach {self.settings.endpoint or 'AWS S3'} "
                                        f"after {self.settings.max_attempts} attempt(s) ({error})") from error
        absent = all(item["Key"] != full for item in answer.get("Contents", []))
        self.absent_since = {k: t for k, t in self.absent_since.items() if now - t < ABSENCE_TRUSTED_SECONDS}
        if absent:
            self.absent_since[key] = now
        else:
            self.absent_since.pop(key, None)
        return absent

    def _errors(self, key: str, missing_ok: bool = False, read: bool = False) -> _S3Errors:
        return _S3Errors(self, key, missing_ok, read)


class _S3Errors:
    """Turns botocore's errors into worker errors that say what to fix (credentials name their Secret)."""

    def __init__(self, store: S3Store, key: str, missing_ok: bool, read: bool) -> None:
        self.store, self.key, self.missing_ok, self.read, self.missing = store, key, missing_ok, read, False

    def __enter__(self) -> _S3Errors:
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> bool:
        if error is None:
            return False
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError, SSLError
        from botocore.exceptions import ConnectionError as Unreachable

        if isinstance(error, S3UploadFailedError) and isinstance(error.__context__, ClientError | Unreachable):
            error = error.__context__  # upload_file wraps the answer in a message; judge the answer itself
        where = self.store.describe(self.key) if self.key else self.store.location
        settings = self.store.settings
        endpoint = settings.endpoint or "AWS S3"
        tries = f"after {settings.max_attempts} attempt(s)"
        if isinstance(error, NoCredentialsError):
            raise BadInputError(f"{where}: no S3 credentials; set them in {settings.credentials_from}") from error
        if isinstance(error, SSLError):
            raise BadInputError(f"{where}: TLS to {endpoint} failed ({error}); trust its CA with "
                                f"{S3_ENV['ca_bundle']} (spec.storage.s3.tls.caConfigMap)") from error
        if isinstance(error, Unreachable | HTTPClientError):  # refused, reset, timed out, cut mid-answer
            raise TemporaryStorageError(f"{where}: cannot reach {endpoint} {tries} ({error})") from error
        if not isinstance(error, ClientError):
            return False
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        denied_read = code in ("AccessDenied", "403") and self.read and bool(self.key)
        if code in ("NoSuchKey", "404", "NotFound") or (denied_read and self.store.listed_absent(self.key)):
            if self.missing_ok:
                self.missing = True
                return True
            raise BadDataError(f"{where}: missing") from error
        if code == "NoSuchBucket":
            raise BadInputError(f"{where}: bucket {self.store.bucket!r} does not exist at {endpoint}; create it or "
                                "fix spec.storage.s3.bucket") from error
        if code in CREDENTIAL_ERRORS:
            raise BadInputError(f"{where}: {endpoint} refused the credentials ({code}); check the access key and "
                                f"secret in {settings.credentials_from}, and that they may use bucket "
                                f"{self.store.bucket!r}") from error
        if status >= 500 or status == 429 or code in TEMPORARY_ERRORS:
            answer = code if str(status) == code else f"{code} (HTTP {status})"
            raise TemporaryStorageError(f"{where}: {endpoint} answered {answer} {tries}; the task can run "
                                        "again once the store recovers") from error
        raise BadDataError(f"{where}: S3 error {code}: {error}") from error


def iterate_keys(store: Store, prefix: str, suffix: str) -> Iterator[str]:
    """Keys directly in folder ``prefix`` ending in ``suffix`` (e.g. a round's ``*.safetensors``)."""
    folder = prefix.rstrip("/") + "/"
    for key in store.list(folder):
        rest = key[len(folder):]
        if "/" not in rest and rest.endswith(suffix):
            yield key
