"""Shared fixtures: compose the real hydra config, build and run small simulations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TRACES = REPO.parent / "shared" / "data" / "traces"


def config(*overrides: str) -> dict[str, Any]:
    """The composed config as plain containers, exactly as `python -m experiments.simulate scenario=smoke
    <overrides>` sees it: the tests were written for the smoke scenario (the default before issue 11); pass
    `scenario=NAME` for another."""
    if not any(o.split("=", 1)[0].lstrip("+~") == "scenario" for o in overrides):
        overrides = ("scenario=smoke", *overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain["progress"] = False
    return plain


@pytest.fixture
def cfg_factory():
    return config
