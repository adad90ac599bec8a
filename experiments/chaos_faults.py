"""The fault injector of `experiments.chaos`: a seeded schedule, and one small class per fault kind.

Each fault acts on the live stack from outside, as an operator's mistake or a machine's failure would:

- `engine_kill`: SIGKILL one engine process of a node (a descendant of its agent, found in /proc);
- `agent_kill`: SIGKILL a node agent, and at the fault's end start it again with the same command line and
  environment (read from /proc before the kill) on the same port and tier dirs; the new agent watches this
  process instead of `experiments.serve` (`--exit-with-parent`), and this process stops it after the run;
- `tier_fill`: a model (seeded) made cold (see `store_outage`), then a sparse junk file in a node's tier dir
  sized to the tier's free space (the agent counts file sizes, so copies into the tier fail with TierFullError
  while no disk is used); removed at the fault's end;
- `tier_delay`: a model made cold but for its copy in the delayed tier, then the node's paced tier (its
  `.tierlab-pace` read and write links, `live.pacing`) booked busy for the fault's duration, as a concurrent
  transfer hogging the device would: copies and engine reads from it wait;
- `store_outage`: the primary object store (a moto or azurite server the chaos run started,
  `experiments.store_servers`) hangs (`mode: hang`, SIGSTOP: connections accepted, never answered) or goes
  down (`mode: down`, SIGKILL, restarted on the same port with the same data at the fault's end: azurite only,
  as moto keeps its objects in memory). So that the outage meets loads, one model (seeded) is then unloaded from
  every node and evicted from every tier, its transfers already in flight waited out and what they left removed
  (`make_cold`): its next requests cold-start from the cloud, which must fail over to the next store
  (`live.store_health`).

A fault never raises into the load: a failure to inject is recorded (`error`) and the run goes on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np

from core.errors import ConfigError
from experiments.stack_procs import cmdline, describe, flag, stack_pids
from experiments.store_servers import StoreServer
from live.lifecycle import pid_alive
from live.pacing import READ, WRITE, Device, PaceSpec, state_path_in

STORE_MODES = ("hang", "down")
FILL_NAME = "chaos-fill.bin"  # a file, not a dir: never listed as a model, and removed at the fault's end
HEALTH_TIMEOUT_S = 60.0
COLD_SETTLE_TIMEOUT_S = 10.0  # make_cold: how long transfers of the model already in flight are waited out


@dataclass(frozen=True)
class FaultSpec:
    """One line of the config's `faults` list: `count` faults of `kind`, each lasting `duration_s`."""

    kind: str
    count: int = 1
    duration_s: float = 3.0
    tier: str = "nvme"  # tier_fill / tier_delay: which tier
    mode: str = "hang"  # store_outage: "hang" (SIGSTOP) or "down" (SIGKILL, restart at the end)

    def __post_init__(self) -> None:
        if self.kind not in FAULTS:
            raise ConfigError(f"faults: unknown kind {self.kind!r}; known: {sorted(FAULTS)}")
        if not isinstance(self.count, int) or self.count < 0:
            raise ConfigError(f"faults.{self.kind}.count: a non-negative integer is needed, got {self.count!r}")
        if not (isinstance(self.duration_s, int | float) and self.duration_s >= 0):
            raise ConfigError(f"faults.{self.kind}.duration_s: must be >= 0, got {self.duration_s!r}")
        if self.mode not in STORE_MODES:
            raise ConfigError(f"faults.{self.kind}.mode: one of {list(STORE_MODES)}, got {self.mode!r}")


@dataclass
class FaultRecord:
    """One scheduled fault and what happened to it (times in seconds since the load started)."""

    index: int
    kind: str
    node: str
    start_s: float
    end_s: float
    tier: str = ""
    mode: str = ""  # store_outage: hang | down
    target: str = ""  # what was hit: a pid, a file, a tier, a store
    injected_at: float | None = None
    cleared_at: float | None = None
    healthy_at: float | None = None  # agent_kill: the restarted agent answered /healthz
    recovered_at: float | None = None  # filled by the analysis: first completed request sent after end_s
    error: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return asdict(self)


def schedule(specs: Sequence[FaultSpec], nodes: Sequence[str], duration_s: float, seed: int,
             warmup_s: float, tail_s: float) -> list[FaultRecord]:
    """Faults placed one per slot over [warmup_s, duration_s - tail_s), kinds shuffled, each at a seeded offset
    inside its slot and on a seeded node. Slots do not overlap, so each fault's recovery is its own."""
    kinds = [s for s in specs for _ in range(s.count)]
    if not kinds:
        return []
    if not nodes:
        raise ConfigError("faults: the stack has no node to inject into")
    window = duration_s - tail_s - warmup_s
    slot = window / len(kinds)
    longest = max(s.duration_s for s in kinds)
    if slot <= longest:
        raise ConfigError(f"faults: {len(kinds)} faults of up to {longest} s do not fit one per slot in the "
                          f"{window:.1f} s between warmup_s and duration_s - tail_s")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(kinds))
    out = []
    for i, k in enumerate(order):
        spec = kinds[int(k)]
        start = warmup_s + i * slot + float(rng.uniform(0.0, slot - spec.duration_s))
        node = str(nodes[int(rng.integers(0, len(nodes)))])
        out.append(FaultRecord(i, spec.kind, node, round(start, 3), round(start + spec.duration_s, 3),
                               tier=spec.tier if spec.kind in ("tier_fill", "tier_delay") else "",
                               mode=spec.mode if spec.kind == "store_outage" else ""))
    return out


# --------------------------------------------------------------------------- what a fault acts on


@dataclass
class Node:
    """A node agent as the injector knows it: its pid (changes on restart) and its command line."""

    name: str
    url: str
    pid: int
    argv: list[str] = field(default_factory=list)
    restarted: subprocess.Popen[bytes] | None = None  # an agent this process started (it stops it at the end)

    def tiers(self) -> dict[str, tuple[Path, int]]:
        """Tier name -> (dir, capacity bytes), from the agent's `--tier=name=dir:capacity` flags."""
        out = {}
        for a in self.argv:
            if a.startswith("--tier="):
                name, rest = a[len("--tier="):].split("=", 1)
                d, cap = rest.rsplit(":", 1)
                out[name] = (Path(d), int(cap))
        return out

    def paces(self) -> dict[str, tuple[float, float, float]]:
        """Tier name -> (read B/s, write B/s, latency s) of its paced tiers (`--tier-bw=name=r:w:l`)."""
        out = {}
        for a in self.argv:
            if a.startswith("--tier-bw="):
                name, rest = a[len("--tier-bw="):].split("=", 1)
                r, w, lat = (float(x) for x in rest.split(":"))
                out[name] = (r, w, lat)
        return out


class Context:
    """The stack's nodes, and every pid seen in it (for the check that none is left after the stop)."""

    def __init__(self, info: Mapping[str, Any], log_dir: Path, store: StoreServer | None = None) -> None:
        self.root = int(info["pid"])
        self.agent_token = str(info.get("agent_token") or "")
        self.models = [str(m) for m in info.get("models", [])]
        self.store = store  # the primary object store's server, when the run started one
        self.nodes = {str(a["node"]): Node(str(a["node"]), str(a["url"]), int(a["pid"]), cmdline(int(a["pid"])))
                      for a in info.get("agents", [])}
        self.log_dir = log_dir
        self.seen: dict[int, str] = {}  # pid -> role label, every process of the stack ever sampled

    def pids(self) -> list[int]:
        """Every live process of the stack: serve's tree plus the agents this process restarted and theirs."""
        out = stack_pids(self.root)
        for n in self.nodes.values():
            if n.restarted is not None and n.restarted.poll() is None:
                out += stack_pids(n.restarted.pid)
        return out

    def sample(self) -> None:
        for pid in self.pids():
            if pid not in self.seen:
                argv = " ".join(cmdline(pid))
                if argv:
                    self.seen[pid] = describe(pid, self.root)[0]

    def engines(self, node: str) -> list[int]:
        n = self.nodes[node]
        return [p for p in stack_pids(n.pid)[1:] if describe(p, self.root)[0] == "engine"]

    def stop_restarted(self, grace_s: float = 20.0) -> None:
        """SIGTERM each agent this process restarted (it stops its engines), SIGKILL its group if it lingers."""
        from live.lifecycle import stop_process

        for n in self.nodes.values():
            if n.restarted is not None:
                stop_process(n.restarted, grace_s)


# --------------------------------------------------------------------------- the faults


def cold_model(ctx: Context, rec: FaultRecord) -> str:
    """The model a fault makes cold so that loads meet it: seeded by the fault's index."""
    return sorted(ctx.models)[rec.index % len(ctx.models)] if ctx.models else ""


def make_cold(ctx: Context, model: str, keep: tuple[str, str] | None = None,
              settle_timeout_s: float = COLD_SETTLE_TIMEOUT_S) -> dict[str, float]:
    """Unload `model`'s instances and evict its tier copies on every node (but the copy in `keep`, a (node,
    tier)), through the agents' API as the gateway's own actions do, so that its next request loads it; what
    could not go (an instance still loading, a tier busy) is counted, not fatal.

    A copy of the model into a tier already in flight (a promotion from a host copy, a fetch whose bytes are in)
    is not reached by an eviction and lands after it, leaving the model warm: the agents' /status lists their
    transfers, so those that began before this call are waited out (at most `settle_timeout_s`; `unsettled`
    counts the rest), and then the tiers they went to, and only those, are evicted again. Loads started after
    this call are the ones the fault is for (a fetch that fails over, a copy from it): they are left alone."""
    t0 = time.time()
    done: dict[str, float] = {"unloaded": 0, "evicted": 0, "refused": 0, "unsettled": 0}
    landing: set[tuple[str, str]] = set()  # (node, tier) of the model's transfers that began before t0

    def note_landing(statuses: dict[str, dict[str, Any]]) -> int:
        pending = 0
        for name, st in statuses.items():
            for t in st.get("transfers", []):
                if t.get("model") == model and float(t.get("since_unix", t0)) < t0:
                    landing.add((name, str(t.get("to_tier"))))
                    pending += 1
        return pending

    note_landing(_cold_pass(ctx, model, keep, done))
    deadline = time.monotonic() + settle_timeout_s
    for _ in range(100_000):  # bounded by the deadline; the count is a guard
        pending = note_landing(_statuses(ctx))
        if not pending:
            break
        if time.monotonic() >= deadline:
            done["unsettled"] = pending
            break
        time.sleep(0.05)
    if landing:
        _cold_pass(ctx, model, keep, done, started_before=t0, only_tiers=landing)
    done["settle_s"] = round(time.time() - t0, 3)
    return done


def _statuses(ctx: Context) -> dict[str, dict[str, Any]]:
    """Each reachable node's /status (a node that does not answer is left out: it is down, holding nothing)."""
    out = {}
    for n in ctx.nodes.values():
        with contextlib.suppress(httpx.HTTPError, ValueError):
            out[n.name] = httpx.get(n.url + "/status", headers=_agent_headers(ctx), timeout=5).json()
    return out


def _agent_headers(ctx: Context) -> dict[str, str]:
    return {"Authorization": f"Bearer {ctx.agent_token}"}


def _cold_pass(ctx: Context, model: str, keep: tuple[str, str] | None, done: dict[str, float],
               started_before: float | None = None,
               only_tiers: set[tuple[str, str]] | None = None) -> dict[str, dict[str, Any]]:
    """Unload the model's instances (those started before `started_before`, if given) and evict its tier copies
    (but `keep`; only the (node, tier) pairs in `only_tiers`, if given) on every node; counts into `done`. The
    nodes' statuses as read before acting."""
    statuses = _statuses(ctx)
    for name, status in statuses.items():
        n = ctx.nodes[name]
        with contextlib.suppress(httpx.HTTPError, ValueError):
            for inst in status.get("instances", []):
                if inst.get("model") == model and (started_before is None
                                                   or float(inst.get("started_at_unix", 0)) < started_before):
                    r = httpx.post(n.url + "/unload", json={"instance": inst.get("id")}, headers=_agent_headers(ctx),
                                   timeout=30)
                    done["unloaded" if r.status_code == 200 else "refused"] += 1
            for tier, t in status.get("tiers", {}).items():
                if (model in t.get("models", {}) and (n.name, tier) != keep
                        and (only_tiers is None or (n.name, tier) in only_tiers)):
                    r = httpx.post(n.url + "/tiers/evict", json={"model": model, "tier": tier},
                                   headers=_agent_headers(ctx), timeout=30)
                    done["evicted" if r.status_code == 200 else "refused"] += 1
    return statuses


class Fault:
    """A fault kind: `inject` at the record's start, `clear` at its end; both fill the record's fields."""

    kind: ClassVar[str] = ""

    def inject(self, ctx: Context, rec: FaultRecord) -> None:
        raise NotImplementedError

    def clear(self, ctx: Context, rec: FaultRecord) -> None:
        """Most faults need nothing at their end."""


class EngineKill(Fault):
    """SIGKILL one engine of the node (the lowest pid: the oldest); of another node if it runs none."""

    kind = "engine_kill"

    def inject(self, ctx: Context, rec: FaultRecord) -> None:
        engines = ctx.engines(rec.node)
        if not engines:  # the scheduled node runs none now (e.g. a restarted agent): the next node that does
            for name in sorted(ctx.nodes):
                engines = ctx.engines(name)
                if engines:
                    rec.detail["scheduled_node"], rec.node = rec.node, name
                    break
        if not engines:
            rec.error = "no engine running on any node"
            return
        pid = min(engines)
        rec.target = f"engine pid {pid} ({flag(cmdline(pid), '--model-name') or '?'})"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class AgentKill(Fault):
    """SIGKILL the node's agent; at the end, the same command line and environment started again."""

    kind = "agent_kill"

    def __init__(self) -> None:
        self._env: dict[int, dict[str, str]] = {}

    def inject(self, ctx: Context, rec: FaultRecord) -> None:
        n = ctx.nodes[rec.node]
        n.argv = cmdline(n.pid) or n.argv
        try:  # the agent's token is in its environment only; the restarted agent must accept the gateway's
            raw = Path(f"/proc/{n.pid}/environ").read_bytes()
        except OSError as e:
            rec.error = f"cannot read the agent's environment: {e}"
            return
        self._env[rec.index] = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
        rec.target = f"agent pid {n.pid}"
        with contextlib.suppress(ProcessLookupError):
            os.kill(n.pid, signal.SIGKILL)
        if n.restarted is not None:
            n.restarted.wait(timeout=10)  # reap it: it is this process's child

    def clear(self, ctx: Context, rec: FaultRecord) -> None:
        n = ctx.nodes[rec.node]
        env = self._env.pop(rec.index, None)
        if env is None or not n.argv:
            return
        argv = list(n.argv)
        i = argv.index("--exit-with-parent")  # the new agent is this process's child: it must watch this one
        argv[i + 1] = str(os.getpid())
        deadline = time.monotonic() + 10.0
        while pid_alive(n.pid) and time.monotonic() < deadline:  # the port is free once the old one is gone
            time.sleep(0.05)
        ctx.log_dir.mkdir(parents=True, exist_ok=True)
        with open(ctx.log_dir / f"agent-{n.name}-restart{rec.index}.log", "wb") as f:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    cwd=env.get("PWD") or None, start_new_session=True)
        n.pid, n.restarted = proc.pid, proc
        rec.detail["new_pid"] = proc.pid
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(n.url + "/healthz", timeout=1).status_code == 200:
                    return  # the caller stamps healthy_at
            time.sleep(0.05)
        rec.error = f"restarted agent not healthy (exit {proc.poll()})"


class TierFill(Fault):
    """A sparse file sized to the tier's free space: the agent counts file sizes, so its copies into the tier
    find it full, while the disk (or tmpfs) spends nothing on it."""

    kind = "tier_fill"

    def inject(self, ctx: Context, rec: FaultRecord) -> None:
        from live.agent_tiers import dir_bytes

        tiers = ctx.nodes[rec.node].tiers()
        if rec.tier not in tiers:
            rec.error = f"node has no tier {rec.tier!r}"
            return
        model = cold_model(ctx, rec)  # its next load comes from the cloud and its copies meet the full tier
        rec.detail.update(model=model, **make_cold(ctx, model))
        d, cap = tiers[rec.tier]
        free = max(0, cap - dir_bytes(d))
        path = d / FILL_NAME
        with open(path, "wb") as f:
            f.truncate(free)
        rec.target = f"{rec.node}/{rec.tier}/{FILL_NAME} ({free / 1e6:.0f} MB)"
        rec.detail.update(path=str(path), fill_bytes=free)

    def clear(self, ctx: Context, rec: FaultRecord) -> None:
        if rec.detail.get("path"):
            with contextlib.suppress(FileNotFoundError):
                Path(rec.detail["path"]).unlink()


class TierDelay(Fault):
    """The tier's read and write links booked for the fault's duration, through the agent's own pacing state:
    every transfer on the tier queues behind the booking, as behind a hog on the same device."""

    kind = "tier_delay"

    def inject(self, ctx: Context, rec: FaultRecord) -> None:
        n = ctx.nodes[rec.node]
        tiers, paces = n.tiers(), n.paces()
        if rec.tier not in paces or rec.tier not in tiers:
            rec.error = f"tier {rec.tier!r} is not paced on the node (only a paced tier can be delayed)"
            return
        model = cold_model(ctx, rec)  # its next load reads this node's copy in the delayed tier, if it has one
        rec.detail.update(model=model, **make_cold(ctx, model, keep=(rec.node, rec.tier)))
        r, w, lat = paces[rec.tier]
        dev = Device(PaceSpec(str(state_path_in(tiers[rec.tier][0].absolute())), r, w, lat, rec.tier))
        try:
            hold = rec.end_s - rec.start_s
            for link, bw in ((READ, r), (WRITE, w)):
                if np.isfinite(bw):
                    dev.reserve(link, int(hold * bw))
        finally:
            dev.close()
        rec.target = f"{rec.tier} links of {rec.node} for {rec.end_s - rec.start_s:g} s"


class StoreOutage(Fault):
    """The primary object store hung or down for the fault's duration, while one model (seeded by the fault's
    index) must be fetched from the cloud: it is unloaded from every node and evicted from every tier first."""

    kind = "store_outage"

    def inject(self, ctx: Context, rec: FaultRecord) -> None:
        if ctx.store is None:
            rec.error = "no object store server to stop (set object_store in the chaos config)"
            return
        if rec.mode == "down" and not ctx.store.persistent:
            rec.error = (f"mode 'down' needs a store that keeps its objects over a restart (azurite), "
                         f"not {ctx.store.kind}")
            return
        # the store first: a load of the model that starts while it is made cold meets the outage too
        if rec.mode == "hang":
            ctx.store.hang()
        else:
            ctx.store.kill()
        model = cold_model(ctx, rec)
        rec.detail.update(model=model, **make_cold(ctx, model))
        rec.target = f"{ctx.store.kind} store at {ctx.store.endpoint} ({rec.mode}); {model} made cold"

    def clear(self, ctx: Context, rec: FaultRecord) -> None:
        if ctx.store is None or rec.error:
            return
        if rec.mode == "hang":
            ctx.store.resume()
        else:
            ctx.store.start()


FAULTS: dict[str, type[Fault]] = {f.kind: f for f in (EngineKill, AgentKill, TierFill, TierDelay, StoreOutage)}


def fault_specs(cfg: Sequence[Mapping[str, Any]] | None) -> list[FaultSpec]:
    try:
        return [FaultSpec(**dict(f)) for f in (cfg or [])]
    except TypeError as e:
        raise ConfigError(f"faults: {e}") from None
