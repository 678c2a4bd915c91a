"""Storage failures worded by `remote_error`: the HTTP status and service codes, never digits of the URL's port."""

from __future__ import annotations

import pytest

from datamodules.sources.remote import remote_error


class ServiceError(Exception):
    """A backend's error, as aiohttp/botocore word them (status or code in the message, the URL beside it)."""


A, B = "http://127.0.0.1:40404/shard.tar", "http://127.0.0.1:1403/shard.tar"


@pytest.mark.parametrize(
    ("url", "err", "says"),
    [
        # a port holding "403" or "404" (random test servers take any) is not a status
        ("http://127.0.0.1:40345/shard.tar", FileNotFoundError("http://127.0.0.1:40345/shard.tar"), "no such shard"),
        (A, ServiceError(f"403, message='Forbidden', url='{A}'"), "access denied"),
        (B, ServiceError(f"404, message='Not Found', url='{B}'"), "no such shard"),
        ("s3://bucket/key", ServiceError("An error occurred (InvalidAccessKeyId) calling GetObject"), "access denied"),
        ("s3://bucket/key", ServiceError("An error occurred (NoSuchKey) when calling GetObject"), "no such shard"),
        ("s3://bucket/key", ServiceError("Could not connect to the endpoint URL"), "cannot reach"),
    ],
)  # fmt: skip
def test_the_line_names_the_url_and_the_cause(url, err, says):
    line = str(remote_error(url, err))
    assert line.startswith(f"{url}: {says}"), line
