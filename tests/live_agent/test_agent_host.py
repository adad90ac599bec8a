"""A cold start from the cloud goes through host memory, as the simulator's does (`core.loadtime.fetch_hop`).

Real agents (a process, or an in-process NodeAgent), real engine processes, paced tier dirs, a file://
cloud holding the tiny checkpoint (~10 MB): the fetch lands in the agent's host dir (no tier), the
engine reads it there unpaced, a copy made while the instance runs is taken from it, and it goes
with its instance, whatever way the instance ends.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from live.agent import AgentConfig, AgentError, EngineSettings, NodeAgent, config_from_args
from live.agent_tiers import TierConfig
from live.manifest import WEIGHTS_FILE
from live.pacing import PACE_FILE

from .conftest import MODEL, TOKEN, AgentProc, Cloud
from .test_agent import CLEAN_EXIT, complete, tier_entries

STREAMS, STREAM_BPS, CLOUD_LATENCY = 2, 2e6, 0.2  # ~2.7 s for the tiny model
SATA_READ, SATA_WRITE = 4e6, 10e6  # ~2.5 s to read the tiny model, ~1 s to write it


def near(measured_s: float, expected_s: float, rel: float = 0.2) -> bool:
    return abs(measured_s - expected_s) <= rel * expected_s


def test_cloud_load_is_paced_by_the_cloud_only_and_a_following_copy_is_taken_from_host_memory(
        cloud: Cloud, start_agent: Callable[..., AgentProc]) -> None:
    agent = start_agent(cloud.url, extra=[
        "--tier-bw", f"sata={SATA_READ}:{SATA_WRITE}", "--cloud-streams", str(STREAMS),
        "--cloud-stream-Bps", str(STREAM_BPS), "--cloud-latency-s", str(CLOUD_LATENCY)])
    manifest = cloud.registry.manifest(MODEL)
    total = manifest.total_bytes
    fetch_s = total / (STREAMS * STREAM_BPS) + CLOUD_LATENCY

    t0 = time.perf_counter()
    load = agent.post("/load", {"model": MODEL})
    wall_s = time.perf_counter() - t0
    assert load.status_code == 200, load.text
    inst, timings = load.json()["instance"], load.json()["timings"]
    [hop] = timings["fetch_s"]
    assert (timings["source_tier"], hop["from_tier"], hop["to_tier"]) == ("cloud", "cloud", "host")
    assert near(hop["duration_s"], fetch_s), (hop["duration_s"], fetch_s)
    # fetch, then the engine: no paced sata write or sata read in between (those would add ~3.5 s)
    assert wall_s <= hop["duration_s"] + timings["ready_s"] + 0.5, (wall_s, timings)
    stats = httpx.get(inst["url"] + "/stats", timeout=10).json()
    assert stats["read_s"] < 0.3 * manifest.file(WEIGHTS_FILE).size_bytes / SATA_READ, stats["read_s"]
    assert complete(inst)["usage"]["completion_tokens"] == 4
    status = agent.status()
    assert all(t["models"] == {} for t in status["tiers"].values())  # nothing the policy did not ask for
    assert tier_entries(agent.tiers["sata"]) == [PACE_FILE]

    # cache it in sata while the instance runs: from host memory, at sata's write bandwidth (the cloud: ~2.7 s)
    copy = agent.post("/tiers/copy", {"model": MODEL, "to_tier": "sata"})
    assert copy.status_code == 200, copy.text
    assert (copy.json()["from_tier"], copy.json()["kind"]) == ("host", "copy")
    assert near(copy.json()["duration_s"], total / SATA_WRITE), copy.json()["duration_s"]
    assert [m["from_tier"] for m in agent.client.get("/moves").json()["moves"]] == ["host"]

    assert agent.post("/unload", {"instance": inst["id"]}).status_code == 200
    assert tier_entries(agent.host_dir) == []

    # an explicit "cloud" load fetches again although sata holds the model; sata is left as it was
    again = agent.post("/load", {"model": MODEL, "source_tier": "cloud"})
    assert again.status_code == 200, again.text
    [hop] = again.json()["timings"]["fetch_s"]
    assert (hop["from_tier"], hop["to_tier"]) == ("cloud", "host") and near(hop["duration_s"], fetch_s)
    assert Path(again.json()["instance"]["model_dir"]).parent == agent.host_dir
    assert agent.status()["tiers"]["sata"]["models"] == {MODEL: total}
    assert len(agent.client.get("/moves").json()["moves"]) == 1
    assert agent.stop() in CLEAN_EXIT
    assert not agent.host_dir.exists()  # shutdown removes the running instance's host copy, and the dir it made


def _node(tmp_path: Path, cloud: Cloud, engine: EngineSettings | None = None, **cfg: object) -> NodeAgent:
    tiers = {name: TierConfig(name, tmp_path / name, 1 << 30, *bw)
             for name, bw in (("dram", (None, None)), ("nvme", (None, 4e6)), ("sata", (None, None)))}
    return NodeAgent(AgentConfig(token=TOKEN, stores=[cloud.url], tiers=tiers, host_dir=tmp_path / "host",
                                 engine=engine or EngineSettings(), **cfg))  # type: ignore[arg-type]


def _nothing_left(agent: NodeAgent) -> None:
    """No host copy and no tier content: a failed load leaves nothing behind."""
    assert tier_entries(agent.host.path) == []
    assert all(t.models() == {} and t.used_bytes() == 0 for t in agent.tiers.values())
    assert agent.instances == {}


def test_failed_fetch_and_failed_engines_leave_neither_a_host_copy_nor_a_tier_copy(
        tmp_path: Path, cloud: Cloud) -> None:
    # the engine cannot start (no Tokasaurus here): the fetched host copy goes
    agent = _node(tmp_path, cloud, EngineSettings(kind="tokasaurus", toka_executable=str(tmp_path / "no-toka")))
    with pytest.raises(AgentError) as err:
        agent.load(MODEL, "cloud")
    assert err.value.code == "engine_start_failed"
    _nothing_left(agent)
    agent.shutdown()

    # the engine starts but is not ready in time: stopped, and its host copy goes
    agent = _node(tmp_path, cloud, EngineSettings(ready_timeout_s=0.01))
    with pytest.raises(AgentError) as err:
        agent.load(MODEL)
    assert err.value.code == "engine_start_failed" and "did not become ready" in err.value.message
    _nothing_left(agent)
    agent.shutdown()
    agent.shutdown()  # twice, as `live.agent.serve` does (server end, then its finally): no error the second time

    # every store serves a corrupted object: nothing is placed, in host memory or any tier
    weights = cloud.root / MODEL / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    agent = _node(tmp_path, cloud)
    with pytest.raises(AgentError) as err:
        agent.load(MODEL, "cloud")
    assert err.value.code == "fetch_failed" and "into host memory" in err.value.message
    _nothing_left(agent)
    with pytest.raises(AgentError) as err:  # a tier name or "cloud", nothing else
        agent.load(MODEL, "host")
    assert err.value.code == "unknown_tier" and "'source_tier' must be 'cloud'" in err.value.message
    assert [e["code"] for e in agent.status()["errors"]] == ["fetch_failed"]  # a bad request is no failure
    agent.shutdown()


def test_host_copy_lives_as_long_as_its_instance(tmp_path: Path, cloud: Cloud) -> None:
    # leftovers of an earlier agent in the host dir are removed at start; other entries are not the agent's
    host = tmp_path / "host"
    (host / ".tierlab-host-tiny-old").mkdir(parents=True)
    (host / ".tierlab-fetch-tiny-x").mkdir()
    (host / "not-ours.txt").write_text("kept")
    agent = _node(tmp_path, cloud)
    assert tier_entries(host) == ["not-ours.txt"]
    (host / "not-ours.txt").unlink()

    # an unload while a copy reads the host copy: the copy completes, then the host copy goes
    first = agent.load(MODEL)  # no tier holds it: from the cloud
    assert first["timings"]["engine_tier"] == "host" and len(tier_entries(host)) == 1
    results: dict[str, dict] = {}
    copier = threading.Thread(target=lambda: results.setdefault("copy", agent.copy(MODEL, "nvme")))
    copier.start()  # nvme writes at 4 MB/s: ~2.5 s
    deadline = time.monotonic() + 10
    while not any(n.startswith(".tierlab-copy-") for n in tier_entries(tmp_path / "nvme")):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    agent.unload(first["instance"]["id"])
    assert len(tier_entries(host)) == 1  # still read by the copy
    copier.join()
    assert results["copy"]["from_tier"] == "host" and near(results["copy"]["duration_s"], 10.1e6 / 4e6, 0.25)
    assert tier_entries(host) == [] and agent.tiers["nvme"].holds(MODEL)

    # an engine that dies: /status marks its instance failed and removes its host copy; unload still answers
    second = agent.load(MODEL, "cloud")
    inst = second["instance"]
    assert agent.copy(MODEL, "dram")["from_tier"] == "nvme"  # a tier holds it: read as the simulator would
    os.killpg(inst["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while agent.status()["host"]["copies"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [i["status"] for i in agent.status()["instances"]] == ["failed"] and tier_entries(host) == []
    assert agent.unload(inst["id"]) == {"instance": inst["id"], "stopped": True}
    agent.shutdown()
    assert host.is_dir()  # the host dir was there before the agent: kept


def test_the_nic_is_shared_by_every_cloud_fetch_of_the_node(tmp_path: Path, cloud: Cloud) -> None:
    nic_Bps = 10e6
    agent = _node(tmp_path, cloud, nic_Bps=nic_Bps)  # streams unpaced: the NIC is the bottleneck
    total = cloud.registry.manifest(MODEL).total_bytes
    assert agent.status()["cloud"]["nic_Bps"] == nic_Bps
    alone = agent.copy(MODEL, "dram")
    assert alone["from_tier"] == "cloud" and near(alone["duration_s"], total / nic_Bps), alone
    agent.evict(MODEL, "dram")
    results: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda t=t: results.setdefault(t, agent.copy(MODEL, t)))
               for t in ("dram", "sata")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tier in ("dram", "sata"):  # two fetches at once: half of the NIC each
        assert results[tier]["from_tier"] == "cloud"
        assert near(results[tier]["duration_s"], 2 * total / nic_Bps), results
    agent.shutdown()


def test_host_dir_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--token", TOKEN, "--store", "file:///s"]
    config, _ = config_from_args([*base, "--tier", f"dram={tmp_path / 'shm' / 'd'}:1G", "--nic-Bps", "1e9"])
    assert config.host_dir == tmp_path / "shm" / "d-host" and config.nic_Bps == 1e9  # beside the dram tier
    config, _ = config_from_args([*base, "--tier", f"sata={tmp_path / 's'}:1G", "--host-dir", str(tmp_path / "h")])
    assert config.host_dir == tmp_path / "h"
    for flags, message in ((["--host-dir", str(tmp_path / "s" / "h")], "AgentConfig.host_dir"),
                           (["--nic-Bps", "0"], "--nic-Bps must be > 0")):
        with pytest.raises(SystemExit):
            config_from_args([*base, "--tier", f"sata={tmp_path / 's'}:1G", *flags])
        assert message in capsys.readouterr().err
