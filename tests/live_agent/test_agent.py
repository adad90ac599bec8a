"""The node agent end to end: a real agent process, real engine processes, real tier dirs, a file:// cloud."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from live.engines.base import running_group_members
from live.manifest import WEIGHTS_FILE

from .conftest import MODEL, TOKEN, AgentProc, Cloud

# uvicorn re-raises SIGTERM after its graceful shutdown (lifespan end included), so -SIGTERM is clean too
CLEAN_EXIT = (0, -signal.SIGTERM)


def complete(instance: dict) -> dict:
    """A real /v1/completions request to an engine the agent started."""
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 4, "temperature": 0}
    response = httpx.post(instance["url"] + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def tier_entries(path: Path) -> list[str]:
    """Everything in a tier dir, hidden staging dirs included."""
    return sorted(os.listdir(path)) if path.exists() else []


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "code"} and err["code"] == code
    return err


def test_load_from_cloud_then_sata_then_dram(cloud: Cloud, start_agent: Callable[..., AgentProc]) -> None:
    agent = start_agent(cloud.url)
    total_bytes = cloud.registry.manifest(MODEL).total_bytes

    # cold: the cloud fetch lands in host memory (no tier) and the engine reads it there
    first = agent.post("/load", {"model": MODEL})
    assert first.status_code == 200, first.text
    inst, timings = first.json()["instance"], first.json()["timings"]
    assert timings["source_tier"] == "cloud" and timings["engine_tier"] == "host"
    [hop] = timings["fetch_s"]
    assert (hop["from_tier"], hop["to_tier"], hop["kind"], hop["bytes"]) == ("cloud", "host", "fetch", total_bytes)
    assert hop["duration_s"] > 0 and timings["engine_start_s"] > 0 and timings["ready_s"] > 0
    assert inst["status"] == "ready" and inst["source_tier"] == "cloud" and inst["engine_tier"] == "host"
    assert Path(inst["model_dir"]).parent == agent.host_dir
    assert complete(inst)["usage"]["completion_tokens"] == 4
    status = agent.status()
    assert all(t["models"] == {} and t["used_bytes"] == 0 for t in status["tiers"].values()), status["tiers"]
    assert list(status["host"]["copies"].values()) == [total_bytes] and status["host"]["used_bytes"] == total_bytes
    assert [i["id"] for i in status["instances"]] == [inst["id"]]
    assert agent.client.get("/moves").json()["moves"] == []  # a load's fetch is no tier movement

    # a copy while the instance runs is taken from its host copy, not from the cloud
    cached = agent.post("/tiers/copy", {"model": MODEL, "to_tier": "sata"})
    assert cached.status_code == 200, cached.text
    assert (cached.json()["from_tier"], cached.json()["kind"]) == ("host", "copy")

    unloaded = agent.post("/unload", {"instance": inst["id"]})
    assert unloaded.json() == {"instance": inst["id"], "stopped": True}
    with pytest.raises(ProcessLookupError):
        os.killpg(inst["pid"], 0)
    status = agent.status()
    assert status["instances"] == [] and tier_entries(agent.host_dir) == [] and status["host"]["copies"] == {}
    assert status["tiers"]["sata"]["models"] == {MODEL: total_bytes}

    # warm in sata: no cloud hop
    second = agent.post("/load", {"model": MODEL}).json()
    assert second["timings"]["source_tier"] == "sata" and second["timings"]["fetch_s"] == []
    complete(second["instance"])
    agent.post("/unload", {"instance": second["instance"]["id"]})

    # sata -> dram with parallel streams, then the engine reads dram
    move = agent.post("/tiers/copy", {"model": MODEL, "to_tier": "dram"})
    assert move.status_code == 200, move.text
    rec = move.json()
    assert (rec["model"], rec["from_tier"], rec["to_tier"], rec["kind"], rec["bytes"]) == (
        MODEL, "sata", "dram", "copy", total_bytes)
    assert rec["duration_s"] > 0
    assert tier_entries(agent.tiers["dram"]) == [MODEL]  # no staging dir left behind
    third = agent.post("/load", {"model": MODEL}).json()
    assert third["timings"]["source_tier"] == "dram" and third["instance"]["source_tier"] == "dram"
    complete(third["instance"])

    # a copy to a tier that already holds the model moves nothing
    again = agent.post("/tiers/copy", {"model": MODEL, "to_tier": "dram"}).json()
    assert again["kind"] == "cached" and again["bytes"] == 0

    # an explicit source tier: the model is copied there first (from the fastest holder), one timed hop
    fourth = agent.post("/load", {"model": MODEL, "source_tier": "nvme"}).json()
    assert fourth["timings"]["source_tier"] == "nvme"
    assert [(h["from_tier"], h["to_tier"]) for h in fourth["timings"]["fetch_s"]] == [("dram", "nvme")]
    complete(fourth["instance"])

    evicted = agent.post("/tiers/evict", {"model": MODEL, "tier": "sata"})
    assert evicted.json() == {"model": MODEL, "tier": "sata", "freed_bytes": total_bytes}
    assert tier_entries(agent.tiers["sata"]) == []
    assert_error(agent.post("/tiers/evict", {"model": MODEL, "tier": "sata"}), 404, "not_in_tier")
    assert agent.stop() in CLEAN_EXIT


def test_capacity_refusal_leaves_nothing_in_the_tier(cloud: Cloud, start_agent: Callable[..., AgentProc]) -> None:
    total_bytes = cloud.registry.manifest(MODEL).total_bytes
    agent = start_agent(cloud.url, {"dram": total_bytes - 1, "sata": 1 << 30})
    err = assert_error(agent.post("/load", {"model": MODEL, "source_tier": "dram"}), 507, "insufficient_storage")
    assert "'dram'" in err["message"] and f"need {total_bytes} bytes" in err["message"]
    assert f"free {total_bytes - 1} bytes" in err["message"]
    assert tier_entries(agent.tiers["dram"]) == [] and tier_entries(agent.tiers["sata"]) == []

    # same from a local tier: sata holds it, dram still refuses, no partial file
    assert agent.post("/tiers/copy", {"model": MODEL, "to_tier": "sata"}).status_code == 200
    assert_error(agent.post("/tiers/copy", {"model": MODEL, "to_tier": "dram"}), 507, "insufficient_storage")
    assert tier_entries(agent.tiers["dram"]) == []
    errors = agent.status()["errors"]
    assert [e["code"] for e in errors] == ["insufficient_storage", "insufficient_storage"]


def test_corrupted_cloud_object_fails_the_load_cleanly(cloud: Cloud, start_agent: Callable[..., AgentProc]) -> None:
    weights = cloud.root / MODEL / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different sha256
    weights.write_bytes(bytes(data))
    agent = start_agent(cloud.url)
    err = assert_error(agent.post("/load", {"model": MODEL}), 502, "fetch_failed")
    assert WEIGHTS_FILE in err["message"] and "sha256" in err["message"]
    assert tier_entries(agent.tiers["sata"]) == [] and tier_entries(agent.host_dir) == []
    status = agent.status()
    assert status["instances"] == [] and status["tiers"]["sata"]["used_bytes"] == 0
    assert status["errors"][-1]["code"] == "fetch_failed" and status["errors"][-1]["model"] == MODEL


def test_auth_and_bad_requests(cloud: Cloud, start_agent: Callable[..., AgentProc]) -> None:
    agent = start_agent(cloud.url)
    assert httpx.get(agent.url + "/healthz").json()["ok"] is True  # no token needed
    assert_error(httpx.get(agent.url + "/status"), 401, "invalid_token")
    assert_error(httpx.get(agent.url + "/status", headers={"Authorization": "Bearer nope"}), 401, "invalid_token")
    assert_error(httpx.post(agent.url + "/load", json={"model": MODEL}), 401, "invalid_token")
    assert httpx.get(agent.url + "/status", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200

    for path, body in (("/load", {"model": "../x"}), ("/tiers/copy", {"model": "../x", "to_tier": "sata"}),
                       ("/tiers/evict", {"model": "a/b", "tier": "sata"}), ("/load", {"model": ".."})):
        assert_error(agent.post(path, body), 400, "unsafe_model_name")
    bad_json = agent.client.post("/load", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(bad_json, 400, "invalid_json")
    assert_error(agent.post("/load", {}), 400, "missing_field")
    assert_error(agent.post("/tiers/copy", {"model": MODEL}), 400, "missing_field")
    assert_error(agent.post("/tiers/copy", {"model": MODEL, "to_tier": "tape"}), 400, "unknown_tier")
    assert_error(agent.post("/load", {"model": "no-such-model"}), 404, "model_not_found")
    assert_error(agent.post("/unload", {"instance": "nope"}), 404, "instance_not_found")
    assert_error(agent.client.get("/no-such-route"), 404, "http_error")
    for path in agent.tiers.values():
        assert tier_entries(path) == []
    assert not (agent.tiers["sata"].parent / "x").exists()


def test_status_answers_while_a_load_runs_and_shutdown_leaves_no_engine(
        cloud: Cloud, start_agent: Callable[..., AgentProc]) -> None:
    agent = start_agent(cloud.url)
    results: dict[str, httpx.Response] = {}
    loader = threading.Thread(target=lambda: results.setdefault(
        "load", agent.post("/load", {"model": MODEL, "source_tier": "sata"})))
    loader.start()
    seen_loading = False
    while loader.is_alive():
        t0 = time.perf_counter()
        status = agent.status()
        assert time.perf_counter() - t0 < 2.0  # served while the load runs in a worker thread
        seen_loading |= any(i["status"] == "loading" for i in status["instances"])
        if seen_loading:  # evicting the dir a loading engine reads is refused
            assert_error(agent.post("/tiers/evict", {"model": MODEL, "tier": "sata"}), 409, "tier_in_use")
            break
        time.sleep(0.02)
    loader.join()
    assert seen_loading
    inst = results["load"].json()["instance"]
    second = agent.post("/load", {"model": MODEL, "source_tier": "cloud"}).json()["instance"]  # a host copy
    pgids = [inst["pid"], second["pid"]]
    assert all(running_group_members(p) for p in pgids)
    assert len(tier_entries(agent.host_dir)) == 1

    assert agent.stop() in CLEAN_EXIT  # SIGTERM: the lifespan end stops every engine
    assert tier_entries(agent.host_dir) == []  # and removes the host copies
    for pgid in pgids:
        assert running_group_members(pgid) == []
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
