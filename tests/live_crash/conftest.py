"""Fixtures of the crash trials: two tiny checkpoints (two revisions), the registry tests' moto S3 server, and the
live agent fixtures (`cloud`, `start_agent`) reused from tests/live_agent."""

from __future__ import annotations

from pathlib import Path

import pytest

from live.checkpoint import generate_checkpoint
from tests.live_agent.conftest import cloud, start_agent, tiny_ckpt  # noqa: F401  (fixtures reused as they are)
from tests.live_registry.conftest import moto_endpoint  # noqa: F401  (the registry tests' moto S3 server)


@pytest.fixture(scope="session")
def tiny_ckpt_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second `tiny` checkpoint (seed 1): another revision of the same model."""
    return generate_checkpoint(tmp_path_factory.mktemp("ckpt2") / "tiny", "tiny", 1).path
