"""Crash consistency of the live stack (issue 14 item 8): `experiments.serve` SIGKILLed under load leaves no
orphan agent or engine, the restarted stack finds only complete copies, and its dram tier (tmpfs) is removed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from live.agent_tiers import REVISION_FILE, STAGING_PREFIX
from live.lifecycle import pid_alive
from live.manifest import verify
from live.registry import Registry
from live.registry_versions import revision_of
from tests.live_crash.trials import (
    Summary,
    n_trials,
    rng_for,
    show_summary,
)
from tests.live_serve.serving import checkpoint_cache, env, processes

# --- 4. gateway (experiments.serve) killed under load ---------------------------------------------------------
SERVE_OVERRIDES = ["nodes=1", "~catalog.small-a", "policy.autoscaling.keep_alive_s=30"]


@dataclass
class ServeRun:
    """A `python -m experiments.serve` process on a fixed workdir (its tiers and cloud survive a restart)."""

    proc: subprocess.Popen[bytes]
    info: dict


def start_serve(tmp: Path, workdir: Path, run: int) -> ServeRun:
    """Start the live stack (gateway, one agent, CPU engines) on `workdir`; wait for serve.json."""
    out_dir = tmp / f"run{run}"
    argv = [sys.executable, "-m", "experiments.serve", "port=0", "policy=seed_tiered", f"hydra.run.dir={out_dir}",
            f"checkpoint_cache={checkpoint_cache()}", "progress=false", f"workdir={workdir}", *SERVE_OVERRIDES]
    log = tmp / f"serve{run}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=tmp)
    deadline = time.monotonic() + 120
    while not (out_dir / "serve.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"experiments.serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    time.sleep(0.2)  # written privately in one go; a short grace for the reader
    return ServeRun(proc, json.loads((out_dir / "serve.json").read_text()))


def _mentioning(*needles: str) -> list[int]:
    """Live processes (not this one) whose command line mentions any needle (agents name their tier dirs,
    engines their --model-dir)."""
    return [p.pid for p in processes() if any(n in p.cmdline for n in needles)]


def _chat(run: ServeRun, model: str) -> int:
    import httpx

    key = next(iter(run.info["tenants"].values()))["api_key"]
    r = httpx.post(run.info["openai_base_url"] + "/chat/completions", timeout=120,
                   headers={"Authorization": f"Bearer {key}"},
                   json={"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})
    return r.status_code


def check_tiers_on_disk(workdir: Path, registry: Registry) -> dict[str, list[str]]:
    """Every model dir in the persistent tiers (nvme, sata) is complete, verified and marked; no staging dirs."""
    held = {}
    for tier in sorted(p for node in workdir.glob("n*") for p in node.iterdir() if p.is_dir()):
        entries = sorted(os.listdir(tier))
        staging = [e for e in entries if e.startswith(STAGING_PREFIX) and (tier / e).is_dir()]
        assert not staging, f"{tier}: staging dirs after the restart: {staging}"
        models = [e for e in entries if (tier / e).is_dir()]
        for model in models:
            manifest = registry.manifest(model)
            assert verify(tier / model, manifest) == [], f"{tier}: partial checkpoint {model} visible"
            assert (tier / model / REVISION_FILE).read_text().strip() == revision_of(manifest)
        held[str(tier.relative_to(workdir))] = models
    return held


def test_gateway_killed_under_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGKILL `experiments.serve` (gateway + its agents) while requests run: its agents and engines exit (no
    orphans, --exit-with-parent); restarted on the same workdir, the tiers hold only complete, marked copies
    and requests are served again."""
    pytest.importorskip("hydra")
    pytest.importorskip("httpx")
    rng = rng_for("gateway")
    workdir = tmp_path / "work"
    summary = Summary("gateway (experiments.serve) killed under load", 4.0)
    leaked_dram: list[Path] = []
    try:
        trials = n_trials(2) // 2  # the heaviest scenario: half the trials (one by default)
        for trial in range(max(1, trials)):
            run = start_serve(tmp_path, workdir, trial)
            dram_root = Path(run.info["dram_root"])
            codes: list[object] = []

            def load(run: ServeRun = run, codes: list[object] = codes) -> None:
                for i in range(6):
                    try:
                        codes.append(_chat(run, ("tiny-a", "tiny-b")[i % 2]))
                    except Exception as exc:  # the gateway died under the request
                        codes.append(type(exc).__name__)
                        return

            clients = [threading.Thread(target=load, daemon=True) for _ in range(3)]
            for c in clients:
                c.start()
            fraction = rng.uniform(0.05, 1.0)
            time.sleep(fraction * summary.measured_s)
            served_before = sum(1 for c in codes if c == 200)
            run.proc.kill()
            run.proc.wait(timeout=10)
            stack = [a["pid"] for a in run.info["agents"]]
            deadline = time.monotonic() + 20
            while (alive := [p for p in stack if pid_alive(p)] + _mentioning(str(workdir), str(dram_root))) \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not alive, f"processes outlived the SIGKILLed gateway (orphans): {alive}"
            for c in clients:
                c.join(timeout=30)
            if dram_root.exists():
                leaked_dram.append(dram_root)
            restarted = start_serve(tmp_path, workdir, 100 + trial)
            registry = Registry([f"file://{workdir / 'cloud'}"])
            held = check_tiers_on_disk(workdir, registry)
            assert _chat(restarted, "tiny-a") == 200
            restarted.proc.send_signal(2)  # SIGINT: the clean stop
            assert restarted.proc.wait(timeout=90) == 0
            check_tiers_on_disk(workdir, registry)
            tiers = ";".join(f"{t}:{'+'.join(m)}" for t, m in held.items() if m) or "tiers-empty"
            summary.add(fraction, f"served-before-kill:{served_before}|{tiers}",
                        "dram-tmpfs-left" if dram_root.exists() else "")
    finally:
        for path in leaked_dram:  # our own runs' tmpfs dirs: memory
            shutil.rmtree(path, ignore_errors=True)
    show_summary(capsys, summary)


def test_gateway_killed_leaves_no_dram_tmpfs(tmp_path: Path) -> None:
    """After the gateway is SIGKILLed and the stack restarted, the killed run's dram tier (tmpfs) is gone: the
    restarted run removes the dram tiers whose owner died (`experiments.serve.sweep_dead_dram_roots`)."""
    pytest.importorskip("hydra")
    pytest.importorskip("httpx")
    workdir = tmp_path / "work"
    run = start_serve(tmp_path, workdir, 0)
    dram_root = Path(run.info["dram_root"])
    try:
        assert _chat(run, "tiny-a") == 200
        run.proc.kill()
        run.proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _mentioning(str(workdir), str(dram_root)) and time.monotonic() < deadline:
            time.sleep(0.2)
        restarted = start_serve(tmp_path, workdir, 1)
        restarted.proc.send_signal(2)
        assert restarted.proc.wait(timeout=90) == 0
        assert not dram_root.exists(), f"the killed run's dram tier {dram_root} (tmpfs) is left: " \
            f"{sorted(p.name for p in dram_root.iterdir())}"
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
        shutil.rmtree(dram_root, ignore_errors=True)
