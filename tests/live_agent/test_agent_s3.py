"""The agent's "cloud" as S3: a real moto server on loopback (skipped where moto or s3fs is missing)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from live_registry.services import ServiceUnavailable, moto_server

from live.registry import Registry
from live.stores import open_store

from .conftest import MODEL, AgentProc

pytest.importorskip("s3fs", reason="s3:// stores need s3fs")


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
            yield endpoint
    except ServiceUnavailable as e:
        pytest.skip(f"moto S3 server unavailable here: {e}")


def test_load_from_an_s3_cloud(moto_endpoint: str, tiny_ckpt: Path, start_agent: Callable[..., AgentProc]) -> None:
    options = {"key": "testing", "secret": "testing", "endpoint_url": moto_endpoint}  # moto takes any credentials
    bucket = f"tierlab-{uuid.uuid4().hex[:12]}"
    open_store(f"s3://{bucket}", options).fs.mkdir(bucket)
    url = f"s3://{bucket}/models"
    Registry([url], {url: options}).publish(MODEL, tiny_ckpt)

    agent = start_agent(url, {"nvme": 1 << 30, "sata": 1 << 30}, options)
    loaded = agent.post("/load", {"model": MODEL})
    assert loaded.status_code == 200, loaded.text
    timings, inst = loaded.json()["timings"], loaded.json()["instance"]
    assert timings["source_tier"] == "cloud" and [h["to_tier"] for h in timings["fetch_s"]] == ["sata"]
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0}
    assert httpx.post(inst["url"] + "/v1/completions", json=body, timeout=60).status_code == 200
    assert agent.status()["tiers"]["sata"]["models"] == {MODEL: timings["fetch_s"][0]["bytes"]}
