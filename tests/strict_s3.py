"""moto's S3 server, made as strict as AWS S3 where moto is lenient: listing conditions and missing keys.

moto checks a request's IAM action and resource, but not conditions: a ``StringLike`` on
``s3:prefix`` lets a key list the whole bucket. And it answers a GET or HEAD of a missing key with
404 to anyone who may read it, where AWS S3 answers 403 AccessDenied unless the caller also has
``s3:ListBucket`` on the bucket. A test double more lenient than production hides exactly the bugs
a narrowed policy causes, so this wraps moto's server application (in its own process, where
moto's IAM holds the users) in a WSGI middleware that, for a request signed by an IAM user:

- a ListObjects or ListObjectsV2 (``GET /bucket``, path-style addressing, as the tests use) is
  decided as IAM would: ``s3:ListBucket`` on ``arn:aws:s3:::bucket``, with ``s3:prefix`` in the
  context when the request names a prefix, against the user's inline policies (`allowed`); a
  refusal is 403 AccessDenied, before moto sees the request;
- a GET or HEAD of an object that moto answers 404 becomes 403 AccessDenied unless the user may
  ``s3:ListBucket`` with no ``s3:prefix`` in the context, for such a request carries none: a
  listing grant narrowed by a prefix condition does not turn AWS's 403 into a 404.

Everything else reaches moto unchanged, and moto still checks every action and resource. Run it
like ``python -m moto.server``: ``python -m tests.strict_s3 -H 127.0.0.1 -p PORT``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qs, unquote

LISTING_PARAMETERS = {"list-type", "prefix", "delimiter", "max-keys", "marker", "continuation-token", "start-after",
                      "encoding-type", "fetch-owner", "x-id"}
OBJECT_READ_PARAMETERS = {"versionId", "partNumber", "x-id"}  # and response-* overrides: still a plain read
DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message>'
          b"</Error>")


class UnsupportedPolicy(Exception):
    """A policy this evaluator cannot decide: failing loudly beats deciding leniently."""


def _glob(pattern: str, value: str, case_sensitive: bool = True) -> bool:
    """IAM's wildcards: ``*`` any run of characters, ``?`` one character."""
    if "${" in pattern:
        raise UnsupportedPolicy(f"policy variables are not evaluated here: {pattern!r}")
    expression = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(expression, value, 0 if case_sensitive else re.IGNORECASE) is not None


CONDITION_OPERATORS: dict[str, Callable[[str, str], bool]] = {
    "StringEquals": lambda pattern, value: pattern == value,
    "StringLike": _glob,
}


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _condition_holds(condition: Mapping[str, Mapping[str, str | list[str]]], context: Mapping[str, str]) -> bool:
    """Every operator and every key must hold; a key absent from the request's context fails its test."""
    for operator, tests in condition.items():
        if operator not in CONDITION_OPERATORS:
            raise UnsupportedPolicy(f"condition operator {operator} is not evaluated here")
        for key, patterns in tests.items():
            value = context.get(key.lower())
            if value is None or not any(CONDITION_OPERATORS[operator](p, value) for p in _as_list(patterns)):
                return False
    return True


def _applies(statement: Mapping[str, Any], action: str, resource: str, context: Mapping[str, str]) -> bool:
    if "NotAction" in statement or "NotResource" in statement or "Principal" in statement:
        raise UnsupportedPolicy(f"statement {statement.get('Sid', '')!r}: only Action, Resource and Condition here")
    return (any(_glob(a, action, case_sensitive=False) for a in _as_list(statement["Action"]))
            and any(_glob(r, resource) for r in _as_list(statement["Resource"]))
            and _condition_holds(statement.get("Condition", {}), context))


def allowed(policies: Iterable[Mapping[str, Any]], action: str, resource: str, context: Mapping[str, str]) -> bool:
    """IAM's decision on one request: an explicit Deny wins, then any Allow; nothing matching is a deny.

    ``context`` holds the request's condition keys (``s3:prefix``), lower case; a key the request
    does not carry is absent, and a condition on it does not hold.
    """
    effects = {statement["Effect"] for policy in policies for statement in _as_list_of_dicts(policy["Statement"])
               if _applies(statement, action, resource, context)}
    return "Allow" in effects and "Deny" not in effects


def _as_list_of_dicts(statements: Any) -> list[Mapping[str, Any]]:
    return [statements] if isinstance(statements, dict) else list(statements)


def access_key_of(environ: Mapping[str, Any]) -> str | None:
    """The access key id that signed the request (SigV4 header or presigned URL)."""
    found = re.search(r"Credential=([^/,\s]+)/", environ.get("HTTP_AUTHORIZATION", ""))
    if found:
        return found.group(1)
    query = parse_qs(environ.get("QUERY_STRING", ""))
    credential = query.get("X-Amz-Credential", [""])[0]
    return credential.split("/", 1)[0] or None


def moto_user_policies(access_key_id: str) -> list[dict[str, Any]] | None:
    """The inline policies of the IAM user owning ``access_key_id``, as moto's IAM holds them; None: no such user."""
    from moto.iam.models import iam_backends

    for account_id in list(iam_backends.keys()):
        for user in iam_backends[account_id]["aws"].users.values():
            if any(key.access_key_id == access_key_id for key in user.access_keys):
                if user.managed_policies:
                    raise UnsupportedPolicy(f"user {user.name}: only inline policies are evaluated here")
                return [_document(text) for text in user.policies.values()]
    return None


def _document(text: str) -> dict[str, Any]:
    try:
        return dict(json.loads(text))
    except ValueError:
        return dict(json.loads(unquote(text)))


class StrictS3:
    """WSGI middleware over moto's application: see the module's docstring for what it refuses."""

    def __init__(self, app: Callable[..., Iterable[bytes]],
                 policies_of: Callable[[str], list[dict[str, Any]] | None] = moto_user_policies) -> None:
        self.app, self.policies_of = app, policies_of

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        key_id = access_key_of(environ)
        policies = self.policies_of(key_id) if key_id else None
        method = environ["REQUEST_METHOD"]
        bucket, _, key = environ.get("PATH_INFO", "").lstrip("/").partition("/")
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if policies is None or not bucket:
            return self.app(environ, start_response)
        if not key and method == "GET" and set(query) <= LISTING_PARAMETERS:
            context = {"s3:prefix": query["prefix"][0]} if "prefix" in query else {}
            if not allowed(policies, "s3:ListBucket", f"arn:aws:s3:::{bucket}", context):
                return _denied(method, start_response)
            return self.app(environ, start_response)
        plain_read = all(name in OBJECT_READ_PARAMETERS or name.startswith("response-") for name in query)
        if key and method in ("GET", "HEAD") and plain_read:
            return self._read(environ, start_response, policies, bucket)
        return self.app(environ, start_response)

    def _read(self, environ: dict[str, Any], start_response: Callable[..., Any], policies: list[dict[str, Any]],
              bucket: str) -> Iterable[bytes]:
        answered: list[tuple[Any, ...]] = []
        body = self.app(environ, lambda *args: answered.append(args))
        if answered[0][0].startswith("404"):
            data = b"".join(body)
            _close(body)
            missing_key = environ["REQUEST_METHOD"] == "HEAD" or b"NoSuchKey" in data
            if missing_key and not allowed(policies, "s3:ListBucket", f"arn:aws:s3:::{bucket}", {}):
                return _denied(environ["REQUEST_METHOD"], start_response)
            body = [data]
        start_response(*answered[0])
        return body


def _close(body: Iterable[bytes]) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        close()


def _denied(method: str, start_response: Callable[..., Any]) -> list[bytes]:
    start_response("403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(DENIED)))])
    return [] if method == "HEAD" else [DENIED]


def main() -> None:
    """``python -m tests.strict_s3 -H HOST -p PORT``: moto's server behind `StrictS3`."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()
    os.environ.setdefault("MOTO_PORT", str(args.port))  # as moto.server does: presigned URLs name this port
    run_simple(args.host, args.port, StrictS3(DomainDispatcherApplication(create_backend_app)), threaded=True,
               request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
