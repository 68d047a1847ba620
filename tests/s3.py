"""A local S3-compatible server for tests: moto's ThreadedMotoServer on 127.0.0.1 and a fresh bucket per test.

Use the fixtures through tests/conftest.py: `s3_server` (one per session: the endpoint URL) and `s3_bucket`
(an empty bucket with the options every storage URL of the platform takes). Dummy credentials are also set in
the environment, so nothing ever looks for real ones (botocore would otherwise try ~/.aws and the instance
metadata endpoint). No region is passed to s3fs: with one, moto's bucket creation fails (shared/OFFLINE.md).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from cil_platform.storage import Storage, open_storage
from tests.ray_cluster import free_port

CREDENTIALS = {"key": "testing", "secret": "testing"}


@dataclass(frozen=True)
class S3Bucket:
    endpoint: str  # http://127.0.0.1:<port>
    name: str

    @property
    def options(self) -> dict:
        """fsspec/s3fs storage options for this server."""
        return {**CREDENTIALS, "client_kwargs": {"endpoint_url": self.endpoint}}

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.name}", *parts])

    def storage(self, *parts: str) -> Storage:
        return open_storage(self.url(*parts), self.options)

    def keys(self, *parts: str) -> list[str]:
        """Every object under s3://bucket/parts..., relative to it, from a fresh listing."""
        fs = self.storage().fs
        fs.invalidate_cache()
        root = "/".join([self.name, *parts])
        return sorted(path[len(root) + 1:] for path in fs.find(root))


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["key"])
        env.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["secret"])
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.delenv("AWS_PROFILE", raising=False)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> S3Bucket:
    bucket = S3Bucket(s3_server, f"test-{uuid.uuid4().hex[:12]}")
    bucket.storage().fs.mkdir(bucket.name)
    return bucket
