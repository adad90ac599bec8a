"""The agent's "cloud" as S3: a real moto server on loopback (skipped where moto or s3fs is missing)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from live_registry import conftest as registry_fixtures

from live.registry import Registry

from .conftest import MODEL, AgentProc

# the registry tests' moto server and fresh-bucket fixtures, shared (pytest registers them by their own names)
moto_endpoint = registry_fixtures.moto_endpoint
s3_url = registry_fixtures.s3_url

pytest.importorskip("s3fs", reason="s3:// stores need s3fs")


def test_load_from_an_s3_cloud(request: pytest.FixtureRequest, tiny_ckpt: Path,
                               start_agent: Callable[..., AgentProc]) -> None:
    url, options = request.getfixturevalue("s3_url")
    Registry([url], {url: options}).publish(MODEL, tiny_ckpt)

    agent = start_agent(url, {"nvme": 1 << 30, "sata": 1 << 30}, options)
    loaded = agent.post("/load", {"model": MODEL})
    assert loaded.status_code == 200, loaded.text
    timings, inst = loaded.json()["timings"], loaded.json()["instance"]
    assert timings["source_tier"] == "cloud" and [h["to_tier"] for h in timings["fetch_s"]] == ["host"]
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0}
    assert httpx.post(inst["url"] + "/v1/completions", json=body, timeout=60).status_code == 200
    assert agent.status()["tiers"]["sata"]["models"] == {}  # host memory only: no tier copy
    copied = agent.post("/tiers/copy", {"model": MODEL, "to_tier": "sata"}).json()
    assert copied["from_tier"] == "host"
    assert agent.status()["tiers"]["sata"]["models"] == {MODEL: timings["fetch_s"][0]["bytes"]}
