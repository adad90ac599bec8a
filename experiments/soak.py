"""`python -m experiments.soak [overrides]`: a steady load against the whole live stack, watched for leaks.

1. starts `python -m experiments.serve port=0 <serve overrides>` as a subprocess (the null engine by default, so
   the load exercises the gateway, agents and engine servers rather than a model) and waits for its serve.json;
2. sends open-loop Poisson arrivals at `rate_rps` (seeded) for `duration_s`: chat and completion requests, a
   seeded share streamed, small `max_tokens`; each bounded by `request_timeout_s` as a whole, and at most
   `max_in_flight` outstanding (an arrival beyond that is not sent, and counted);
3. every `sample_interval_s` samples, for the gateway (the serve process) and each of its descendants (agents,
   engines, their watchdogs; found in /proc), RSS, open fds and threads, and the gateway's asyncio task count
   (GET /metrics: `tierlab_gateway_asyncio_tasks`);
4. waits for the gateway to have a row for every request sent, reads them (GET /admin/records), stops the stack;
5. checks flatness and lost requests (`experiments.soak_analysis`) and writes soak.json (samples, fits, verdicts)
   and soak.png (RSS per process with the fitted lines; fds and tasks below) into the output directory, and
   into `publish_dir` with publish=true. Ends with a one-line summary; exit status 1 if a verdict failed.

Config: conf/soak.yaml. Loopback only: the stack listens on 127.0.0.1 and every request goes there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from core.errors import ConfigError
from experiments.entry import hydra_command
from experiments.soak_analysis import Bounds, analyze, lost_requests
from experiments.stack_procs import sample_stack

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 90.0
REQUEST_ID_HEADER = "x-tierlab-request-id"
TASKS_METRIC = "tierlab_gateway_asyncio_tasks"
PROMPT = "The model loads its weights from a tier of storage and then serves tokens."


@dataclass(frozen=True)
class SoakOptions:
    """The load and the sampling (conf/soak.yaml's top-level keys)."""

    duration_s: float = 600.0
    rate_rps: float = 5.0
    max_in_flight: int = 32
    request_timeout_s: float = 30.0
    sample_interval_s: float = 5.0
    seed: int = 0
    max_tokens: int = 8
    stream_fraction: float = 0.5
    chat_fraction: float = 0.5
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("duration_s", "rate_rps", "request_timeout_s", "sample_interval_s"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name}: a positive number is needed, got {v!r}")
        for name in ("max_in_flight", "max_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}: a positive integer is needed, got {getattr(self, name)!r}")
        for name in ("stream_fraction", "chat_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: must be in [0, 1], got {getattr(self, name)!r}")
        if self.drain_timeout_s < 0:
            raise ConfigError(f"drain_timeout_s: must be >= 0, got {self.drain_timeout_s!r}")


@dataclass
class Sent:
    """One planned request and what the client saw of it."""

    index: int
    at_s: float  # planned arrival, seconds after the load's start
    model: str
    chat: bool
    stream: bool
    sent: bool = False  # False: skipped (max_in_flight outstanding at its arrival) or never reached
    outcome: str = ""
    reason: str = ""
    status: int | None = None
    gateway_id: int | None = None
    e2e_s: float = math.nan
    hung: bool = False


def options(cfg: Mapping[str, Any]) -> SoakOptions:
    """SoakOptions from the config's top-level keys (unknown ones are other blocks' business)."""
    kw = {k: cfg[k] for k in SoakOptions.__dataclass_fields__ if k in cfg}
    try:
        return SoakOptions(**kw)
    except TypeError as e:
        raise ConfigError(str(e)) from None


def bounds_of(cfg: Mapping[str, Any]) -> Bounds:
    try:
        return Bounds(**dict(cfg.get("bounds") or {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bounds: {e}") from None


def plan(opts: SoakOptions, models: Sequence[str]) -> list[Sent]:
    """Poisson arrivals over [0, duration_s), each with a model (uniform), endpoint and streaming; seeded."""
    if not models:
        raise ConfigError("models: none to send requests to")
    rng = np.random.default_rng(opts.seed)
    n_max = int(opts.rate_rps * opts.duration_s * 2 + 50)  # bounded: far above what a Poisson count reaches
    at = np.cumsum(rng.exponential(1.0 / opts.rate_rps, size=n_max))
    at = at[at < opts.duration_s]
    pick = rng.integers(0, len(models), size=len(at))
    chat = rng.random(len(at)) < opts.chat_fraction
    stream = rng.random(len(at)) < opts.stream_fraction
    return [Sent(i, float(at[i]), str(models[pick[i]]), bool(chat[i]), bool(stream[i])) for i in range(len(at))]


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    """A running `experiments.serve` subprocess and its serve.json."""

    proc: subprocess.Popen[bytes]
    out_dir: Path
    info: dict[str, Any]
    log: Path

    @property
    def url(self) -> str:
        return str(self.info["url"])

    @property
    def api_key(self) -> str:
        return str(next(iter(self.info["tenants"].values()))["api_key"])


@contextlib.contextmanager
def start_stack(out_dir: Path, overrides: Sequence[str]) -> Iterator[Stack]:
    """`python -m experiments.serve port=0 hydra.run.dir=<out_dir> <overrides>`; stopped with SIGINT at the end
    (as Ctrl-C: records written, agents and engines stopped), SIGKILL if it does not exit in time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir.parent / "serve.log"
    argv = [sys.executable, "-m", "experiments.serve", "port=0", "host=127.0.0.1", f"hydra.run.dir={out_dir}",
            "progress=false", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        info_path = out_dir / "serve.json"
        while not info_path.exists():  # bounded: the deadline, or the process's exit
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise ConfigError(f"serve: experiments.serve did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.1)
        yield Stack(proc, out_dir, json.loads(info_path.read_text()), log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()  # its agents and engines exit with it (--exit-with-parent)
                proc.wait()


def scrape_tasks(text: str) -> float | None:
    """The gateway's asyncio task count in a /metrics text, or None if it is not there."""
    for line in text.splitlines():
        if line.startswith(TASKS_METRIC + " ") or line.startswith(TASKS_METRIC + "{"):
            return float(line.split()[-1])
    return None


# --------------------------------------------------------------------------- load


def _reason(r: httpx.Response, body: bytes) -> str:
    try:
        err = json.loads(body).get("error") or {}
        return str(err.get("code") or err.get("type") or f"http_{r.status_code}")
    except (ValueError, AttributeError):
        return f"http_{r.status_code}"


async def send_one(client: httpx.AsyncClient, stack: Stack, req: Sent, opts: SoakOptions) -> None:
    """Send `req`, whole-life bounded by request_timeout_s; its outcome and reason set, exactly once."""
    if req.chat:
        path = "/v1/chat/completions"
        body: dict[str, Any] = {"model": req.model, "messages": [{"role": "user", "content": PROMPT}]}
    else:
        path, body = "/v1/completions", {"model": req.model, "prompt": PROMPT}
    body.update({"max_tokens": opts.max_tokens, "temperature": 0.0, "stream": req.stream})
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.monotonic()
    req.sent = True
    try:
        async with asyncio.timeout(opts.request_timeout_s):
            async with client.stream("POST", stack.url + path, json=body,
                                     headers={"Authorization": f"Bearer {stack.api_key}"}) as r:
                req.status = r.status_code
                rid = r.headers.get(REQUEST_ID_HEADER)
                req.gateway_id = int(rid) if rid and rid.isdigit() else None
                if r.status_code != 200:
                    data = await r.aread()
                    req.outcome = "rejected" if 400 <= r.status_code < 500 or r.status_code == 503 else "failed"
                    req.reason = _reason(r, data)
                elif not req.stream:
                    msg = json.loads(await r.aread())
                    ok = bool(msg.get("choices"))
                    req.outcome, req.reason = ("completed", "") if ok else ("failed", "no_choices")
                else:
                    req.outcome, req.reason = await _read_stream(r)
    except TimeoutError:
        req.outcome, req.reason = "failed", "client_timeout"
    except (httpx.HTTPError, ValueError) as e:
        req.outcome, req.reason = "failed", f"client_error: {type(e).__name__}"
    req.e2e_s = time.monotonic() - t0


async def _read_stream(r: httpx.Response) -> tuple[str, str]:
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:].strip()
        if data == "[DONE]":
            return "completed", ""
        msg = json.loads(data)
        if msg.get("error"):
            return "failed", str(msg["error"].get("code") or "stream_error")
    return "failed", "stream_ended_without_done"


async def soak(stack: Stack, reqs: list[Sent], opts: SoakOptions, progress: bool) -> dict[str, Any]:
    """Send the planned requests and sample the stack until the last one ends; samples and timings."""
    root = int(stack.info["pid"])
    samples: list[dict[str, Any]] = []
    tasks: list[dict[str, Any]] = []
    in_flight: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=opts.max_in_flight, max_keepalive_connections=opts.max_in_flight)
    bar = tqdm(total=len(reqs), desc="soak", unit="req", disable=not progress, mininterval=1.0)
    done = asyncio.Event()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(opts.request_timeout_s, connect=10.0)) as client:
        start = time.monotonic()

        async def sampler() -> None:
            n = 0
            while not done.is_set() and n < 1_000_000:  # bounded by the run's end (and a count, as a guard)
                t = time.monotonic() - start
                rows = sample_stack(root, t)
                samples.extend(rows)
                with contextlib.suppress(httpx.HTTPError):
                    r = await client.get(stack.url + "/metrics", timeout=10.0)
                    value = scrape_tasks(r.text)
                    if value is not None:
                        tasks.append({"t_s": round(t, 3), "tasks": value})
                gw = next((s["rss_MB"] for s in rows if s["role"] == "gateway"), math.nan)
                bar.set_postfix_str(f"gateway {gw:.0f} MB, {len(rows)} procs, in flight {len(in_flight)}",
                                    refresh=False)
                n += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), timeout=max(0.0, start + n * opts.sample_interval_s
                                                                     - time.monotonic()))

        async def one(req: Sent) -> None:
            try:
                await send_one(client, stack, req, opts)
            finally:
                bar.update(1)

        sampling = asyncio.create_task(sampler())
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
        load_s = time.monotonic() - start
        # every request is bounded by request_timeout_s; waiting a little longer than that finds any that is not
        if in_flight:
            _, pending = await asyncio.wait(set(in_flight), timeout=opts.request_timeout_s + 5.0)
            for task in pending:
                task.cancel()
            for req in reqs:
                if req.sent and not req.outcome:
                    req.hung = True
        done.set()
        await sampling
    bar.close()
    return {"samples": samples, "tasks": tasks, "load_s": load_s, "skipped_at_cap": skipped,
            "wall_s": time.monotonic() - start}


def gateway_rows(stack: Stack, expected: int, timeout_s: float) -> tuple[list[int], dict[int, str]]:
    """The gateway's request ids and outcomes (GET /admin/records), once it has `expected` rows or timeout_s
    passed (rows are written when a request finishes, a moment after the client saw its end)."""
    headers = {"Authorization": f"Bearer {stack.info['admin_token']}"}
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.get(stack.url + "/admin/records", headers=headers, timeout=60)
        r.raise_for_status()
        data = r.json()
        cols = data["columns"]
        i_id, i_out = cols.index("request_id"), cols.index("outcome")
        rows = data["rows"]
        if len(rows) >= expected or time.monotonic() > deadline:
            return [int(row[i_id]) for row in rows], {int(row[i_id]): str(row[i_out]) for row in rows}
        time.sleep(0.5)


def gateway_models(stack: Stack) -> list[str]:
    r = httpx.get(stack.url + "/v1/models", headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=30)
    r.raise_for_status()
    return [m["id"] for m in r.json()["data"]]


# --------------------------------------------------------------------------- outputs


def plot(result: Mapping[str, Any], path: Path) -> None:
    """soak.png: RSS per process over time with the fitted lines (top); fds per process and the gateway's
    asyncio tasks (bottom). The warm-up is shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.soak_analysis import series_by_process

    by_proc = series_by_process(result["samples"])
    analysis = result["analysis"]
    warm_min = analysis["warmup_end_s"] / 60.0
    fig, (ax_rss, ax_fd) = plt.subplots(2, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for name, rows in sorted(by_proc.items()):
        t = np.array([r["t_s"] for r in rows]) / 60.0
        line, = ax_rss.plot(t, [r["rss_MB"] for r in rows], lw=1.2, label=name)
        fit = analysis["processes"][name].get("rss")
        if fit:
            post = t[t > warm_min]
            ax_rss.plot(post, fit["intercept"] + fit["slope_per_min"] * post, ls="--", lw=1, color=line.get_color())
            line.set_label(f"{name}: {fit['slope_per_min']:+.2f} MB/min [{fit['slope_lo']:+.2f}, "
                           f"{fit['slope_hi']:+.2f}]")
        ax_fd.plot(t, [r["fds"] for r in rows], lw=1, color=line.get_color())
    if result["tasks"]:
        ax_fd.plot([r["t_s"] / 60.0 for r in result["tasks"]], [r["tasks"] for r in result["tasks"]], color="k",
                   lw=1.5, ls=":", label="gateway asyncio tasks")
        ax_fd.legend(loc="upper left", fontsize=8)
    for ax in (ax_rss, ax_fd):
        ax.axvspan(0, warm_min, color="0.9", zorder=0)
        ax.grid(alpha=0.3)
    verdict = analysis["verdict"]
    req = result["requests"]
    dur = float(result["options"]["duration_s"])
    dur_txt = f"{dur / 60:.0f} min" if dur >= 120 else f"{dur:.0f} s"
    ax_rss.set_title(f"soak: {dur_txt} at {result['options']['rate_rps']:g} "
                     f"req/s, {req['sent']} sent, {req['completed']} completed; flat: {verdict['flat']}, "
                     f"no lost request: {req['no_lost_request']}", fontsize=10)
    ax_rss.set_ylabel("RSS (MB)")
    ax_rss.legend(loc="center right", fontsize=7, title="OLS slope after warm-up [95% CI]", title_fontsize=7)
    ax_fd.set_ylabel("open fds (per process) / tasks")
    ax_fd.set_xlabel("minutes since the load started (shaded: warm-up, not judged)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_line(result: Mapping[str, Any]) -> str:
    req, verdict = result["requests"], result["analysis"]["verdict"]
    gw = next((p for p in result["analysis"]["processes"].values() if p["role"] == "gateway" and p.get("rss")), None)
    gw_txt = (f"gateway RSS {gw['rss']['slope_per_min']:+.2f} MB/min [{gw['rss']['slope_lo']:+.2f}, "
              f"{gw['rss']['slope_hi']:+.2f}]") if gw else "gateway not judged"
    return (f"soak {result['load_s']:.0f} s: {req['sent']} sent ({req['completed']} completed, {req['rejected']} "
            f"rejected, {req['failed']} failed, {result['skipped_at_cap']} skipped at the cap), gateway rows "
            f"{req['gateway_rows']}; {gw_txt}; flat {verdict['flat']} ({verdict['processes_judged']} processes), "
            f"no lost request {req['no_lost_request']}")


def run(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Start the stack, soak it, stop it, analyse; the result (also written as soak.json / soak.png)."""
    opts = options(cfg)
    bounds = bounds_of(cfg)
    overrides = [str(o) for o in [*(cfg.get("serve") or []), *(cfg.get("serve_extra") or [])]]
    out_dir.mkdir(parents=True, exist_ok=True)
    with start_stack(out_dir / "serve", overrides) as stack:
        models = [str(m) for m in (cfg.get("models") or gateway_models(stack))]
        reqs = plan(opts, models)
        load = asyncio.run(soak(stack, reqs, opts, bool(cfg.get("progress", True))))
        sent = [r for r in reqs if r.sent]
        ids, outcomes = gateway_rows(stack, len(sent), opts.drain_timeout_s)
    lost = lost_requests([asdict(r) for r in sent], ids, outcomes)
    analysis = analyze(load["samples"], load["tasks"], opts.duration_s, bounds)
    result: dict[str, Any] = {
        "options": asdict(opts), "serve": overrides, "models": models, "load_s": load["load_s"],
        "wall_s": load["wall_s"], "skipped_at_cap": load["skipped_at_cap"], "requests": lost, "analysis": analysis,
        "ok": bool(lost["no_lost_request"] and analysis["verdict"]["flat"]),
        "e2e_s": _percentiles([r.e2e_s for r in sent if r.outcome == "completed"]),
        "samples": load["samples"], "tasks": load["tasks"]}
    write_json(result, out_dir / "soak.json")
    plot(result, out_dir / "soak.png")
    if cfg.get("publish"):
        dest = Path(str(cfg.get("publish_dir") or "docs/reliability"))
        dest = dest if dest.is_absolute() else REPO / dest
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("soak.json", "soak.png"):
            shutil.copyfile(out_dir / name, dest / name)
    return result


def columns(samples: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Samples as one column set per process ({role, pid, t_s: [...], rss_MB: [...], fds: [...], threads: [...]}):
    soak.json stays small and readable (a row per sample would be thousands of lines)."""
    out: dict[str, dict[str, Any]] = {}
    for s in samples:
        col = out.setdefault(str(s["proc"]), {"role": s["role"], "pid": s["pid"], "t_s": [], "rss_MB": [],
                                              "fds": [], "threads": []})
        col["t_s"].append(s["t_s"])
        col["rss_MB"].append(round(float(s["rss_MB"]), 3))
        col["fds"].append(int(s["fds"]))
        col["threads"].append(int(s["threads"]))
    return out


def write_json(result: Mapping[str, Any], path: Path) -> None:
    """soak.json: the analysis indented, the samples' columns one line each."""
    head = {k: v for k, v in result.items() if k not in ("samples", "tasks")}
    cols = columns(result["samples"])
    tasks = {"t_s": [r["t_s"] for r in result["tasks"]], "tasks": [int(r["tasks"]) for r in result["tasks"]]}
    text = json.dumps({**head, "samples": "@SAMPLES@", "gateway_tasks": "@TASKS@"}, indent=1, default=float)
    body = ",\n".join(f"  {json.dumps(name)}: {json.dumps(col)}" for name, col in cols.items())
    text = text.replace('"@SAMPLES@"', "{\n" + body + "\n }").replace('"@TASKS@"', json.dumps(tasks))
    path.write_text(text + "\n")


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)), "max": float(max(v))}


def _command(cfg: dict[str, Any], out_dir: Path) -> str | None:
    # hydra set the root logger to INFO: httpx would log every one of the soak's requests
    logging.getLogger().setLevel(logging.WARNING)
    result = run(cfg, out_dir)
    print(summary_line(result))
    print(f"soak.json and soak.png in {out_dir}")
    if not result["ok"]:
        sys.exit(1)
    return None


def main() -> None:
    """Console-script-style entry point."""
    hydra_command("soak", _command, prog="tierlab soak")


if __name__ == "__main__":
    main()
