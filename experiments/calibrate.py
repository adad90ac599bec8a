"""`python -m experiments.calibrate [overrides]`: measure this machine's live stack and write a description the
simulator loads unchanged.

It serves nothing: with the node a user would serve (`conf/live/calibrate.yaml` takes serve.yaml's `tiers`,
`cloud`, `node`, `engine` and `catalog` blocks), it

1. checks the config, generates the catalog's checkpoints (one per distinct size is probed), and checks that
   every tier can hold the largest of them and is writable (a ConfigError naming the tier and its path
   otherwise, before anything starts);
2. publishes them to a file:// store and starts one node agent (`python -m live.agent`) with those tiers and
   paces, plus one with a single cloud stream when `cloud.streams` > 1;
3. repeats `probe.repeats` times, for each checkpoint: a cloud fetch with N streams and with 1 (per-stream rate
   and first-byte latency), a cold start from the cloud (the engine's start-up phases from its /stats), a copy
   into every tier from host memory (write) and out of it (read); once per checkpoint, prefill and decode step
   times of the warm engine (`experiments.calibrate_probes`);
4. writes `calibrated.yaml` (cluster, engine, inference and models blocks, each number commented with mean ±
   sd and n; `experiments.calibrate_report`) and `calibration.json` (every raw sample) into the output dir,
   and stops every agent and engine and removes every tier dir it made, whatever happened (`finally`).

Simulate with it:
    python -m experiments.simulate scenario=smoke cluster=calibrated engine=calibrated inference=calibrated \\
        models=calibrated +calibration=OUT/calibrated.yaml workload=poisson
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.errors import ConfigError
from core.specs import ModelSpec
from experiments.calibrate_probes import (
    AgentClient,
    ProbeError,
    Stat,
    probe_cloud_fetch,
    probe_engine,
    probe_steps,
    probe_tiers,
    stream_rate_and_ttfb,
)
from experiments.calibrate_report import (
    cluster_block,
    document,
    engine_block,
    measured_block,
    model_entry,
    request_overhead,
    step_overhead,
    tier_stats,
)
from experiments.entry import hydra_command
from experiments.serve_catalog import (
    CatalogEntry,
    build_catalog,
    catalog_model_specs,
    engine_dtype_bytes,
    publish_catalog,
)
from experiments.serve_nodes import (
    AgentProcess,
    CloudOptions,
    NodeOptions,
    node_options,
    start_agents,
    stop_agents,
)
from live.llama_config import LlamaConfig

log = logging.getLogger(__name__)
PROBE_KEYS = ("repeats", "prefill_lengths", "decode_batches", "decode_tokens")


@dataclasses.dataclass(frozen=True)
class ProbeOptions:
    """How much to measure (the `probe` block)."""

    repeats: int = 3
    prefill_lengths: tuple[int, ...] = (16, 64, 256)
    decode_batches: tuple[int, ...] = (1, 2, 4, 8)
    decode_tokens: int = 16


def probe_options(cfg: Mapping[str, Any], max_num_seqs: int) -> ProbeOptions:
    """The `probe` block, checked (errors name the field)."""
    block = dict(cfg.get("probe") or {})
    unknown = sorted(set(block) - set(PROBE_KEYS))
    if unknown:
        raise ConfigError(f"probe: unknown key(s) {unknown}; known: {list(PROBE_KEYS)}")

    def ints(key: str, default: tuple[int, ...]) -> tuple[int, ...]:
        value = block.get(key, list(default))
        if not isinstance(value, list | tuple) or not value or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
            raise ConfigError(f"probe.{key}: a non-empty list of positive integers is needed, got {value!r}")
        return tuple(sorted(set(value)))

    opts = ProbeOptions(block.get("repeats", 3), ints("prefill_lengths", ProbeOptions.prefill_lengths),
                        ints("decode_batches", ProbeOptions.decode_batches), block.get("decode_tokens", 16))
    for key in ("repeats", "decode_tokens"):
        v = getattr(opts, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"probe.{key}: a positive integer is needed, got {v!r}")
    if max(opts.decode_batches) > max_num_seqs:
        raise ConfigError(f"probe.decode_batches: {max(opts.decode_batches)} is above node.max_num_seqs "
                          f"({max_num_seqs}): the engine would not batch it")
    return opts


def one_per_size(entries: list[CatalogEntry], specs: Mapping[str, ModelSpec]) -> list[CatalogEntry]:
    """The first catalog entry of each distinct checkpoint size, smallest first (copies of one size measure
    the same thing)."""
    seen: dict[float, CatalogEntry] = {}
    for e in entries:
        seen.setdefault(specs[e.name].weights_bytes, e)
    return [seen[k] for k in sorted(seen)]


def preflight(node: NodeOptions, tier_dirs: Mapping[str, Path], largest: ModelSpec) -> None:
    """Every tier must hold the largest probed checkpoint and be writable: a ConfigError naming the tier and its
    path otherwise. Creates the tier dirs (the caller removes them)."""
    need = largest.weights_bytes
    for name, path in tier_dirs.items():
        cap = node.tiers[name].capacity_bytes
        if cap < need:
            raise ConfigError(f"tiers.{name}: tier {name!r} at {path} is full for the probe: its capacity "
                              f"{cap} bytes cannot hold checkpoint {largest.name!r} ({need:.0f} bytes)")
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".tierlab-probe-"):
                pass
            free = shutil.disk_usage(path).free
        except OSError as e:
            raise ConfigError(f"tiers.{name}: tier {name!r} at {path} is not writable ({e.strerror or e})") from None
        if free < need:
            raise ConfigError(f"tiers.{name}: tier {name!r} at {path} is full: {free} bytes free on its "
                              f"filesystem, checkpoint {largest.name!r} needs {need:.0f}")


def _fastest_write_tier(node: NodeOptions) -> str:
    return max(node.tiers, key=lambda t: (node.tiers[t].write_Bps, t == "dram"))


def _tier_dirs(node: NodeOptions, workdir: Path, dram_root: Path) -> dict[str, Path]:
    # the layout start_agents gives node "n0"
    return {t: (dram_root if t == "dram" else workdir) / "n0" / t for t in node.tiers}


def measure(cfg: Mapping[str, Any], node: NodeOptions, probe: ProbeOptions, entries: list[CatalogEntry],
            specs: Mapping[str, ModelSpec], workdir: Path, dram_root: Path, stores: list[str],
            log_dir: Path) -> dict[str, Any]:
    """Start the agents, run every probe, stop everything; the raw samples."""
    token = secrets.token_urlsafe(24)
    streams = node.cloud.streams if node.cloud is not None else 16
    dest = _fastest_write_tier(node)
    one_cfg = {**cfg, "nodes": 1, "progress": False}
    agents: list[AgentProcess] = []
    single: list[AgentProcess] = []
    samples: dict[str, Any] = {"tiers": [], "cloud": {e.name: {"n": [], "one": []} for e in entries},
                               "engine": {e.name: [] for e in entries}, "steps": {}}
    progress = bool(cfg.get("progress", True))
    try:
        agents = start_agents(one_cfg, workdir, dram_root, stores, token, False, log_dir, node)
        agent = AgentClient(agents[0].url, token, {t: str(p) for t, p in agents[0].tier_dirs.items()})
        one: AgentClient | None = None
        if streams > 1:
            cloud = node.cloud or CloudOptions()
            one_node = dataclasses.replace(node, tiers={dest: node.tiers[dest]},
                                           cloud=CloudOptions(1, cloud.stream_Bps, cloud.latency_s))
            single = start_agents(one_cfg, workdir / "one-stream", dram_root / "one-stream", stores, token, False,
                                  log_dir / "one-stream", one_node)
            one = AgentClient(single[0].url, token, {t: str(p) for t, p in single[0].tier_dirs.items()})
        bar = tqdm(total=probe.repeats * len(entries), desc="calibrate", unit="probe", disable=not progress)
        for rep in range(probe.repeats):
            for e in entries:
                vocab = LlamaConfig.from_dir(e.path).vocab_size
                samples["cloud"][e.name]["n"].append(probe_cloud_fetch(agent, e.name, dest))
                if one is not None:
                    samples["cloud"][e.name]["one"].append(probe_cloud_fetch(one, e.name, dest))

                def steps(url: str, name: str = e.name, vocab: int = vocab) -> dict[str, Any]:
                    return probe_steps(url, name, vocab, probe.prefill_lengths, probe.decode_batches,
                                       probe.decode_tokens, probe.repeats)

                eng = probe_engine(agent, e.name, vocab, steps if rep == 0 else None)
                try:
                    if "steps" in eng:
                        samples["steps"][e.name] = eng.pop("steps")
                    agent.evict_everywhere(e.name)
                    samples["tiers"].append(probe_tiers(agent, e.name, list(node.tiers), dest))
                finally:
                    # what a stop costs: the gateway frees an engine's memory only when POST /unload returns
                    # (live.gateway_actions._run_stop), i.e. once the engine's process group is gone
                    t_stop = time.perf_counter()
                    agent.unload(eng["instance"])
                    eng["stop_s"] = time.perf_counter() - t_stop
                samples["engine"][e.name].append(eng)
                bar.update()
        bar.close()
    finally:
        left = stop_agents([*agents, *single], token)
        if left:
            log.warning("engine pids %s survived the stop", left)
    return samples


def _stat_s(s: Stat) -> str:
    return f"{s.mean:.3g} ± {s.sd:.2g} (n={s.n})"


def summarize(cfg: Mapping[str, Any], node: NodeOptions, samples: Mapping[str, Any], entries: list[CatalogEntry],
              specs: Mapping[str, ModelSpec], command: str) -> tuple[str, dict[str, Any], str]:
    """calibrated.yaml's text, its plain blocks, and the one-line summary."""
    streams = node.cloud.streams if node.cloud is not None else 16
    rates, ttfbs, aggregates = [], [], []
    for e in entries:
        for n_s, o_s in zip(samples["cloud"][e.name]["n"], samples["cloud"][e.name]["one"] or
                            samples["cloud"][e.name]["n"], strict=False):
            r, lat = stream_rate_and_ttfb(n_s["bytes"], o_s["seconds"], n_s["seconds"], streams)
            rates.append(r)
            ttfbs.append(lat)
            aggregates.append(n_s["bytes"] / n_s["seconds"])
    engines = [(e, s) for e in entries for s in samples["engine"][e.name]]
    dram_read = Stat.of([s["fetch_bytes"] / s["stats"]["read_s"] for _, s in engines if s["stats"]["read_s"]])
    h2d = Stat.of([s["fetch_bytes"] / s["stats"]["load_s"] for _, s in engines if s["stats"]["load_s"]])
    process = Stat.of([s["stats"]["imports_done_at_s"] for _, s in engines])
    after = Stat.of([s["stats"]["ready_at_s"] - s["stats"]["weights_resident_at_s"] for _, s in engines])
    first = Stat.of([max(0.0, s["first_ttft_s"] - s["warm_ttft_s"]) for _, s in engines])
    stop = Stat.of([s["stop_s"] for _, s in engines if s.get("stop_s") is not None])
    # fixed costs the table and roofline leave out: one per forward pass, one per request (outside the batch)
    steps_by_model = {e.name: samples["steps"][e.name] for e in entries}
    step_over, request_over = step_overhead(steps_by_model), request_overhead(steps_by_model)
    measured, prefill_flops, hbm = [], [], []
    for e in entries:
        entry, rate, iter1 = measured_block(e.name, samples["steps"][e.name], step_over.value)
        measured.append(entry)
        prefill_flops.append(2.0 * specs[e.name].params_b * 1e9 * rate)
        hbm.append(specs[e.name].weights_bytes / iter1)
    memory = float(node.memory_budget_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    tiers = tier_stats(samples["tiers"])
    seqs = node.max_num_seqs or 8
    # the simulator reserves KV beside the weights; enough for max_num_seqs sequences of full context
    kv_frac = max(seqs * LlamaConfig.from_dir(e.path).max_position_embeddings * specs[e.name].kv_bytes_per_token
                  / specs[e.name].resident_bytes for e in entries)
    cluster = cluster_block(node, int(cfg.get("nodes", 1)), tiers, dram_read, h2d, Stat.of(rates), Stat.of(ttfbs),
                            Stat.of(aggregates), streams, memory, max(prefill_flops), max(hbm), kv_frac)
    header = [f"Calibrated by: {command}",
              f"on {platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; raw samples "
              "in calibration.json beside this file.",
              "Every measured number: mean ± sd over n samples. Simulate with:",
              "  python -m experiments.simulate scenario=smoke cluster=calibrated engine=calibrated "
              "inference=calibrated models=calibrated +calibration=THIS_FILE workload=poisson",
              "Engine start-up phases by checkpoint (seconds from spawn, /stats; read_s and load_s are durations):"]
    for e in entries:  # the start-up phases of each checkpoint size (the engine block pools them)
        runs = samples["engine"][e.name]

        def phase(key: str, runs: list[dict[str, Any]] = runs) -> str:
            return f"{key} {_stat_s(Stat.of([r['stats'][key] for r in runs if r['stats'][key] is not None]))}"

        header.append(f"  {e.name} ({specs[e.name].weights_bytes / 1e6:.1f} MB): " + ", ".join(
            phase(k) for k in ("imports_done_at_s", "read_s", "load_s", "weights_resident_at_s", "ready_at_s",
                               "first_token_at_s")))
    blocks = {"cluster": cluster,
              "engine": engine_block(process, after, first, seqs, kv_frac, step_over, request_over, stop),
              "inference": {"measured": measured},
              "models": {"bases": [], "extra": [model_entry(specs[e.name]) for e in entries]}}
    text, plain = document(header, blocks)
    def read_mbps(t: str) -> float:
        return (tiers[t]["read_Bps"] if tiers[t]["read_Bps"].n else dram_read).mean / 1e6

    line = ("calibrated: " + ", ".join(f"{t} r/w {read_mbps(t):.3g}/{tiers[t]['write_Bps'].mean / 1e6:.3g} MB/s"
                                       for t in node.tiers)
            + f"; cloud {Stat.of(rates).mean / 1e6:.3g} MB/s per stream x {streams}, ttfb "
            f"{Stat.of(ttfbs).mean * 1e3:.3g} ms; engine start {process.mean:.2f} s, stop {stop.mean:.2f} s; "
            f"overheads: step "
            f"{step_over.value * 1e3:.3g} ms, request {request_over.value * 1e3:.3g} ms; "
            + ", ".join(f"{m['model']} prefill {m['prefill_tokens_per_s'].value:.0f} tok/s, decode "
                        f"{(m['decode_iter_s'].value[0] + step_over.value) * 1e3:.2f} ms/step at B=1"
                        for m in measured))
    return text, plain, line


def rerender(cfg: dict[str, Any], out_dir: Path, source: Path) -> str:
    """calibrated.yaml from the samples an earlier calibration measured (its calibration.json in `source`),
    described by this code, with no probe run: after a change to how samples become a description (a new
    field, a new estimator) the measurements stay the same. The node options must match the earlier run's."""
    try:
        raw = json.loads((source / "calibration.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"rerender: cannot read {source / 'calibration.json'} ({e})") from None
    node = node_options(cfg)
    entries = build_catalog(cfg.get("catalog") or {}, str(cfg.get("checkpoint_cache", "~/.cache/tierlab")), False)
    specs = catalog_model_specs(entries, engine_dtype_bytes(cfg))
    entries = one_per_size(entries, specs)
    probed = set(raw.get("models") or {})
    if probed != {e.name for e in entries}:
        raise ConfigError(f"rerender: {source} probed {sorted(probed)}, this catalog has {[e.name for e in entries]}")
    samples = _int_keys(raw["samples"])
    text, plain, line = summarize(cfg, node, samples, entries, specs, str(raw.get("command", "")))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "calibrated.yaml").write_text(text)
    (out_dir / "calibration.json").write_text(json.dumps({**raw, "calibrated": plain, "rerendered_from": str(source)},
                                                         indent=2, default=str))
    return line + f" (re-rendered from {source}, written to {out_dir / 'calibrated.yaml'})"


def _int_keys(obj: Any) -> Any:
    """JSON's string keys back to ints where they were ints (batch sizes, prompt lengths)."""
    if isinstance(obj, dict):
        return {(int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k): _int_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_int_keys(v) for v in obj]
    return obj


def run(cfg: dict[str, Any], out_dir: Path) -> str:
    """Check, probe, write calibrated.yaml and calibration.json into `out_dir`; the one-line summary.
    With `rerender=DIR`, no probe: the description of DIR's samples (`rerender`)."""
    if cfg.get("rerender"):
        return rerender(cfg, out_dir, Path(str(cfg["rerender"])).expanduser())
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = bool(cfg.get("progress", True))
    node = node_options(cfg)
    probe = probe_options(cfg, node.max_num_seqs or 8)
    entries = build_catalog(cfg.get("catalog") or {}, str(cfg.get("checkpoint_cache", "~/.cache/tierlab")), progress)
    specs = catalog_model_specs(entries, engine_dtype_bytes(cfg))
    entries = one_per_size(entries, specs)
    if node.memory_budget_bytes is not None:
        too_big = [e.name for e in entries if specs[e.name].resident_bytes > node.memory_budget_bytes]
        if too_big:
            raise ConfigError(f"node.memory_budget: {node.memory_budget_bytes} bytes cannot hold {too_big}")
    base = Path(str(cfg["workdir"])).expanduser() if cfg.get("workdir") else out_dir
    workdir = base / f"calibrate-work-{secrets.token_hex(4)}"  # ours alone: removed whole at the end
    shm = Path("/dev/shm")
    dram_root = Path(tempfile.mkdtemp(prefix="tierlab-calibrate-", dir=shm if shm.is_dir() else None))
    try:
        preflight(node, _tier_dirs(node, workdir, dram_root), max(specs.values(), key=lambda m: m.weights_bytes))
        stores = [f"file://{workdir / 'cloud'}"]
        publish_catalog(entries, stores, {}, progress)
        samples = measure(cfg, node, probe, entries, specs, workdir, dram_root, stores, out_dir / "logs")
    finally:
        shutil.rmtree(dram_root, ignore_errors=True)  # tmpfs is memory
        shutil.rmtree(workdir, ignore_errors=True)
    command = " ".join(["python -m experiments.calibrate", *sys.argv[1:]])
    text, plain, line = summarize(cfg, node, samples, entries, specs, command)
    (out_dir / "calibrated.yaml").write_text(text)
    raw = {"command": command, "machine": {"host": platform.node(), "cpus": os.cpu_count()},
           "probe": dataclasses.asdict(probe), "models": {e.name: dataclasses.asdict(specs[e.name]) for e in entries},
           "samples": samples, "calibrated": plain}
    (out_dir / "calibration.json").write_text(json.dumps(raw, indent=2, default=str))
    return line + f" (written to {out_dir / 'calibrated.yaml'})"


def _command(cfg: dict[str, Any], out_dir: Path) -> str:
    logging.getLogger().setLevel(str(cfg.get("log_level", "warning")).upper())
    return run(cfg, out_dir)


def main() -> None:
    """Console-script style entry point."""
    hydra_command("live/calibrate", _command, prog="tierlab calibrate", errors=(ProbeError,))


if __name__ == "__main__":
    main()
