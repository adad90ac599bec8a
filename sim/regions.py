"""Regions in the simulator: each request's client region, and the network round trip it pays.

`attach` gives the world the region table and a client region per request (a seeded draw from the configured
mix: core.regions.assign_client_regions). `network_columns` fills the request table's `client_region` and
`network_s` columns and folds the round trip into TTFT and end-to-end latency:

    network_s = access_ms + RTT(client region, serving node's region)     (one round trip: the prompt goes to
                                                                            the region, the first token comes back)

The world's timeline is not shifted by it (a request is queued at the region at its trace arrival, not RTT / 2
later): with RTTs of tens of ms against queueing and cold starts of seconds the error is small, and the
placement policy sees the same RTT in its score. Regions off (`world.regions` None): client_region "" and
network_s NaN, TTFT and e2e unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from core.regions import RegionSetup, RegionTable, assign_client_regions


def attach(world: Any, setup: RegionSetup, tenants: Any, seed: int) -> None:
    """Give `world` the region table and each request's client region (`setup.by`: per request or per tenant)."""
    n = len(tenants)
    world.regions = setup.table
    world.client_regions = assign_client_regions(
        n, setup.client_mix, seed, tenants=[str(t) for t in tenants] if setup.by == "tenant" else None)


def network_columns(world: Any, cols: dict[str, Any]) -> None:
    """Fill `client_region` / `network_s` in the request columns and add the round trip to TTFT and e2e."""
    reqs = world.requests
    n = len(reqs)
    table: RegionTable | None = world.regions
    if table is None:
        cols["client_region"] = [""] * n
        cols["network_s"] = [math.nan] * n
        return
    nodes = world.state.nodes
    regions = [r.client_region for r in reqs]
    net = [math.nan] * n
    for k, r in enumerate(reqs):
        if r.node and r.client_region and not r.cache:
            net[k] = table.client_rtt_s(r.client_region, nodes[r.node].spec.region)
        elif r.cache and r.client_region:  # the gateway's cache answers at the client's nearest site
            net[k] = table.access_ms / 1e3
    cols["client_region"] = regions
    cols["network_s"] = net
    for c in ("ttft_s", "e2e_s"):
        col = cols[c]
        for k in range(n):
            if not math.isnan(net[k]) and col[k] is not None and not math.isnan(col[k]):
                col[k] = col[k] + net[k]


def summary(requests: pd.DataFrame, table: RegionTable, threshold_ms: float = 100.0) -> dict[str, Any]:
    """Routing RTT over completed requests: share under `threshold_ms`, percentiles, requests by serving kind."""
    done = requests[(requests.outcome == "completed") & requests.network_s.notna()]
    if done.empty:
        return {"requests": 0}
    ms = done.network_s.to_numpy(dtype=float) * 1e3
    return {
        "requests": len(done),
        f"share_rtt_under_{threshold_ms:g}ms": float(np.mean(ms < threshold_ms)),
        "rtt_ms_p50": float(np.percentile(ms, 50)), "rtt_ms_p90": float(np.percentile(ms, 90)),
        "rtt_ms_p99": float(np.percentile(ms, 99)), "rtt_ms_mean": float(ms.mean()),
    }
