"""Where streamed token data lives: a local directory or an object-store URL (s3://, gs://, ...), read through fsspec.

Credentials and endpoints come from the standard environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL`, ...), as boto3, s3fs and litdata read them. Storage faults become one `UserError` naming the URL:
missing, denied (credentials) or unreachable (endpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import fsspec

from lvm_pl.atomic import error_chain
from lvm_pl.console import UserError

DENIED_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403")


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def filesystem(url: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem of `url` (few retries: a wrong endpoint should fail in seconds, not minutes)."""
    protocol = url.split("://", 1)[0] if is_remote(url) else "file"
    options = {"config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 2}}}
    return fsspec.filesystem(protocol, **(options if protocol in ("s3", "s3a") else {}))


def allow_plain_http() -> None:
    """Let litdata's chunk downloads reach an `http://` AWS_ENDPOINT_URL (a local MinIO, the tests' moto server).

    litdata 0.2.76 fetches chunks with obstore, whose client refuses plain http unless `allow_http` is among its
    client options, and litdata exposes no way to pass it; the endpoint the user configured already says http.
    """
    if os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        from litdata.streaming import downloader

        downloader._OBSTORE_CLIENT_OPTIONS = {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": "true"}


def join(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


def fault(url: str, err: BaseException) -> UserError | None:
    """The one line for a storage fault on `url`, or None when `err` is not one."""
    text = f"{type(err).__name__}: {err}"
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default endpoint")
    if isinstance(err, FileNotFoundError) or "NoSuchBucket" in text or "NoSuchKey" in text:
        return UserError(f"{url}: not found (is the URL right, and was `stream-tokens` run into it?)")
    if isinstance(err, PermissionError) or any(code in text for code in DENIED_CODES):
        return UserError(f"{url}: access denied; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ({err})".strip())
    connection = ("EndpointConnectionError", "ConnectTimeout", "ClientConnectorError", "Connection refused")
    if isinstance(err, ConnectionError | TimeoutError) or any(c in text for c in connection):
        return UserError(f"{url}: cannot reach the storage endpoint {endpoint}; check AWS_ENDPOINT_URL, the network")
    return None


@contextlib.contextmanager
def named_faults(url: str) -> Iterator[None]:
    """Re-raise storage faults inside the block as one `UserError` naming `url`."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # fsspec backends raise their own types (botocore, aiohttp, OSError)
        found = next((f for e in error_chain(err) if (f := fault(url, e)) is not None), None)
        if found is None:
            raise
        raise found from None


def read_json(url: str) -> dict:
    """The JSON document at `url` (a storage fault or bad JSON: one line naming it)."""
    with named_faults(url), filesystem(url).open(url, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except ValueError as err:
        raise UserError(f"{url}: not JSON ({err})") from None


def read_bytes(url: str) -> bytes:
    with named_faults(url), filesystem(url).open(url, "rb") as f:
        return f.read()
