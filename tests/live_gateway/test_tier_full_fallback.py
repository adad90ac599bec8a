"""A cold start placed on a tier that turns out full (another writer filled it, or the policy's view was stale)
is served anyway: the real agent refuses the copy (507), and the gateway loads without the tier (from where the
model is, or from the cloud into host memory) and records where it really came from."""

from __future__ import annotations

from pathlib import Path

import httpx

from core.decisions import ColdStart, Decision
from core.policies.autoscaling import KeepAlive
from core.policies.base import PolicyBundle, RequestView
from core.policies.caching import NoCaching
from core.state import ClusterView
from tests.live_gateway.conftest import KEYS, MODEL, cluster

TIER_BYTES = 1 << 30  # the dram tier's capacity in tests.live_gateway.conftest.start_agent


class ColdFromDram:
    """Every request cold-starts on n0 from its dram tier (copied there first when it lacks the model)."""

    def place(self, req: RequestView, view: ClusterView) -> Decision:
        return ColdStart("n0", "dram")


def test_a_full_tier_does_not_fail_the_cold_start(tmp_path: Path) -> None:
    bundle = PolicyBundle(ColdFromDram(), NoCaching(), KeepAlive(), name="cold_from_dram")
    dram = tmp_path / "n0-dram"
    dram.mkdir()
    with open(dram / "junk.bin", "wb") as f:  # sparse: the agent counts its size, the disk spends nothing
        f.truncate(TIER_BYTES - 1)
    with cluster(tmp_path, ("n0",), bundle=bundle) as c:
        key = next(iter(KEYS))
        r = httpx.post(c.gs.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                       json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
        rows = c.gs.gateway.records()
    row = rows.iloc[-1]
    assert (row["outcome"], bool(row["cold_start"]), row["source_tier"]) == ("completed", True, "cloud")
    assert [p.name for p in dram.iterdir()] == ["junk.bin"]  # nothing partial left in the full tier
