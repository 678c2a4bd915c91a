"""A real S3-protocol server on 127.0.0.1 for the remote-path tests: moto's standalone server, started once per worker.

Clients reach it the way a user points them at any S3-compatible store, through the standard AWS environment
variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), which boto3, s3fs and litdata all read; nothing in a client is
patched.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field


@dataclass
class S3Server:
    endpoint: str
    key: str = "testing-key"
    secret: str = "testing-secret"
    region: str = "us-east-1"
    buckets: set[str] = field(default_factory=set)

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment a client (or a `main.py` subprocess) needs to use this server as its S3."""
        values = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": self.region,
        }
        return {**os.environ, **values, **overrides}

    def fs(self, **overrides):
        """An s3fs filesystem on this server (credentials `overrides` for the bad-credentials cases)."""
        import s3fs

        kwargs = {"key": self.key, "secret": self.secret, **overrides}
        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint, "region_name": self.region}, **kwargs)

    def bucket(self, name: str) -> str:
        """Create bucket `name` once; its URL prefix `s3://name`."""
        if name not in self.buckets:
            import boto3

            client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=self.key,
                aws_secret_access_key=self.secret,
                region_name=self.region,
            )
            client.create_bucket(Bucket=name)
            self.buckets.add(name)
        return f"s3://{name}"


def start() -> tuple[S3Server, object]:
    """Start moto's threaded server on a free port of 127.0.0.1; returns the server's handle and the thread to stop."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request would flood test output
    thread = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    thread.start()
    host, port = thread.get_host_and_port()
    return S3Server(endpoint=f"http://{host}:{port}"), thread


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (closed again when this returns: an unreachable endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_checking_credentials() -> tuple[S3Server, subprocess.Popen]:
    """moto's server in its own process with authentication on (the threaded one accepts any key): an IAM user's
    key pair allowed everything, so a wrong pair is refused as a real S3 refuses it. IAM lets the first 3 requests
    (user, key, policy) through unsigned."""
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client(
            "iam", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
        )
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(policy))
    except BaseException:
        server.terminate()  # the fixture's teardown never runs when its setup fails
        server.wait()
        raise
    return S3Server(endpoint, key=key["AccessKeyId"], secret=key["SecretAccessKey"]), server
