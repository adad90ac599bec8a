"""Fixtures of the crash trials: two tiny checkpoints (two revisions), a moto S3 server, and the live agent fixtures
(`cloud`, `start_agent`) reused from tests/live_agent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from live.checkpoint import generate_checkpoint
from tests.live_agent.conftest import cloud, start_agent, tiny_ckpt  # noqa: F401  (fixtures reused as they are)
from tests.live_registry.services import ServiceUnavailable, moto_server


@pytest.fixture(scope="session")
def tiny_ckpt_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second `tiny` checkpoint (seed 1): another revision of the same model."""
    return generate_checkpoint(tmp_path_factory.mktemp("ckpt2") / "tiny", "tiny", 1).path


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on loopback (skipped where moto or s3fs is missing)."""
    pytest.importorskip("s3fs", reason="s3:// stores need s3fs (pip install s3fs)")
    try:
        with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
            yield endpoint
    except ServiceUnavailable as e:
        pytest.skip(f"moto S3 server unavailable: {e}")
