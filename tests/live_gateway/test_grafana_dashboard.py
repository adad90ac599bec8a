"""docs/grafana/tierlab.json is a Grafana dashboard (JSON model) whose every query names metrics that the gateway's
and the agent's expositions actually have."""

from __future__ import annotations

import json
import re
from pathlib import Path

from starlette.testclient import TestClient

from live.agent import AgentConfig, NodeAgent, TierConfig
from live.agent_metrics import AgentMetrics
from live.gateway import Gateway, create_app
from tests.live_gateway import prom
from tests.live_gateway.conftest import REPO, static_config

DASHBOARD = REPO / "docs" / "grafana" / "tierlab.json"
METRIC_RE = re.compile(r"\b(tierlab_[a-z0-9_]+)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _names(text: str) -> set[str]:
    """Every series name the exposition `text` can have (a histogram's three, a counter's _total)."""
    return {f.name + suffix for f in prom.parse(text).values() for suffix in SUFFIXES.get(f.type, ("",))}


def test_dashboard_is_a_grafana_model_over_exposed_metrics(tmp_path: Path) -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 6
    gw = Gateway(static_config())
    with TestClient(create_app(gw)) as tc:
        exposed = _names(tc.get("/metrics").text)
    tiers = {"dram": TierConfig("dram", tmp_path / "d", 1 << 20)}
    agent = NodeAgent(AgentConfig(node="n0", token="t", stores=[f"file://{tmp_path / 'cloud'}"],
                                  host_dir=tmp_path / "host", tiers=tiers))
    try:
        exposed |= _names(AgentMetrics(agent).exposition().decode())
    finally:
        agent.shutdown()
    used: set[str] = set()
    for p in panels:
        assert p["type"] in ("timeseries", "stat") and {"h", "w", "x", "y"} <= set(p["gridPos"])
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names = set(METRIC_RE.findall(t["expr"]))
            assert names, f"{p['title']}: {t['expr']} names no tierlab metric"
            assert names <= exposed, f"{p['title']}: {sorted(names - exposed)} not in the exposition"
            used |= names
    wanted = {"tierlab_requests_total", "tierlab_ttft_seconds_bucket", "tierlab_cold_starts_total",
              "tierlab_cold_start_phase_seconds_sum", "tierlab_model_queue_depth", "tierlab_agent_tier_used_bytes",
              "tierlab_agent_link_bandwidth_in_use_bytes_per_second", "tierlab_cost_per_1k_tokens_usd"}
    assert wanted <= used
