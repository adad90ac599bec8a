"""Regions in the gateway: the emulated network between a client's region and the serving node's region.

The client names its region in the `x-tierlab-client-region` header (`live.gateway_records.CLIENT_REGION_HEADER`);
each agent reports its own (`--region`). When the bundle's placement carries a region table
(`core.policies.regions.RegionRouting.table`, conf/regions), the gateway waits the client <-> node round trip
before forwarding, so TTFT and e2e (counted from arrival) include it, and records the wait as `network_s`.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from live.gateway import Gateway
    from live.gateway_mirror import Live
    from live.gateway_records import RequestInfo


async def emulate_rtt(gw: Gateway, req: RequestInfo, lv: Live) -> None:
    """Wait the round trip between `req`'s client region and `lv`'s node region; nothing without a client region,
    a region table, or a node region the table knows."""
    table = getattr(gw.bundle.placement, "table", None)
    if not req.client_region or table is None:
        return
    region = gw._state().nodes[lv.inst.node].spec.region
    try:
        rtt_s = float(table.client_rtt_s(req.client_region, region))
    except ValueError:  # core.errors.ConfigError: a region the table does not know
        return
    req.network_s = rtt_s if math.isnan(req.network_s) else req.network_s + rtt_s
    await asyncio.sleep(rtt_s)
