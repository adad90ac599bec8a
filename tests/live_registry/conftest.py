"""Fixtures: a real moto S3 server and (where it installs) a real azurite Blob server on 127.0.0.1, and a tiny
checkpoint generated once per session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from live.checkpoint import generate_checkpoint
from live.stores import Store, open_store

from .services import ServiceUnavailable, azurite_blob, moto_server

pytest.importorskip("s3fs", reason="s3:// stores need s3fs (pip install s3fs)")

S3_CREDS = {"key": "testing", "secret": "testing"}  # moto accepts any credentials


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~10 MB Llama checkpoint, seed 0."""
    return generate_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", 0).path


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
            yield endpoint
    except ServiceUnavailable as e:
        pytest.fail(f"moto S3 server did not start: {e}")


@pytest.fixture
def s3_url(moto_endpoint: str) -> tuple[str, dict]:
    """A fresh bucket on the moto server: (store URL, store options)."""
    options = {**S3_CREDS, "endpoint_url": moto_endpoint}
    bucket = f"tierlab-{uuid.uuid4().hex[:12]}"
    fs = open_store(f"s3://{bucket}", options).fs
    fs.mkdir(bucket)
    return f"s3://{bucket}/models", options


@pytest.fixture
def s3_store(s3_url: tuple[str, dict]) -> Store:
    return open_store(*s3_url)


@pytest.fixture(scope="session")
def azurite_conn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("adlfs", reason="az:// stores need adlfs (pip install adlfs)")
    try:
        with azurite_blob(tmp_path_factory.mktemp("azurite")) as conn:
            yield conn
    except ServiceUnavailable as e:
        pytest.skip(f"azurite unavailable here: {e}")


@pytest.fixture
def az_url(azurite_conn: str) -> tuple[str, dict]:
    """A fresh container on azurite: (store URL, store options)."""
    options = {"connection_string": azurite_conn}
    container = f"tierlab-{uuid.uuid4().hex[:12]}"
    open_store(f"az://{container}", options).fs.mkdir(container)
    return f"az://{container}/models", options
