"""The chaos replay (`python -m experiments.chaos`): its seeded schedule and its summary on synthetic data, and a
short seeded run through the real stack (null engine, 2 nodes, ~30 s) with engine kills, an agent SIGKILL and
restart, a full tier and a delayed tier, and one with the primary object store (azurite) hung and stopped while a
model it must serve is cold, after which every invariant must hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ConfigError
from experiments.chaos import clean, leftover_files, render, summarize
from experiments.chaos_faults import FILL_NAME, FaultSpec, Node, schedule
from tests.live_serve.serving import checkpoint_cache, env

REPO = Path(__file__).resolve().parents[2]
SPECS = [FaultSpec("engine_kill", 3, 1.0), FaultSpec("agent_kill", 2, 3.0), FaultSpec("tier_fill", 1, 5.0),
         FaultSpec("tier_delay", 1, 5.0, tier="sata")]


# --------------------------------------------------------------------------- the schedule


def test_schedule_is_seeded_and_places_one_fault_per_slot() -> None:
    a = schedule(SPECS, ["n0", "n1"], 120.0, seed=4, warmup_s=5.0, tail_s=8.0)
    b = schedule(SPECS, ["n0", "n1"], 120.0, seed=4, warmup_s=5.0, tail_s=8.0)
    assert [f.row() for f in a] == [f.row() for f in b]
    c = schedule(SPECS, ["n0", "n1"], 120.0, seed=5, warmup_s=5.0, tail_s=8.0)
    assert [(f.kind, f.start_s) for f in a] != [(f.kind, f.start_s) for f in c]
    assert sorted(f.kind for f in a) == sorted(s.kind for s in SPECS for _ in range(s.count))
    slot = (120.0 - 8.0 - 5.0) / len(a)
    for i, f in enumerate(a):
        assert 5.0 + i * slot <= f.start_s < f.end_s <= 5.0 + (i + 1) * slot + 1e-6  # inside its own slot
        assert f.node in ("n0", "n1")
        assert f.tier == ("sata" if f.kind == "tier_delay" else "nvme" if f.kind == "tier_fill" else "")
    assert len({f.node for f in a}) == 2  # seeded spread over the nodes
    assert schedule([], ["n0"], 10.0, 0, 1.0, 1.0) == []


def test_schedule_refuses_what_does_not_fit_and_unknown_kinds() -> None:
    with pytest.raises(ConfigError, match="do not fit"):
        schedule([FaultSpec("tier_fill", 5, 10.0)], ["n0"], 40.0, 0, 5.0, 5.0)
    with pytest.raises(ConfigError, match="unknown kind"):
        FaultSpec("disk_melt")
    with pytest.raises(ConfigError, match="mode"):
        FaultSpec("store_outage", mode="flaky")
    with pytest.raises(ConfigError, match="no node"):
        schedule(SPECS, [], 120.0, 0, 5.0, 5.0)


def test_node_reads_tiers_and_paces_from_the_agent_command_line() -> None:
    n = Node("n0", "http://x", 1, ["python", "--tier=dram=/dev/shm/a/n0/dram:268435456",
                                   "--tier=sata=/w/n0/sata:2000000000", "--tier-bw=sata=35000000.0:32500000.0:0.0001"])
    assert n.tiers() == {"dram": (Path("/dev/shm/a/n0/dram"), 268435456), "sata": (Path("/w/n0/sata"), 2000000000)}
    assert n.paces() == {"sata": (35e6, 32.5e6, 1e-4)}


# --------------------------------------------------------------------------- the summary, on synthetic data


def _req(at: float, e2e: float, outcome: str = "completed", reason: str = "") -> dict[str, object]:
    return {"at_s": at, "e2e_s": e2e, "outcome": outcome, "reason": reason, "hung": False}


def test_summary_splits_latency_by_fault_window_and_measures_recovery() -> None:
    faults = [{"index": 0, "kind": "engine_kill", "node": "n0", "start_s": 10.0, "end_s": 11.0, "healthy_at": None},
              {"index": 1, "kind": "agent_kill", "node": "n1", "start_s": 20.0, "end_s": 23.0, "healthy_at": 24.0}]
    client = [_req(1.0, 0.1), _req(2.0, 0.1), _req(9.5, 1.0),  # the last overlaps the kill's window
              _req(10.5, 0.0, "failed", "engine_unreachable"), _req(11.2, 0.3),  # recovered at 11.5
              _req(21.0, 2.5), _req(23.1, 0.2),  # completes at 23.3, but the agent answered only at 24.0
              _req(30.0, 0.1), _req(31.0, 15.0, "failed", "client_timeout"),
              _req(32.0, 0.2, "failed", "stream_ended_without_done")]
    s = summarize(client, faults, deadline_s=15.0, settle_s=2.0)
    assert s["requests"] == 10 and s["completed"] == 7 and s["failed"] == 3
    assert s["failed_by_cause"] == {"failed:client_timeout": 1, "failed:engine_unreachable": 1,
                                    "failed:stream_ended_without_done": 1}
    assert s["faults_by_kind"] == {"agent_kill": 1, "engine_kill": 1}
    assert s["completed_during_faults"] == 4  # 9.5, 11.2, 21.0, 23.1
    assert s["p99_during_faults_s"] == pytest.approx(2.5, abs=0.1) and s["p99_outside_faults_s"] < 0.2
    assert s["recovery_s"] == {"0:engine_kill": 0.5, "1:agent_kill": 1.0}
    assert s["past_deadline"] == 1  # the client timeout
    assert s["unclean_errors"] == 2  # the timeout and the stream that ended without an error event
    assert clean(_req(0, 0, "rejected", "model_not_found")) and not clean(_req(0, 0, "failed", "http_502"))
    none = summarize([_req(1.0, 0.1)], [{"index": 0, "kind": "tier_fill", "start_s": 5.0, "end_s": 6.0}], 15.0, 1.0)
    assert none["recovery_s"] == {"0:tier_fill": None} and none["p99_during_faults_s"] is None


def test_leftover_files_finds_staging_dirs_and_fill_junk_only(tmp_path: Path) -> None:
    tier = tmp_path / "n0" / "nvme"
    (tier / "tiny-a").mkdir(parents=True)
    (tier / "tiny-a" / ".tierlab-revision").write_text("abc\n")
    (tier / ".tierlab-pace").write_bytes(b"\0" * 16)
    assert leftover_files([tmp_path, tmp_path / "absent"]) == []
    (tier / ".tierlab-copy-tiny-b-x").mkdir()
    (tier / FILL_NAME).write_bytes(b"")
    assert sorted(Path(p).name for p in leftover_files([tmp_path])) == [".tierlab-copy-tiny-b-x", FILL_NAME]


def test_render_has_the_chaos_table_and_the_soak_section() -> None:
    faults = [{"index": 0, "kind": "tier_fill", "node": "n0", "start_s": 5.0, "end_s": 6.0, "tier": "nvme",
               "target": "/x", "healthy_at": None}]
    s = summarize([_req(7.0, 0.1)], faults, 15.0, 1.0)
    chaos = {"options": {"duration_s": 30.0, "rate_rps": 4.0, "seed": 0, "gateway_timeout_s": 10.0,
                         "deadline_margin_s": 5.0}, "summary": s,
             "faults": [{**r, "error": ""} for r in s.pop("fault_rows")], "checks": {"no_lost_request": True}}
    soak = {"requests": {"sent": 3000, "completed": 3000, "gateway_rows": 3000, "no_lost_request": True},
            "analysis": {"verdict": {"flat": True, "not_flat": []}}, "options": {"duration_s": 600, "rate_rps": 5}}
    text = render(chaos, soak, "python -m experiments.chaos publish=true")
    assert "## Chaos replay" in text and "| 0 | tier_fill nvme | n0 | /x | 5.0 | 6.0 | 1.1 |" in text
    assert "## Soak" in text and "reliability/soak.png" in text and "3000 sent" in text
    assert "No stored soak" in render(chaos, None, "x")


# --------------------------------------------------------------------------- a short run through the real stack


def test_short_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    out = tmp_path / "chaos"
    faults = ("[{kind: engine_kill, count: 2, duration_s: 1.0}, {kind: agent_kill, count: 1, duration_s: 2.0}, "
              "{kind: tier_fill, count: 1, duration_s: 3.0, tier: nvme}, "
              "{kind: tier_delay, count: 1, duration_s: 3.0, tier: sata}]")
    argv = [sys.executable, "-m", "experiments.chaos", "duration_s=32", "rate_rps=4", "seed=1", "progress=false",
            f"hydra.run.dir={out}", f"faults={faults}", f'serve_extra=["checkpoint_cache={checkpoint_cache()}"]',
            "object_store=null"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env(), cwd=REPO, timeout=300)
    assert (out / "chaos.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "chaos.json").read_text())
    print("\n" + (proc.stdout.strip().splitlines() or [""])[0])
    s = result["summary"]
    assert s["faults_by_kind"] == {"agent_kill": 1, "engine_kill": 2, "tier_delay": 1, "tier_fill": 1}
    for f in result["faults"]:
        assert f["injected_at"] is not None and f["cleared_at"] is not None and f["target"], f
        assert f["recovery_s"] is not None, f  # the load saw each fault end and a request complete after it
    kill = next(f for f in result["faults"] if f["kind"] == "agent_kill")
    assert kill["healthy_at"] is not None and kill["detail"]["new_pid"] > 0
    assert result["checks"] == {k: True for k in result["checks"]}, (result["checks"], result["requests"],
                                                                     result["tiers"], result["processes"],
                                                                     result["temp_files_left"])
    assert s["requests"] >= 80 and result["requests"]["gateway_rows"] == s["requests"]
    assert result["tiers"]["model_dirs_checked"] >= 1 and result["processes"]["seen"] >= 5
    assert (out / "reliability.md").read_text().count("| engine_kill |") == 2
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_store_outages_fail_over_to_the_next_store_within_the_budget(tmp_path: Path) -> None:
    """The primary store (azurite, started by the run) hung (SIGSTOP) and then stopped and restarted, each while
    a model made cold must be fetched: its requests complete, within the failover budget on top of a load, the
    agents saw the store fail and come back, and every invariant holds."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("adlfs")
    from experiments.store_servers import ServiceUnavailable, azurite_blob_exe

    try:
        azurite_blob_exe()
    except ServiceUnavailable as e:
        pytest.skip(f"azurite unavailable here: {e}")
    out = tmp_path / "chaos"
    faults = ("[{kind: store_outage, count: 1, duration_s: 4.0, mode: hang}, "
              "{kind: store_outage, count: 1, duration_s: 4.0, mode: down}]")
    argv = [sys.executable, "-m", "experiments.chaos", "duration_s=26", "rate_rps=4", "seed=2", "progress=false",
            f"hydra.run.dir={out}", f"faults={faults}", f'serve_extra=["checkpoint_cache={checkpoint_cache()}"]',
            "object_store=azurite", "keep_workdir=false"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env(), cwd=REPO, timeout=300)
    assert (out / "chaos.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "chaos.json").read_text())
    print("\n" + (proc.stdout.strip().splitlines() or [""])[0])
    assert result["checks"] == {k: True for k in result["checks"]}, (result["checks"], result["faults"])
    assert result["stores"][0] == "az://tierlab-chaos/models" and result["stores"][1].startswith("file://")
    for f in result["faults"]:
        assert f["kind"] == "store_outage" and not f["error"], f
        assert f["detail"]["unloaded"] + f["detail"]["evicted"] >= 1, f  # the outage met a cold model
        cold = f["cold_model_requests"]
        assert cold["sent"] >= 1 and cold["completed"] == cold["sent"], f
        assert cold["max_e2e_s"] < 2.0 + 2.0, f  # the 2 s failover budget on top of a tiny model's cold start
    agent_logs = "".join(p.read_text() for p in (out / "serve" / "logs").glob("agent-*.log"))
    failures = [ln for ln in agent_logs.splitlines() if "tierlab-chaos/models did not answer" in ln]
    assert any("Timeout" in ln for ln in failures), agent_logs  # the hung store: a timeout, not a 30 s wait
    assert any("Cannot connect" in ln for ln in failures), agent_logs  # the stopped one: refused
    assert proc.returncode == 0, proc.stderr[-3000:]
