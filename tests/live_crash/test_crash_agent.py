"""Crash consistency of an agent (issue 14 item 8): SIGKILLed mid tier copy or cloud fetch, restarted on the same
dirs, it recovers its tiers from disk: only complete, revision-marked models, staging swept, no orphan engine."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from live.agent_tiers import REVISION_FILE, STAGING_PREFIX
from live.engines.base import running_group_members
from live.lifecycle import pid_alive
from live.manifest import Manifest, verify
from live.pacing import PACE_FILE
from live.registry_versions import revision_of
from tests.live_agent.conftest import MODEL, AgentProc, Cloud
from tests.live_crash.trials import (
    Summary,
    kill_points,
    n_trials,
    rng_for,
    show_summary,
)

# --- 3. agent killed mid tier copy / cloud fetch --------------------------------------------------------------
CLOUD_STREAM_BPS = 2.5e6
NVME_BPS = 6e6
AGENT_FLAGS = ["--cloud-streams", "2", "--cloud-stream-Bps", str(CLOUD_STREAM_BPS), "--tier-bw",
               f"nvme={NVME_BPS:.0f}:{NVME_BPS:.0f}"]


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid) and not running_group_members(pid):
            return True
        time.sleep(0.1)
    return False


def _content_bytes(path: Path) -> int:
    """Bytes of the files under `path`, the pacing state and revision marks left out (what a tier counts)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name not in (PACE_FILE, REVISION_FILE))


def check_agent_state(agent: AgentProc, manifest: Manifest) -> dict[str, list[str]]:
    """Assert a restarted agent's tiers agree with the files on disk; the models per tier."""
    rev = revision_of(manifest)
    status = agent.status()
    held: dict[str, list[str]] = {}
    for name, path in agent.tiers.items():
        entries = sorted(os.listdir(path))
        staging = [e for e in entries if e.startswith(STAGING_PREFIX) and (path / e).is_dir()]
        assert not staging, f"tier {name}: staging dirs not swept at start: {staging}"
        on_disk = [e for e in entries if (path / e).is_dir()]
        listed = status["tiers"][name]["models"]
        assert sorted(listed) == on_disk, f"tier {name}: /status lists {listed}, disk holds {on_disk}"
        for model in on_disk:
            assert verify(path / model, manifest) == [], f"tier {name}: partial checkpoint {model} visible"
            assert (path / model / REVISION_FILE).read_text().strip() == rev
            assert listed[model] == manifest.total_bytes
        assert status["tiers"][name]["used_bytes"] == _content_bytes(path)
        held[name] = on_disk
    host = [e for e in os.listdir(agent.host_dir) if e.startswith(STAGING_PREFIX)]
    assert not host, f"host copies of the killed agent not swept: {host}"
    assert status["instances"] == []
    return held


def _place_by_hand(tier_dir: Path, ckpt: Path, rev: str) -> None:
    """Set up a complete, marked copy in a tier dir (as an earlier agent would have left it)."""
    tier_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ckpt, tier_dir / MODEL)
    (tier_dir / MODEL / REVISION_FILE).write_text(rev + "\n")


def test_agent_killed_mid_copy(cloud: Cloud, tiny_ckpt: Path, start_agent: Callable[..., AgentProc],
                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGKILL the agent while a paced cloud fetch (-> sata) or tier copy (sata -> nvme) runs; on restart the
    tiers hold only complete, marked copies, staging is swept, /status agrees with the disk, and the engine the
    killed agent had started (first trial of each kind) is gone."""
    rng = rng_for("agent")
    manifest = cloud.registry.manifest(MODEL)
    rev = revision_of(manifest)

    # measure both kinds on one agent
    dirs = {t: tmp_path / f"probe-{t}" for t in ("dram", "nvme", "sata")}
    probe = start_agent(cloud.url, extra=AGENT_FLAGS, tier_dirs=dirs, host_dir=tmp_path / "probe-host")
    measured = {}
    for kind, to_tier in (("fetch", "sata"), ("copy", "nvme")):
        t0 = time.perf_counter()
        r = probe.post("/tiers/copy", {"model": MODEL, "to_tier": to_tier})
        assert r.status_code == 200, r.text
        measured[kind] = time.perf_counter() - t0
    probe.stop()
    summaries = {k: Summary(f"agent killed mid {k} ({'cloud -> sata' if k == 'fetch' else 'sata -> nvme'})",
                            measured[k]) for k in measured}

    trials = n_trials(4)
    points = {k: kill_points(rng, (trials + (k == "fetch")) // 2) for k in ("fetch", "copy")}  # trials alternate
    for trial in range(trials):
        kind = ("fetch", "copy")[trial % 2]
        fraction = points[kind][trial // 2]
        to_tier = "sata" if kind == "fetch" else "nvme"
        dirs = {t: tmp_path / f"a{trial}-{t}" for t in ("dram", "nvme", "sata")}
        host_dir = tmp_path / f"a{trial}-host"
        if kind == "copy":
            _place_by_hand(dirs["sata"], tiny_ckpt, rev)
        agent = start_agent(cloud.url, extra=AGENT_FLAGS, tier_dirs=dirs, host_dir=host_dir)
        engine_pid = None
        # in copy trials, an engine (from sata, or from the cloud: a host copy) that must not outlive the agent; the
        # copy still reads sata (a tier holder is preferred to a host copy), paced by the nvme write link
        if kind == "copy":
            r = agent.post("/load", {"model": MODEL, **({"source_tier": "sata"} if trial % 4 == 1 else {})})
            assert r.status_code == 200, r.text
            engine_pid = next(i["pid"] for i in agent.status()["instances"])
            assert pid_alive(engine_pid)
        result: dict[str, object] = {}

        def do_copy(agent: AgentProc = agent, to_tier: str = to_tier, result: dict[str, object] = result) -> None:
            try:
                result["code"] = agent.post("/tiers/copy", {"model": MODEL, "to_tier": to_tier}).status_code
            except Exception as exc:  # the agent died under the request
                result["error"] = type(exc).__name__

        mover = threading.Thread(target=do_copy, daemon=True)
        mover.start()
        time.sleep(fraction * measured[kind])
        finished = not mover.is_alive()
        agent.proc.kill()
        agent.proc.wait(timeout=10)
        mover.join(timeout=30)
        staging_left = [e for e in os.listdir(dirs[to_tier]) if e.startswith(STAGING_PREFIX)
                        and (dirs[to_tier] / e).is_dir()]
        host_left = [e for e in os.listdir(host_dir) if e.startswith(STAGING_PREFIX)] if host_dir.exists() else []
        if engine_pid is not None:
            assert _wait_gone(engine_pid, 10.0), f"engine {engine_pid} outlived its SIGKILLed agent (orphan)"

        restarted = start_agent(cloud.url, extra=AGENT_FLAGS, tier_dirs=dirs, host_dir=host_dir)
        held = check_agent_state(restarted, manifest)
        outcome = "complete" if MODEL in held[to_tier] else "absent"
        if finished:
            assert result.get("code") == 200 and outcome == "complete"
        r = restarted.post("/tiers/copy", {"model": MODEL, "to_tier": to_tier})
        assert r.status_code == 200, r.text
        assert r.json()["kind"] == ("cached" if outcome == "complete" else kind)
        check_agent_state(restarted, manifest)
        restarted.stop()
        left = [f"tier-staging:{len(staging_left)}"] if staging_left else []
        left += [f"host:{len(host_left)}"] if host_left else []
        if engine_pid is not None:
            left.append("engine:gone")
        summaries[kind].add(fraction, outcome if not finished else "done", ",".join(left))
    for s in summaries.values():
        show_summary(capsys, s)
