"""The pieces of `live.serve` and `live.replay` that need no running stack: config checks, planning, merging."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("httpx")

from core.errors import ConfigError
from core.records import REQUEST_SCHEMA
from core.workload.trace import Workload
from live.gateway import AgentRef
from live.replay import ClientRow, ReplayOptions, merge_records, plan, prompt_text, resolve_target
from live.serve import build_catalog, build_tenants, gateway_config


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
    rows = [ClientRow(0, "m", 0.0, 5, 3, stream=True, gateway_id=7, sent_s=0.25, ttft_s=2.0, e2e_s=2.4, in_tokens=5,
                      out_tokens=3, outcome="completed"),
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
