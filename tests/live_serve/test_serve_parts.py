"""The pieces of `experiments.serve` and `experiments.replay` that need no running stack: config checks, node
description and agent command lines, model specs, planning, merging."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("httpx")

from core.errors import ConfigError
from core.records import REQUEST_SCHEMA
from core.specs import ModelSpec
from core.workload.trace import Workload
from experiments.replay import ClientRow, ReplayOptions, merge_records, plan, prompt_text, resolve_target
from experiments.serve import (
    CatalogEntry,
    agent_argv,
    build_catalog,
    build_tenants,
    catalog_model_specs,
    check_memory_budget,
    engine_dtype_bytes,
    gateway_config,
    node_options,
)
from live.gateway import AgentRef


def test_tenants_star_generated_keys_and_errors() -> None:
    tenants = build_tenants([{"name": "a", "key": None, "models": "*"}, {"name": "b", "key": "k-b", "models": ["m2"]}],
                            ["m1", "m2"])
    by_name = {t.name: (k, t) for k, t in tenants.items()}
    assert by_name["a"][1].models == ("m1", "m2") and by_name["a"][0].startswith("sk-a-")
    assert by_name["b"] == ("k-b", by_name["b"][1]) and by_name["b"][1].models == ("m2",)
    other = build_tenants([{"name": "a", "key": None}], ["m1"])
    assert set(other) != {by_name["a"][0]}  # generated keys differ between runs
    with pytest.raises(ConfigError, match=r"tenants\[0\]\.models: \['zz'\] not in the catalog"):
        build_tenants([{"name": "a", "models": ["zz"]}], ["m1"])
    with pytest.raises(ConfigError, match=r"tenants\[1\]\.key: used by another tenant"):
        build_tenants([{"name": "a", "key": "k"}, {"name": "b", "key": "k"}], ["m1"])
    with pytest.raises(ConfigError, match=r"tenants\[0\]\.name"):
        build_tenants([{"models": "*"}], ["m1"])


@pytest.mark.parametrize(
    ("catalog", "match"),
    [
        ({}, "catalog: at least one model"),
        ({"m": {"preset": "tiny", "local_dir": "/x"}}, r"catalog\.m: give exactly one of"),
        ({"m": {"preset": "huge"}}, r"catalog\.m\.preset: unknown 'huge'"),
        ({"m": {"preset": "tiny", "seed": -1}}, r"catalog\.m\.seed"),
        ({"../m": {"preset": "tiny"}}, r"catalog\.\.\./m"),
        ({"m": {"local_dir": "/nonexistent/dir"}}, r"catalog\.m\.local_dir: .* has no config\.json"),
    ],
)
def test_catalog_errors_name_the_entry(tmp_path: Path, catalog: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_catalog(catalog, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing generated for a bad catalog


def test_catalog_generates_once_then_reuses(tmp_path: Path) -> None:
    first = build_catalog({"a": {"preset": "tiny", "seed": 3}}, tmp_path, progress=False)
    stamp = (first[0].path / "model.safetensors").stat().st_mtime_ns
    again = build_catalog({"a": {"preset": "tiny", "seed": 3}}, tmp_path, progress=False)
    assert again[0].path == first[0].path and (again[0].path / "model.safetensors").stat().st_mtime_ns == stamp


def test_gateway_config_unknown_key_is_named() -> None:
    agents = [AgentRef("n0", "http://127.0.0.1:1", "t")]
    with pytest.raises(ConfigError, match=r"gateway: unknown key\(s\) \['queue_timout_s'\]"):
        gateway_config({"gateway": {"queue_timout_s": 1}}, agents, {}, "admin")
    cfg = gateway_config({"gateway": {"queue_timeout_s": 1.5}}, agents, {}, "admin")
    assert cfg.queue_timeout_s == 1.5 and cfg.admin_token == "admin"


def test_resolve_target_from_serve_json_or_keys(tmp_path: Path) -> None:
    p = tmp_path / "serve.json"
    p.write_text(json.dumps({"url": "http://h:1", "admin_token": "adm", "policy": "mvp",
                             "tenants": {"demo": {"api_key": "sk-1", "models": ["a"]}}}))
    t = resolve_target({"serve_json": str(p)})
    assert (t.url, t.api_key, t.admin_token, t.policy) == ("http://h:1", "sk-1", "adm", "mvp")
    t = resolve_target({"url": "http://h:2/v1/", "api_key": "k"})
    assert (t.url, t.api_key, t.admin_token) == ("http://h:2", "k", None)
    with pytest.raises(ConfigError, match="url and api_key"):
        resolve_target({"url": "http://h:2"})
    with pytest.raises(ConfigError, match="serve_json: cannot read"):
        resolve_target({"serve_json": str(tmp_path / "missing.json")})


def test_replay_options_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"replay\.max_prompt_tokens"):
        ReplayOptions(max_prompt_tokens=0)
    with pytest.raises(ConfigError, match=r"replay\.stream_fraction"):
        ReplayOptions(stream_fraction=1.5)


def test_plan_clips_lengths_and_streams_a_seeded_share() -> None:
    n = 400
    wl = Workload.from_columns(np.arange(n, dtype=float), np.full(n, 500), np.arange(1, n + 1), model="m")
    rows = plan(wl, ReplayOptions(max_prompt_tokens=64, max_output_tokens=8, stream_fraction=0.25), seed=1)
    assert {r.prompt_tokens for r in rows} == {64}
    assert [r.output_tokens for r in rows[:10]] == [1, 2, 3, 4, 5, 6, 7, 8, 8, 8]
    share = sum(r.stream for r in rows) / n
    assert 0.18 < share < 0.32
    again = plan(wl, ReplayOptions(max_prompt_tokens=64, max_output_tokens=8, stream_fraction=0.25), seed=1)
    assert [r.stream for r in again] == [r.stream for r in rows]
    assert prompt_text(20, 7) == prompt_text(20, 7) and len(prompt_text(20, 7).split()) == 20


def _gateway_rows(ids: list[int]) -> pd.DataFrame:
    rows = []
    for i in ids:
        row = dict.fromkeys(REQUEST_SCHEMA, math.nan)
        row.update(request_id=i, tenant="demo", model="m", arrival_s=100.0, queue_s=0.5, cold_start=i == ids[0],
                   source_tier="cloud" if i == ids[0] else "gpu", node="n1", instance="n1-m-1", outcome="completed",
                   reason="", prompt_tokens=5, output_tokens=3, fetch_s=1.0, cost_usd=0.01)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(REQUEST_SCHEMA))


def test_merge_keeps_client_view_and_joins_gateway_phases() -> None:
    # the client's TPOT runs from its first to its last token chunk (last_token_s), no longer to e2e
    rows = [ClientRow(0, "m", 0.0, 5, 3, stream=True, gateway_id=7, sent_s=0.25, ttft_s=2.0, e2e_s=2.45,
                      last_token_s=2.4, in_tokens=5, out_tokens=3, outcome="completed"),
            ClientRow(1, "m", 1.0, 5, 3, stream=False, gateway_id=8, sent_s=1.0, ttft_s=0.3, e2e_s=0.3, in_tokens=5,
                      out_tokens=3, outcome="completed"),
            ClientRow(2, "m", 2.0, 5, 3, stream=False, gateway_id=None, sent_s=2.0, e2e_s=0.01, outcome="failed",
                      reason="client_error: ConnectError")]
    df = merge_records(rows, _gateway_rows([7, 8]))
    assert list(df.columns) == list(REQUEST_SCHEMA) and list(df["request_id"]) == [0, 1, 2]
    assert list(df["arrival_s"]) == [0.0, 1.0, 2.0]  # the trace's clock, not the gateway's
    assert list(df["source_tier"]) == ["cloud", "gpu", ""] and list(df["node"]) == ["n1", "n1", ""]
    assert df.loc[0, "queue_s"] == pytest.approx(0.75)  # 0.25 s waiting for a client slot + the gateway's 0.5 s
    assert df.loc[0, "ttft_s"] == pytest.approx(2.25) and df.loc[0, "tpot_s"] == pytest.approx(0.2)
    assert math.isnan(df.loc[1, "tpot_s"])
    assert df.loc[2, "outcome"] == "failed" and df.loc[2, "reason"] == "client_error: ConnectError"
    alone = merge_records(rows, None)
    assert (alone["source_tier"] == "").all() and alone["cost_usd"].isna().all()


# --------------------------------------------------------------------------- node description (serve.yaml)

CONF = Path(__file__).resolve().parents[2] / "conf"


def serve_config(*overrides: str) -> dict:
    """conf/live/serve.yaml composed exactly as `python -m experiments.serve` composes it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("live/serve", overrides=list(overrides))
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    return plain


def _dirs(tmp_path: Path, tiers) -> dict[str, Path]:
    return {t: tmp_path / t for t in tiers}


def test_default_serve_config_is_a_visibly_tiered_hierarchy() -> None:
    opts = node_options(serve_config())
    dram, nvme, sata = opts.tiers["dram"], opts.tiers["nvme"], opts.tiers["sata"]
    assert not dram.paced and math.isinf(dram.read_Bps)
    # the reference's ratios, scaled: NVMe/SATA = 7450/560, SATA/one S3 stream = 560/93
    assert nvme.read_Bps / sata.read_Bps == pytest.approx(7450 / 560, rel=0.01)
    assert opts.cloud is not None and opts.cloud.streams == 16
    assert sata.read_Bps / opts.cloud.stream_Bps == pytest.approx(560 / 93, rel=0.01)
    assert nvme.write_Bps < nvme.read_Bps and sata.write_Bps < sata.read_Bps
    assert opts.cloud.latency_s == pytest.approx(0.02) and sata.latency_s == pytest.approx(1e-4)
    assert opts.max_num_seqs == 8 and opts.memory_budget_bytes == 224 << 20


def test_default_memory_budget_forces_memory_pressure() -> None:
    """With the default catalog in the engine's dtype, a node holds small-a and one tiny, never all three."""
    from live.checkpoint import PRESETS
    from live.llama_config import model_spec

    cfg = serve_config()
    budget = node_options(cfg).memory_budget_bytes
    dtype_bytes = engine_dtype_bytes(cfg)
    assert dtype_bytes == 4  # the CPU engine computes in float32
    sizes = {name: model_spec(name, PRESETS[e["preset"]], dtype_bytes).resident_bytes
             for name, e in cfg["catalog"].items()}
    assert sum(sizes.values()) > budget  # all three at once: no
    assert sizes["small-a"] + sizes["tiny-a"] <= budget  # the biggest with a tiny: yes
    assert max(sizes.values()) <= budget


def test_agent_argv_is_what_the_agent_parses(tmp_path: Path) -> None:
    """The command line built for a node is accepted by the agent's own parser and means what the config says."""
    from live.agent import config_from_args

    cfg = serve_config()
    opts = node_options(cfg)
    argv = agent_argv("n1", "127.0.0.1", 8711, _dirs(tmp_path, opts.tiers), opts, ["file:///tmp/cloud"], cfg,
                      progressive=True, parent_pid=4242)
    assert argv[1:3] == ["-m", "live.agent"]
    assert "--tier-bw=nvme=466000000.0:431000000.0:0.0001" in argv
    assert not any(a.startswith("--tier-bw=dram") for a in argv)  # unpaced: no flag
    agent, _ = config_from_args([*argv[3:], "--token", "t"])
    assert agent.node == "n1" and agent.port == 8711 and agent.parent_pid == 4242
    assert agent.tiers["sata"].read_Bps == 35e6 and agent.tiers["sata"].write_Bps == 32.5e6
    assert agent.tiers["sata"].latency_s == pytest.approx(1e-4) and agent.tiers["sata"].capacity_bytes == 2 << 30
    assert agent.tiers["dram"].read_Bps is None and agent.tiers["nvme"].read_Bps == 466e6
    assert agent.cloud_streams == 16 and agent.cloud_stream_Bps == 5.8e6 and agent.cloud_latency_s == 0.02
    assert agent.memory_budget_bytes == 224 << 20 and agent.engine.max_num_seqs == 8
    assert agent.engine.progressive and agent.engine.dtype == "float32" and agent.stores == ["file:///tmp/cloud"]
    assert agent.engine.prefix_cache_blocks == 0 and "--prefix-cache-blocks" not in argv  # off by default
    cached = serve_config("node.prefix_cache_blocks=32")
    opts = node_options(cached)
    argv = agent_argv("n1", "127.0.0.1", 8711, _dirs(tmp_path, opts.tiers), opts, ["file:///tmp/cloud"], cached,
                      progressive=True, parent_pid=4242)
    agent, _ = config_from_args([*argv[3:], "--token", "t"])
    assert agent.engine.prefix_cache_blocks == 32


def test_old_tier_form_is_accepted_unpaced(tmp_path: Path) -> None:
    from live.agent import config_from_args

    cfg = {"tiers": {"dram": "256M", "sata": 1 << 30}}
    opts = node_options(cfg)
    assert {t: (o.capacity_bytes, o.paced) for t, o in opts.tiers.items()} == {"dram": (256 << 20, False),
                                                                                 "sata": (1 << 30, False)}
    assert opts.cloud is None and opts.memory_budget_bytes is None and opts.max_num_seqs is None
    argv = agent_argv("n0", "127.0.0.1", 1, _dirs(tmp_path, opts.tiers), opts, ["file:///c"], cfg, False, 1)
    assert not [a for a in argv if a.startswith(("--tier-bw", "--cloud", "--memory-budget", "--max-num-seqs"))]
    agent, _ = config_from_args([*argv[3:], "--token", "t"])
    assert agent.tiers["sata"].read_Bps is None and agent.memory_budget_bytes is None
    # and through hydra overrides: a bare size makes that tier unpaced, `~` drops one
    via_hydra = node_options(serve_config("tiers.nvme=1G", "~tiers.sata"))
    assert via_hydra.tiers.keys() == {"dram", "nvme"} and not via_hydra.tiers["nvme"].paced


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"tiers": {"nvme": {"capacity": "1G", "read_MBps": 0}}}, r"tiers\.nvme\.read_MBps: a bandwidth"),
        ({"tiers": {"nvme": {"capacity": "1G", "write_MBps": -5}}}, r"tiers\.nvme\.write_MBps"),
        ({"tiers": {"nvme": {"capacity": "1G", "read_MBps": "fast"}}}, r"tiers\.nvme\.read_MBps: .*'fast'"),
        ({"tiers": {"nvme": {"capacity": "1G", "read_MBps": True}}}, r"tiers\.nvme\.read_MBps"),
        ({"tiers": {"sata": {"capacity": "1G", "latency_ms": -1}}}, r"tiers\.sata\.latency_ms"),
        ({"tiers": {"sata": {"capacity": "1G", "read_Mbps": 10}}}, r"tiers\.sata: unknown key\(s\) \['read_Mbps'\]"),
        ({"tiers": {"sata": {"read_MBps": 10}}}, r"tiers\.sata\.capacity: required"),
        ({"tiers": {"sata": "lots"}}, r"tiers\.sata: bad size 'lots'"),
        ({"tiers": {"tape": "1G"}}, r"tiers: \['tape'\]; local tiers are"),
        ({"tiers": {}}, r"tiers: none given"),
        ({"tiers": {"dram": "1G"}, "cloud": {"stream_MBps": 0}}, r"cloud\.stream_MBps"),
        ({"tiers": {"dram": "1G"}, "cloud": {"streams": 0}}, r"cloud\.streams: a positive integer"),
        ({"tiers": {"dram": "1G"}, "cloud": {"stream_mbps": 4}}, r"cloud: unknown key\(s\) \['stream_mbps'\]"),
        ({"tiers": {"dram": "1G"}, "node": {"memory": "1G"}}, r"node: unknown key\(s\) \['memory'\]"),
        ({"tiers": {"dram": "1G"}, "node": {"memory_budget": "0"}}, r"node\.memory_budget: must be > 0"),
        ({"tiers": {"dram": "1G"}, "node": {"max_num_seqs": 0}}, r"node\.max_num_seqs"),
        ({"tiers": {"dram": "1G"}, "node": {"prefix_cache_blocks": -1}}, r"node\.prefix_cache_blocks"),
    ],
)
def test_node_config_errors_name_the_field(override: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        node_options(override)


def test_memory_budget_smaller_than_every_model_is_named_with_its_bytes() -> None:
    models = {"a": ModelSpec("a", 0.005, 4, 256, 2, 64, dtype_bytes=4),   # 20 MB
              "b": ModelSpec("b", 0.05, 14, 512, 4, 64, dtype_bytes=4)}   # 200 MB
    opts = node_options({"tiers": {"dram": "1G"}, "node": {"memory_budget": "16M"}})
    with pytest.raises(ConfigError, match=r"node\.memory_budget: 16777216 bytes is smaller than every catalog "
                                          r"model \(the smallest, a, holds 20000000 bytes"):
        check_memory_budget(opts, models)
    check_memory_budget(node_options({"tiers": {"dram": "1G"}, "node": {"memory_budget": "32M"}}), models)
    check_memory_budget(node_options({"tiers": {"dram": "1G"}}), models)  # no budget: unbounded
    with pytest.raises(ConfigError, match=r"engine\.dtype: unknown 'int3'"):
        engine_dtype_bytes({"engine": {"dtype": "int3"}})


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_catalog_model_specs_are_the_checkpoints_real_sizes(tmp_path: Path) -> None:
    """One ModelSpec per checkpoint, from its config.json: stored bytes = the file's tensors (what tiers hold),
    resident bytes = the tensors in the engine's dtype (what a node's memory budget holds)."""
    entries = build_catalog({"tiny-a": {"preset": "tiny", "seed": 0}}, tmp_path, progress=False)
    header = {k: v for k, v in _safetensors_header(entries[0].path / "model.safetensors").items()
              if k != "__metadata__"}
    n_params = sum(math.prod(t["shape"]) for t in header.values())
    stored = sum(t["data_offsets"][1] - t["data_offsets"][0] for t in header.values())
    assert {t["dtype"] for t in header.values()} == {"BF16"} and stored == 2 * n_params
    specs = catalog_model_specs(entries, dtype_bytes=4)
    spec = specs["tiny-a"]
    assert spec.weights_bytes == pytest.approx(stored, abs=0.5)  # what a tier holds and a load moves
    assert spec.resident_bytes == pytest.approx(4 * n_params, abs=0.5)  # float32 in the engine: twice the file
    assert catalog_model_specs(entries, dtype_bytes=2)["tiny-a"].resident_bytes == pytest.approx(stored, abs=0.5)
    config = json.loads((entries[0].path / "config.json").read_text())
    assert (spec.n_layers, spec.hidden_size, spec.n_kv_heads) == (
        config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"])
    assert spec.head_dim == config["hidden_size"] // config["num_attention_heads"]
    assert (spec.dtype_bytes, spec.resident_dtype_bytes) == (2, 4)
    # the gateway plans with them instead of its nominal 1B stand-ins
    agents = [AgentRef("n0", "http://127.0.0.1:1", "t")]
    tenants = build_tenants([{"name": "d", "key": "k", "models": "*"}], ["tiny-a"])
    gw = gateway_config({"gateway": {}}, agents, tenants, "admin", specs)
    assert gw.models == {"tiny-a": spec}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match=r"catalog\.broken: .*missing required key"):
        catalog_model_specs([CatalogEntry("broken", bad)], 4)


@pytest.mark.parametrize(
    ("script", "module", "args", "message"),
    [
        ("tierlab-serve", "experiments.serve", ["tiers.nvme.read_MBps=0", "port=0"],
         "tierlab live: error: tiers.nvme.read_MBps: a bandwidth"),
        ("tierlab-serve", "experiments.serve", ["node.memory_budget=1M", "~catalog.small-a", "port=0",
                                                "progress=false", "checkpoint_cache={tmp}/ckpts"],
         "tierlab live: error: node.memory_budget: 1048576 bytes is smaller than every catalog model (the smallest, "
         "tiny-a, holds 19997696 bytes"),
        ("tierlab-replay", "experiments.replay", ["url=http://127.0.0.1:9", "api_key=k", "progress=false"],
         "tierlab replay: error: url: cannot reach the gateway"),
    ],
)
def test_entry_points_reject_a_bad_config_naming_the_field(tmp_path: Path, script: str, module: str, args: list,
                                                           message: str) -> None:
    """`python -m experiments.serve|replay` and the console scripts: one line naming the field, exit status 2."""
    import shutil
    import subprocess
    import sys

    commands = [[sys.executable, "-m", module]]
    if shutil.which(script):  # installed (pip install -e .)
        commands.append([shutil.which(script)])
    for cmd in commands:
        argv = [a.format(tmp=tmp_path) for a in args]
        done = subprocess.run([*cmd, *argv, f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        assert done.returncode == 2, (cmd, done.stdout[-2000:], done.stderr[-2000:])
        assert message in done.stderr, done.stderr[-2000:]
