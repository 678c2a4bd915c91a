"""Paths and URLs through fsspec (local, `s3://`, `gs://`, `https://`): shard lists expanded, files opened, and the
failures of object storage (missing key, bad credentials, unreachable endpoint) turned into one line naming the URL.

Credentials come only from the environment and the standard config files each backend reads (AWS_* variables and
~/.aws for s3fs, GOOGLE_APPLICATION_CREDENTIALS for gcsfs); nothing here takes or prints them. `options` are fsspec's
storage options per protocol (`{"s3": {"config_kwargs": {"connect_timeout": 5}}}`), from the data config.
"""

from __future__ import annotations

import glob
import os
import re
from typing import IO

import fsspec

from lvm_pl.atomic import error_chain
from lvm_pl.console import UserError

Options = dict[str, dict]

DENIED_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken", "403")
UNREACHABLE = ("Could not connect", "Connect call failed", "Connection refused", "Cannot connect", "Name or service")


def remote_error(url: str, err: BaseException) -> UserError:
    """The one-line `UserError` for a failure to list or open `url`."""
    text = " ".join(f"{type(e).__name__}: {e}" for e in error_chain(err))
    # codes as whole words, URLs left out: a port such as 127.0.0.1:40345 is not an HTTP 403
    words = set(re.findall(r"\w+", re.sub(r"\w+://\S+", " ", text)))
    if words & set(DENIED_CODES) or isinstance(err, PermissionError):
        return UserError(
            f"{url}: access denied by the storage service; check the credentials in the environment "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS) or ~/.aws"
        )
    if any(marker in text for marker in UNREACHABLE) or isinstance(err, (ConnectionError, TimeoutError)):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the service's default")
        return UserError(f"{url}: cannot reach the storage endpoint ({endpoint}); check AWS_ENDPOINT_URL, the network")
    if isinstance(err, FileNotFoundError) or words & {"NoSuchKey", "NoSuchBucket", "404"}:
        return UserError(f"{url}: no such shard (check the URL, its brace range or glob)")
    return UserError(f"{url}: cannot open ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")


def protocol(url: str) -> str:
    """`s3` of `s3://bucket/key`, `file` of a local path."""
    return url.split("://", 1)[0] if "://" in url else "file"


def filesystem(url: str, options: Options) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of `url` with its protocol's options, and the path within it."""
    return fsspec.core.url_to_fs(url, **options.get(protocol(url), {}))


def expand_urls(patterns: str | list[str], options: Options) -> list[str]:
    """Shard URLs of `patterns`, in order: brace ranges expanded (`shards-{000000..000099}.tar`), globs matched
    (sorted; local or remote), plain paths and URLs kept as given (opening them reports one that is missing)."""
    from braceexpand import braceexpand

    out: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        for url in braceexpand(str(pattern)):
            if not glob.has_magic(url.split("://", 1)[-1]):
                out.append(url)
                continue
            try:
                fs, path = filesystem(url, options)
                found = sorted(fs.glob(path))
            except Exception as err:  # noqa: BLE001 - each backend raises its own types; worded by remote_error
                raise remote_error(url, err) from None
            if not found:
                raise UserError(f"{url}: no shards match this pattern")
            out += [fs.unstrip_protocol(p) if "://" in url else p for p in found]
    return out


def open_url(url: str, options: Options) -> IO[bytes]:
    """`url` opened for reading (streamed for remote files); failures worded by `remote_error`."""
    try:
        fs, path = filesystem(url, options)
        return fs.open(path, "rb")
    except Exception as err:  # noqa: BLE001 - worded by remote_error
        raise remote_error(url, err) from None


def check_url(url: str, options: Options) -> None:
    """Fail now, naming `url`, when it is missing, denied or unreachable (one metadata request)."""
    try:
        fs, path = filesystem(url, options)
        info = fs.info(path)
    except Exception as err:  # noqa: BLE001 - worded by remote_error
        raise remote_error(url, err) from None
    if info.get("type") == "directory":
        raise UserError(f"{url}: is a folder, not a tar shard (give a glob such as {url.rstrip('/')}/*.tar)")
