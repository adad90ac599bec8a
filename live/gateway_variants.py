"""The gateway's weight-variant choice: the bundle's variant policy (`PolicyBundle.pick_variant`, e.g.
`core.policies.variants.VariantByClass`) may serve a request for deployment `x` with its variant `x@fmt` (a
`live.quantize` copy, its own deployment in the gateway's catalog), as the simulator does once per arrival
(`sim/world.py`): the request is then placed, forwarded and recorded as `x@fmt`, its record's `variant` column
is `fmt`, and the engine is asked for the model it serves. Without a variant policy nothing changes.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from live.gateway_records import RequestInfo, served_variant

if TYPE_CHECKING:
    from live.gateway import Gateway


def pick_variant(gateway: Gateway, req: RequestInfo, body: dict[str, Any], raw: bytes) -> tuple[dict[str, Any], bytes]:
    """(body, raw) to forward for `req`: the client's, or with `model` rewritten to the deployment the bundle's
    variant policy picks when that deployment is in the catalog (`req.model` and `req.variant` follow)."""
    policy = getattr(gateway.bundle, "variants", None)
    if policy is None:
        return body, raw
    picked = gateway.bundle.pick_variant(req, gateway._view())
    # the variant a plain deployment stands for, next to its variants: the policy's base format ("bf16")
    base_format = str(getattr(policy, "base_format", ""))
    if picked == req.model or picked not in gateway.config.models:
        req.variant = served_variant(req.model) or base_format
        return body, raw
    req.model = picked
    req.variant = served_variant(picked) or base_format
    body = {**body, "model": picked}  # the engine serving `picked` answers to that name only
    return body, json.dumps(body).encode()
