"""Emulated tiers in the node agent: every byte movement is paced as the simulator's hops are.

Real agent processes (or an in-process NodeAgent), real engine processes, real tier dirs and a file://
cloud; the tiny checkpoint (~10 MB) at a few MB/s, so each transfer takes one to three seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from live.agent import AgentConfig, AgentError, NodeAgent, config_from_args
from live.agent_tiers import TierConfig
from live.manifest import WEIGHTS_FILE
from live.pacing import PACE_FILE, READ_PACE_ENV, PaceSpec

from .conftest import MODEL, REPO, TOKEN, AgentProc, Cloud
from .test_agent import CLEAN_EXIT, complete, tier_entries

SATA_READ, SATA_WRITE = 8e6, 20e6
NVME_READ, NVME_WRITE, NVME_LATENCY = 20e6, 4e6, 0.05
STREAMS, STREAM_BPS, CLOUD_LATENCY = 4, 2e6, 0.2


def near(measured_s: float, expected_s: float, rel: float = 0.2) -> bool:
    return abs(measured_s - expected_s) <= rel * expected_s


def test_fetch_copy_and_engine_read_follow_the_emulated_devices(
        cloud: Cloud, start_agent: Callable[..., AgentProc]) -> None:
    agent = start_agent(cloud.url, extra=[
        "--tier-bw", f"sata={SATA_READ}:{SATA_WRITE}", "--tier-bw", f"nvme={NVME_READ}:{NVME_WRITE}:{NVME_LATENCY}",
        "--cloud-streams", str(STREAMS), "--cloud-stream-Bps", str(STREAM_BPS), "--cloud-latency-s",
        str(CLOUD_LATENCY), "--memory-budget", "2G", "--max-num-seqs", "3"])
    manifest = cloud.registry.manifest(MODEL)
    total = manifest.total_bytes

    # /status describes the emulated node with the names the gateway reads
    status = agent.status()
    assert {k: status["tiers"]["sata"][k] for k in ("read_Bps", "write_Bps", "latency_s")} == {
        "read_Bps": SATA_READ, "write_Bps": SATA_WRITE, "latency_s": 0.0}
    assert status["tiers"]["nvme"]["latency_s"] == NVME_LATENCY
    assert {k: status["tiers"]["dram"][k] for k in ("read_Bps", "write_Bps", "latency_s")} == {
        "read_Bps": None, "write_Bps": None, "latency_s": None}  # unpaced
    assert status["cloud"] == {"stream_Bps": STREAM_BPS, "streams": STREAMS, "latency_s": CLOUD_LATENCY,
                               "nic_Bps": None}
    assert status["accelerator"] == {"memory_bytes": 2 << 30}
    assert status["engine"] == {"kind": "cpu", "max_num_seqs": 3, "prefix_cache_blocks": 0}

    # cloud -> sata: streams x stream bandwidth after the first-byte latency (sata's writes are faster)
    fetch = agent.post("/tiers/copy", {"model": MODEL, "to_tier": "sata"})
    assert fetch.status_code == 200, fetch.text
    assert fetch.json()["kind"] == "fetch"
    expected = total / (STREAMS * STREAM_BPS) + CLOUD_LATENCY
    assert near(fetch.json()["duration_s"], expected), (fetch.json()["duration_s"], expected)

    # sata -> nvme: min(sata read, nvme write) = nvme's write
    copy = agent.post("/tiers/copy", {"model": MODEL, "to_tier": "nvme"})
    assert copy.status_code == 200, copy.text
    expected = total / min(SATA_READ, NVME_WRITE)
    assert near(copy.json()["duration_s"], expected), (copy.json()["duration_s"], expected)
    assert tier_entries(agent.tiers["nvme"]) == sorted([PACE_FILE, MODEL])  # no staging dir left
    assert agent.status()["tiers"]["nvme"]["used_bytes"] == total  # the state file is not content

    # an engine on sata reads its weights no faster than sata's read bandwidth
    load = agent.post("/load", {"model": MODEL, "source_tier": "sata"})
    assert load.status_code == 200, load.text
    inst = load.json()["instance"]
    stats = httpx.get(inst["url"] + "/stats", timeout=10).json()
    weights = manifest.file(WEIGHTS_FILE).size_bytes
    assert weights / SATA_READ * 0.95 <= stats["read_s"] <= weights / SATA_READ * 1.6, stats["read_s"]
    cmdline = Path(f"/proc/{inst['pid']}/cmdline").read_bytes().split(b"\0")
    assert cmdline[cmdline.index(b"--max-num-seqs") + 1] == b"3"
    assert complete(inst)["usage"]["completion_tokens"] == 4
    assert agent.stop() in CLEAN_EXIT


def _node(tmp_path: Path, cloud: Cloud, **bw: tuple[float | None, float | None]) -> NodeAgent:
    tiers = {name: TierConfig(name, tmp_path / name, 1 << 30, *bw.get(name, (None, None)))
             for name in ("dram", "nvme", "sata")}
    return NodeAgent(AgentConfig(token=TOKEN, stores=[cloud.url], tiers=tiers))


def test_concurrent_copies_share_the_source_tier_and_failures_leave_nothing(
        tmp_path: Path, cloud: Cloud) -> None:
    agent = _node(tmp_path, cloud, sata=(SATA_READ, None))
    total = cloud.registry.manifest(MODEL).total_bytes
    agent.copy(MODEL, "sata")  # an unpaced cloud: quick
    results: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda t=t: results.setdefault(t, agent.copy(MODEL, t)))
               for t in ("dram", "nvme")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tier in ("dram", "nvme"):  # each at half of sata's read bandwidth, not at all of it
        assert results[tier]["from_tier"] == "sata"
        assert near(results[tier]["duration_s"], 2 * total / SATA_READ), results

    # a paced copy that fails its checksum leaves no partial dir in the destination
    agent.evict(MODEL, "nvme")
    agent.evict(MODEL, "dram")  # sata is then the only (and the corrupted) source
    weights = agent.tiers["sata"].model_dir(MODEL) / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AgentError, match="does not match the manifest") as err:
        agent.copy(MODEL, "nvme")
    assert err.value.code == "checksum_mismatch"
    assert tier_entries(tmp_path / "nvme") == []
    agent.shutdown()


def test_engines_get_the_read_pacing_of_disk_tiers_only(tmp_path: Path, cloud: Cloud) -> None:
    """DRAM is host memory: core.loadtime has no fetch hop from it, so an engine's read of it is not paced."""
    agent = _node(tmp_path, cloud, sata=(SATA_READ, None), dram=(1e9, 1e9), nvme=(None, NVME_WRITE))
    spec = PaceSpec.from_env(agent.engine_env(agent.tiers["sata"]))
    assert spec is not None and spec.read_Bps == SATA_READ and spec.state_path == str(tmp_path / "sata" / PACE_FILE)
    assert agent.engine_env(agent.tiers["dram"]) == {READ_PACE_ENV: ""}
    assert agent.engine_env(agent.tiers["nvme"]) == {READ_PACE_ENV: ""}  # reads unpaced
    agent.shutdown()


@pytest.mark.parametrize(("flags", "message"), [
    (["--tier-bw", "sata=0:1e6"], "tier 'sata' read_Bps must be > 0"),
    (["--tier-bw", "sata=1e6:-5"], "tier 'sata' write_Bps must be > 0"),
    (["--tier-bw", "sata=nan:1e6"], "tier 'sata' read_Bps must be > 0"),
    (["--tier-bw", "sata=fast:1e6"], "tier 'sata' read_Bps 'fast' is not a number"),
    (["--tier-bw", "sata=1e6:1e6:-1"], "tier 'sata' latency_s must be"),
    (["--tier-bw", "sata=1e6"], "use NAME=READ_BPS:WRITE_BPS"),
    (["--tier-bw", "nvme=1e6:1e6"], "no tier 'nvme' on this node"),
    (["--tier-bw", "sata=1e6:1e6", "--tier-bw", "sata=2e6:2e6"], "tier 'sata' given twice"),
    (["--cloud-stream-Bps", "0"], "--cloud-stream-Bps must be > 0"),
    (["--cloud-stream-Bps", "nan"], "--cloud-stream-Bps must be > 0"),
    (["--cloud-latency-s", "-0.1"], "--cloud-latency-s must be"),
    (["--cloud-streams", "0"], "--cloud-streams must be >= 1"),
    (["--memory-budget", "lots"], "bad size 'lots'"),
    (["--memory-budget", "0"], "--memory-budget must be > 0"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be >= 1"),
])
def test_bad_flags_are_refused_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 flags: list[str], message: str) -> None:
    base = ["--token", TOKEN, "--store", "file:///nowhere", "--tier", f"sata={tmp_path / 'sata'}:1G"]
    with pytest.raises(SystemExit) as exit_:
        config_from_args(base + flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "sata").exists()  # refused before any tier dir is made


def test_cli_refuses_bad_bandwidth_and_accepts_inf(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "live.agent", "--token", TOKEN, "--store", "file:///nowhere",
            "--tier", f"sata={tmp_path / 'sata'}:1G", "--tier-bw", "sata=-1:1e6"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "tier 'sata' read_Bps must be > 0" in proc.stderr
    config, _ = config_from_args(["--token", TOKEN, "--store", "file:///s", "--tier", f"sata={tmp_path}:1G",
                                  "--tier-bw", "sata=inf:5e6:0.001", "--cloud-stream-Bps", "inf"])
    sata = config.tiers["sata"]
    assert (sata.read_Bps, sata.write_Bps, sata.latency_s, config.cloud_stream_Bps) == (None, 5e6, 0.001, None)
    assert config.engine.max_num_seqs == 8 and config.memory_budget_bytes is None


def test_interrupted_paced_copy_leaves_no_partial_dir(cloud: Cloud, start_agent: Callable[..., AgentProc]) -> None:
    """SIGTERM cancels a paced copy at once (its staging dir removed); after a SIGKILL the next agent
    sweeps the staging dir the killed one left."""
    slow = ["--tier-bw", "nvme=inf:2e6"]  # ~5 s for the tiny model
    agent = start_agent(cloud.url, extra=slow)
    dirs = dict(agent.tiers)
    assert agent.post("/tiers/copy", {"model": MODEL, "to_tier": "sata"}).status_code == 200

    responses: list[httpx.Response] = []

    def copy_in_background(a: AgentProc) -> threading.Thread:
        def run() -> None:
            with contextlib.suppress(httpx.TransportError):  # a killed agent goes away mid-request
                # its own client: AgentProc.stop() closes the fixture's
                responses.append(httpx.post(a.url + "/tiers/copy", json={"model": MODEL, "to_tier": "nvme"},
                                            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60))
        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 10
        while not any(n.startswith(".tierlab-copy-") for n in tier_entries(dirs["nvme"])):
            assert time.monotonic() < deadline, tier_entries(dirs["nvme"])
            time.sleep(0.05)
        return t

    copier = copy_in_background(agent)
    # /status lists the copy in flight (an eviction would not reach it: the chaos injector waits it out)
    [moving] = agent.status()["transfers"]
    assert (moving["model"], moving["from_tier"], moving["to_tier"]) == (MODEL, "sata", "nvme")
    assert time.time() - 10 < moving["since_unix"] <= time.time()
    t0 = time.monotonic()
    assert agent.stop() in CLEAN_EXIT
    assert time.monotonic() - t0 < 4.0  # not held for the rest of the copy
    copier.join()
    assert tier_entries(dirs["nvme"]) == [PACE_FILE]
    [cancelled] = responses  # answered before the agent exited
    assert cancelled.status_code == 503 and cancelled.json()["error"]["code"] == "shutting_down"

    agent = start_agent(cloud.url, extra=slow, tier_dirs=dirs)
    copier = copy_in_background(agent)
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait()
    copier.join()
    assert any(n.startswith(".tierlab-copy-") for n in tier_entries(dirs["nvme"]))  # killed: no cleanup ran

    agent = start_agent(cloud.url, extra=slow, tier_dirs=dirs)
    assert tier_entries(dirs["nvme"]) == [PACE_FILE]
    status = agent.status()
    assert status["tiers"]["nvme"]["models"] == {} and status["tiers"]["nvme"]["used_bytes"] == 0
    assert status["tiers"]["sata"]["models"] == {MODEL: cloud.registry.manifest(MODEL).total_bytes}
    assert status["tiers"]["nvme"]["write_Bps"] == 2e6
    assert status["transfers"] == []
    assert agent.stop() in CLEAN_EXIT


def test_making_a_model_cold_waits_out_its_copy_in_flight(cloud: Cloud,
                                                          start_agent: Callable[..., AgentProc]) -> None:
    """The chaos injector's `make_cold` against a real agent with a slow copy into nvme in flight: an eviction
    alone does not reach the copy, which would land afterwards and leave the model warm; make_cold waits it out
    (the agent's /status lists it) and evicts what it left, so no tier holds the model when it returns."""
    from experiments.chaos_faults import Context, make_cold

    agent = start_agent(cloud.url, extra=["--tier-bw", "nvme=inf:2e6"])  # ~5 s for the tiny model
    assert agent.post("/tiers/copy", {"model": MODEL, "to_tier": "sata"}).status_code == 200
    copied: list[int] = []
    copier = threading.Thread(target=lambda: copied.append(httpx.post(
        agent.url + "/tiers/copy", json={"model": MODEL, "to_tier": "nvme"},
        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60).status_code))
    copier.start()
    deadline = time.monotonic() + 10
    while not agent.status()["transfers"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ctx = Context({"pid": os.getpid(), "agent_token": TOKEN, "models": [MODEL],
                   "agents": [{"node": "n0", "url": agent.url, "pid": agent.proc.pid}]}, agent.log_path.parent)
    done = make_cold(ctx, MODEL)
    copier.join()
    assert copied == [200]  # the copy was not cut short: it landed, and was evicted after
    status = agent.status()
    assert status["transfers"] == []
    assert {t: s["models"] for t, s in status["tiers"].items()} == {t: {} for t in status["tiers"]}
    assert done["evicted"] == 2 and done["unsettled"] == 0 and done["settle_s"] > 1.0, done
    assert agent.stop() in CLEAN_EXIT
