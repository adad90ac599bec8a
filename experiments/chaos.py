"""`python -m experiments.chaos [overrides]`: steady load through the live stack while faults are injected.

1. starts `experiments.serve` (null engine, as the soak: `experiments.soak.start_stack`) with its workdir inside
   the output directory, so the tiers can be checked after the stop;
2. sends the soak's seeded Poisson load (`experiments.soak.plan` / `send_one`), each request bounded by the
   gateway's `request_timeout_s` plus `deadline_margin_s`, while `experiments.chaos_faults` injects the seeded
   schedule of faults (engine kills, agent SIGKILL + restart, a full tier, a delayed tier); every process of
   the stack is sampled from /proc meanwhile;
3. once the load has drained, checks every tier's model dirs against the registry's manifests, reads the
   gateway's records, stops the stack (and the agents it restarted itself);
4. checks the invariants: every request sent has one client outcome and one gateway record
   (`soak_analysis.lost_requests`), none waited past its deadline, every failure is a clean error (an OpenAI
   error body or an error event), no process of the stack is left, no `.tierlab-` temporary file or fill junk
   is left, and the tiers match the manifests;
5. writes chaos.json (requests, faults by kind, outcomes, failures by cause, p99 latency during faults and
   outside, recovery time per fault) and reliability.md (with the stored soak's section) into the output
   directory, and into docs/ with publish=true. One-line summary; exit status 1 if an invariant failed.

Config: conf/chaos.yaml. Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from core.errors import ConfigError
from experiments.chaos_faults import FAULTS, FILL_NAME, Context, FaultRecord, fault_specs, schedule
from experiments.entry import hydra_command
from experiments.soak import (
    REPO,
    Sent,
    SoakOptions,
    Stack,
    gateway_models,
    gateway_rows,
    options,
    plan,
    send_one,
    start_stack,
)
from experiments.soak_analysis import lost_requests
from experiments.store_servers import StoreServer
from live.agent_tiers import REVISION_FILE, STAGING_PREFIX
from live.lifecycle import wait_gone
from live.pacing import PACE_FILE

# reasons the client gives itself, with no error body from the gateway: not a clean error
UNCLEAN_PREFIXES = ("client_", "http_", "stream_ended_without_done", "no_choices")


# --------------------------------------------------------------------------- the run


async def drive(stack: Stack, ctx: Context, reqs: list[Sent], faults: list[FaultRecord], opts: SoakOptions,
                progress: bool) -> dict[str, Any]:
    """The soak's open-loop load with the faults injected at their times; /proc sampled every 0.25 s."""
    in_flight: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=opts.max_in_flight, max_keepalive_connections=opts.max_in_flight)
    bar = tqdm(total=len(reqs), desc="chaos", unit="req", disable=not progress, mininterval=1.0)
    done = asyncio.Event()
    start = time.monotonic()

    async def sampler() -> None:
        for _ in range(10_000_000):  # bounded by the run's end; the count is a guard
            await asyncio.to_thread(ctx.sample)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=0.25)
                return

    async def inject(rec: FaultRecord) -> None:
        fault = FAULTS[rec.kind]()  # one instance per fault: an agent kill keeps the environment to restart with
        await asyncio.sleep(max(0.0, start + rec.start_s - time.monotonic()))
        try:
            await asyncio.to_thread(fault.inject, ctx, rec)
        except Exception as e:  # a fault that fails to inject is a finding, not the end of the run
            rec.error = f"inject: {e!r}"
        rec.injected_at = round(time.monotonic() - start, 3)
        await asyncio.sleep(max(0.0, start + rec.end_s - time.monotonic()))
        try:
            await asyncio.to_thread(fault.clear, ctx, rec)
        except Exception as e:
            rec.error = (rec.error + "; " if rec.error else "") + f"clear: {e!r}"
        rec.cleared_at = round(time.monotonic() - start, 3)
        if rec.kind == "agent_kill" and not rec.error:
            rec.healthy_at = rec.cleared_at
        bar.set_postfix_str(f"{rec.kind} on {rec.node} done", refresh=False)

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(opts.request_timeout_s, connect=10.0)) as client:

        async def one(req: Sent) -> None:
            try:
                await send_one(client, stack, req, opts)
            finally:
                bar.update(1)

        sampling = asyncio.create_task(sampler())
        injecting = [asyncio.create_task(inject(rec)) for rec in faults]
        skipped = 0
        for req in reqs:
            await asyncio.sleep(max(0.0, start + req.at_s - time.monotonic()))
            if len(in_flight) >= opts.max_in_flight:
                skipped += 1
                req.outcome, req.reason = "skipped", "skipped_at_cap"
                bar.update(1)
                continue
            task = asyncio.create_task(one(req))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.sleep(max(0.0, start + opts.duration_s - time.monotonic()))
        # each request is bounded by its deadline: waiting a little past it finds any that is not
        if in_flight:
            _, pending = await asyncio.wait(set(in_flight), timeout=opts.request_timeout_s + 5.0)
            for task in pending:
                task.cancel()
            for req in reqs:
                if req.sent and not req.outcome:
                    req.hung = True
        # every fault ends before duration_s - tail_s; an agent restart may take up to its health timeout
        await asyncio.wait(injecting, timeout=90.0)
        done.set()
        await sampling
    bar.close()
    return {"skipped_at_cap": skipped, "wall_s": time.monotonic() - start}


def verify_tiers(ctx: Context, stores: Sequence[str], store_options: Mapping[str, Any]) -> dict[str, Any]:
    """Every model dir in every tier of every node, checked file by file against the registry's manifest of the
    revision it holds; the problems, if any."""
    from live.manifest import verify
    from live.registry import Registry

    registry = Registry(list(stores), {k: dict(v) for k, v in store_options.items()})
    checked, problems = 0, []
    for node in ctx.nodes.values():
        for tier, (d, _cap) in node.tiers().items():
            if not d.is_dir():
                continue
            for entry in sorted(os.scandir(d), key=lambda e: e.name):
                if not entry.is_dir() or entry.name.startswith(STAGING_PREFIX):
                    continue
                rev_file = Path(entry.path) / REVISION_FILE
                rev = rev_file.read_text().strip() if rev_file.exists() else ""
                try:
                    bad = verify(entry.path, registry.manifest(f"{entry.name}@{rev}" if rev else entry.name))
                except FileNotFoundError as e:
                    if not Path(entry.path).exists():  # evicted while we looked: nothing to check
                        continue
                    bad = [str(e)]
                except Exception as e:  # an unreadable manifest is a problem to report, not a crash
                    bad = [f"manifest: {e!r}"]
                checked += 1
                problems += [f"{node.name}/{tier}/{entry.name}: {p}" for p in bad]
    return {"model_dirs_checked": checked, "problems": problems[:20], "ok": not problems}


def leftover_files(roots: Sequence[Path]) -> list[str]:
    """`.tierlab-` staging / host / eviction entries and chaos fill files under `roots` (the pacing state file
    and a model's revision mark are not temporary)."""
    out: list[str] = []
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                if name in (PACE_FILE, REVISION_FILE):
                    continue
                if name.startswith(STAGING_PREFIX) or name == FILL_NAME:
                    out.append(str(Path(dirpath) / name))
            if len(out) > 100:
                break
    return out


def run(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Start the stack, load it while injecting faults, check the invariants; the result (chaos.json)."""
    gateway_timeout_s = float(cfg.get("gateway_timeout_s", 10.0))
    margin_s = float(cfg.get("deadline_margin_s", 5.0))
    opts = replace(options(cfg), request_timeout_s=gateway_timeout_s + margin_s)
    specs = fault_specs(cfg.get("faults"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    stores = [str(s) for s in (cfg.get("stores") or [f"file://{work / 'cloud'}"])]
    store_options = {str(k): dict(v) for k, v in (cfg.get("store_options") or {}).items()}
    overrides = [str(o) for o in [*(cfg.get("serve") or []), *(cfg.get("serve_extra") or [])]]
    overrides += [f"workdir={work}", f"gateway.request_timeout_s={gateway_timeout_s}"]
    progress = bool(cfg.get("progress", True))
    ctx: Context | None = None
    server: StoreServer | None = None
    try:
        if cfg.get("object_store"):  # the primary store on a server this run controls; the others follow it
            server = StoreServer(str(cfg["object_store"]), work / "object-store")
            server.start()
            url, url_options = server.new_store("tierlab-chaos")
            stores, store_options = [url, *stores], {**store_options, url: url_options}
            # serve's store_options is an empty struct dict: deleted and added, as URL keys cannot merge into it
            overrides += [f"stores={hydra_list(stores)}", "~store_options",
                          f"+store_options={hydra_dict(store_options)}"]
        with start_stack(out_dir / "serve", overrides) as stack:
            ctx = Context(stack.info, out_dir / "logs", server)
            dram_root = Path(str(stack.info.get("dram_root", "")))
            models = [str(m) for m in (cfg.get("models") or gateway_models(stack))]
            reqs = plan(opts, models)
            faults = schedule(specs, sorted(ctx.nodes), opts.duration_s, opts.seed,
                              float(cfg.get("warmup_s", 5.0)), float(cfg.get("tail_s", 5.0)))
            load = asyncio.run(drive(stack, ctx, reqs, faults, opts, progress))
            sent = [r for r in reqs if r.sent]
            ids, outcomes = gateway_rows(stack, len(sent), opts.drain_timeout_s)
            tiers = verify_tiers(ctx, stores, store_options)  # dram is on tmpfs: gone after the stop
            ctx.sample()
    finally:
        if ctx is not None:
            ctx.stop_restarted()
        if server is not None:
            server.stop()
    left_pids = wait_gone(sorted(ctx.seen), timeout_s=15.0)
    files = leftover_files([work / n for n in sorted(ctx.nodes)] + [dram_root])
    if dram_root.exists():
        files.append(f"{dram_root} (the dram tier root)")
    client = [{**asdict(r), "e2e_s": None if math.isnan(r.e2e_s) else round(r.e2e_s, 4)} for r in sent]
    lost = lost_requests([asdict(r) for r in sent], ids, outcomes)
    summary = summarize(client, [f.row() for f in faults], opts.request_timeout_s, float(cfg.get("settle_s", 2.0)))
    checks = {
        "no_lost_request": lost["no_lost_request"],
        "no_request_past_deadline": summary["past_deadline"] == 0,
        "clean_errors_only": summary["unclean_errors"] == 0,
        "no_process_left": not left_pids,
        "no_temp_file_left": not files,
        "tiers_match_manifests": tiers["ok"],
        "every_fault_injected": not any(f.error for f in faults),
    }
    result = {"options": {**asdict(opts), "gateway_timeout_s": gateway_timeout_s, "deadline_margin_s": margin_s},
              "serve": overrides, "models": models, "stores": stores, "wall_s": load["wall_s"],
              "skipped_at_cap": load["skipped_at_cap"], "summary": summary, "requests": lost, "tiers": tiers,
              "processes": {"seen": len(ctx.seen), "left": left_pids}, "temp_files_left": files[:20],
              "checks": checks, "ok": all(checks.values()), "faults": summary.pop("fault_rows")}
    (out_dir / "chaos.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    if not cfg.get("keep_workdir", False):
        shutil.rmtree(work, ignore_errors=True)
    return result


def _hydra_str(value: object) -> str:
    """A quoted hydra override string (any characters: a URL, a connection string)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def hydra_list(items: Sequence[object]) -> str:
    """`[a,b]` for a hydra override, each item quoted."""
    return "[" + ",".join(_hydra_str(i) for i in items) + "]"


def hydra_dict(mapping: Mapping[str, Any]) -> str:
    """`{key:value}` for a hydra override, nested one level as store options are: keys with `:` (URLs) are
    escaped, values quoted."""
    def key(k: str) -> str:
        return str(k).replace(":", "\\:")

    def value(v: Any) -> str:
        return hydra_dict(v) if isinstance(v, Mapping) else _hydra_str(v)

    return "{" + ",".join(f"{key(k)}:{value(v)}" for k, v in mapping.items()) + "}"


# --------------------------------------------------------------------------- the summary (pure)


def clean(row: Mapping[str, Any]) -> bool:
    """A completed request, or a failure the gateway explained (an OpenAI error body or an error event)."""
    if row.get("outcome") == "completed":
        return True
    reason = str(row.get("reason") or "")
    return bool(reason) and not reason.startswith(UNCLEAN_PREFIXES)


def _p99(values: Sequence[float]) -> float | None:
    return float(np.percentile(values, 99)) if values else None


def summarize(client: Sequence[Mapping[str, Any]], faults: Sequence[Mapping[str, Any]], deadline_s: float,
              settle_s: float) -> dict[str, Any]:
    """Requests, faults by kind, outcomes, failures by cause, p99 end-to-end latency of completed requests that
    overlapped a fault window ([start, end + settle_s]) and of those that did not, and each fault's recovery:
    the end of the first completed request sent after the fault ended (and, for a restarted agent, not before it
    answered again), minus the fault's end."""
    windows = [(float(f["start_s"]), float(f["end_s"]) + settle_s) for f in faults]

    def during(r: Mapping[str, Any]) -> bool:
        a = float(r["at_s"])
        b = a + float(r["e2e_s"] or 0.0)
        return any(a <= hi and b >= lo for lo, hi in windows)

    done = [r for r in client if r.get("outcome") == "completed" and r.get("e2e_s") is not None]
    failed: dict[str, int] = {}
    for r in client:
        if r.get("outcome") != "completed":
            key = f"{r.get('outcome') or 'none'}:{r.get('reason') or '?'}"
            failed[key] = failed.get(key, 0) + 1
    rows = []
    for f in faults:
        end = float(f["end_s"])
        after = [float(r["at_s"]) + float(r["e2e_s"]) for r in done if float(r["at_s"]) >= end]
        rec = min(after) if after else None
        if rec is not None and f.get("healthy_at") is not None:  # an agent restart: recovered once it is back too
            rec = max(rec, float(f["healthy_at"]))
        row = {**f, "recovered_at": None if rec is None else round(rec, 3),
               "recovery_s": None if rec is None else round(rec - end, 3)}
        model = (f.get("detail") or {}).get("model")
        if model:  # a store outage's cold model: its requests sent during the outage, which had to fail over
            hit = [r for r in client if r.get("model") == model and float(f["start_s"]) <= float(r["at_s"]) < end]
            lat = [float(r["e2e_s"]) for r in hit if r.get("outcome") == "completed" and r.get("e2e_s") is not None]
            row["cold_model_requests"] = {"sent": len(hit), "completed": len(lat),
                                          "max_e2e_s": round(max(lat), 3) if lat else None}
        rows.append(row)
    by_kind: dict[str, int] = {}
    for f in faults:
        by_kind[str(f["kind"])] = by_kind.get(str(f["kind"]), 0) + 1
    e2e = [float(r["e2e_s"]) for r in client if r.get("e2e_s") is not None]
    past = sum(1 for r in client if r.get("hung") or r.get("reason") == "client_timeout"
               or (r.get("e2e_s") is not None and float(r["e2e_s"]) > deadline_s))
    return {
        "requests": len(client), "completed": len(done), "failed": len(client) - len(done),
        "failed_by_cause": dict(sorted(failed.items())), "faults_by_kind": dict(sorted(by_kind.items())),
        "p99_during_faults_s": _p99([float(r["e2e_s"]) for r in done if during(r)]),
        "p99_outside_faults_s": _p99([float(r["e2e_s"]) for r in done if not during(r)]),
        "completed_during_faults": sum(1 for r in done if during(r)),
        "max_e2e_s": max(e2e) if e2e else None, "deadline_s": deadline_s, "past_deadline": past,
        "unclean_errors": sum(1 for r in client if not clean(r)),
        "recovery_s": {f"{r['index']}:{r['kind']}": r["recovery_s"] for r in rows}, "fault_rows": rows}


def summary_line(result: Mapping[str, Any]) -> str:
    s = result["summary"]

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x * 1e3:.0f} ms"

    rec = [v for v in s["recovery_s"].values() if v is not None]
    failed_checks = [k for k, v in result["checks"].items() if not v]
    return (f"chaos: {s['requests']} requests, {sum(s['faults_by_kind'].values())} faults "
            f"({', '.join(f'{k} {v}' for k, v in s['faults_by_kind'].items())}); {s['completed']} completed, "
            f"{s['failed']} failed; p99 {ms(s['p99_during_faults_s'])} during faults, "
            f"{ms(s['p99_outside_faults_s'])} outside; recovery max {max(rec) if rec else float('nan'):.2f} s; "
            f"invariants {'all hold' if not failed_checks else 'FAILED: ' + ', '.join(failed_checks)}")


# --------------------------------------------------------------------------- docs/reliability.md


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}{unit}"
    return f"{x}{unit}"


def render(chaos: Mapping[str, Any], soak: Mapping[str, Any] | None, command: str) -> str:
    """docs/reliability.md: the chaos run's tables, then the stored soak's verdicts and figure."""
    s, o = chaos["summary"], chaos["options"]
    lines = ["# Reliability", "",
             f"Generated by `{command}` (chaos: this run; soak: the stored docs/reliability/soak.json). "
             "Do not edit by hand.", "",
             "## Chaos replay", "",
             f"`experiments.chaos` (conf/chaos.yaml): {o['duration_s']:g} s of seeded Poisson load at "
             f"{o['rate_rps']:g} req/s (seed {o['seed']}) through `experiments.serve` on the null engine, while a "
             "seeded schedule of faults is injected (experiments/chaos_faults.py). Deadline per request: the "
             f"gateway's request_timeout_s {o['gateway_timeout_s']:g} s + {o['deadline_margin_s']:g} s.", "",
             "| requests | completed | failed | p99 during faults | p99 outside faults | max e2e |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| {s['requests']} | {s['completed']} | {s['failed']} | {_fmt(s['p99_during_faults_s'], ' s')} | "
             f"{_fmt(s['p99_outside_faults_s'], ' s')} | {_fmt(s['max_e2e_s'], ' s')} |", "",
             "Failed by cause: " + (", ".join(f"`{k}` {v}" for k, v in s["failed_by_cause"].items()) or "none")
             + ".", "",
             "| # | fault | node | target | start (s) | end (s) | recovery (s) | cold model: sent / completed "
             "during, max e2e | error |",
             "|---:|---|---|---|---:|---:|---:|---|---|"]
    for f in chaos["faults"]:
        kind = f"{f['kind']}{' ' + f['tier'] if f.get('tier') else ''}{' ' + f['mode'] if f.get('mode') else ''}"
        cm = f.get("cold_model_requests")
        cold = f"{cm['sent']} / {cm['completed']}, {_fmt(cm['max_e2e_s'], ' s')}" if cm else "-"
        lines.append(f"| {f['index']} | {kind} | {f['node']} | {f['target'] or '-'} | {f['start_s']:.1f} | "
                     f"{f['end_s']:.1f} | {_fmt(f['recovery_s'])} | {cold} | {f['error'] or ''} |")
    lines += ["", "Recovery: from the fault's end to the end of the first request sent after it that completed "
              "(for an agent kill, not before the restarted agent answered /healthz). Tier faults and store "
              "outages first make one model cold (unloaded everywhere, its tier copies evicted but, for a tier "
              "delay, the one in the delayed tier; its transfers already in flight waited out and what they left "
              "removed; a store outage stops the store before all this), so that its next load meets the fault; "
              "its requests sent during the fault are counted in the cold-model column.",
              "", "Invariants:", ""]
    lines += [f"- {k.replace('_', ' ')}: {'yes' if v else '**NO**'}" for k, v in chaos["checks"].items()]
    lines += [""]
    lines += ["## Soak", ""]
    if soak is None:
        lines += ["No stored soak (docs/reliability/soak.json): run `python -m experiments.soak publish=true`.", ""]
    else:
        req, verdict, so = soak["requests"], soak["analysis"]["verdict"], soak["options"]
        lines += [f"`experiments.soak` (conf/soak.yaml): {so['duration_s']:g} s at {so['rate_rps']:g} req/s; "
                  f"{req['sent']} sent, {req['completed']} completed, {req['gateway_rows']} gateway rows; "
                  f"no lost request: {req['no_lost_request']}; memory, fds, threads and tasks flat: "
                  f"{verdict['flat']}" + (f" (not flat: {', '.join(verdict['not_flat'])})"
                                          if verdict.get("not_flat") else "") + ".", "",
                  "![soak](reliability/soak.png)", ""]
    return "\n".join(lines)


def publish(result: Mapping[str, Any], out_dir: Path, dest: Path | None, command: str) -> Path:
    """reliability.md into out_dir; with `dest` (docs/reliability), chaos.json there and the doc beside it."""
    soak_path = (dest or REPO / "docs" / "reliability") / "soak.json"
    soak = json.loads(soak_path.read_text()) if soak_path.exists() else None
    text = render(result, soak, command)
    (out_dir / "reliability.md").write_text(text)
    if dest is None:
        return out_dir / "reliability.md"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out_dir / "chaos.json", dest / "chaos.json")
    doc = dest.parent / "reliability.md"
    doc.write_text(text)
    return doc


def _command(cfg: dict[str, Any], out_dir: Path) -> str | None:
    logging.getLogger().setLevel(logging.WARNING)  # hydra's INFO would log every request httpx sends
    if not cfg.get("faults"):
        raise ConfigError("faults: the schedule is empty")
    result = run(cfg, out_dir)
    dest = None
    if cfg.get("publish"):
        dest = Path(str(cfg.get("publish_dir") or "docs/reliability"))
        dest = dest if dest.is_absolute() else REPO / dest
    doc = publish(result, out_dir, dest, "python -m experiments.chaos publish=true")
    print(summary_line(result))
    print(f"chaos.json in {out_dir}; {doc}")
    if not result["ok"]:
        sys.exit(1)
    return None


def main() -> None:
    """Console-script-style entry point."""
    hydra_command("chaos", _command, prog="tierlab chaos")


if __name__ == "__main__":
    main()
