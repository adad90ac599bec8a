"""A request as the simulator tracks it (one object per request, slots for speed)."""

from __future__ import annotations

from typing import Any

_NAN = float("nan")


class Request:
    """Inputs from the workload plus everything that happens to the request."""

    __slots__ = (
        "admitted_s",
        "arrival_s",
        "cache",
        "cached_tokens",
        "client_region",
        "cold",
        "deadline_s",
        "finish_s",
        "first_token_s",
        "id",
        "instance",
        "model",
        "node",
        "outcome",
        "output_tokens",
        "placed_s",
        "prefill_start_s",
        "prefix_blocks",
        "pressure_node",
        "prompt_tokens",
        "reason",
        "source_tier",
        "tenant",
    )

    def __init__(self, id: int, model: str, tenant: str, prompt_tokens: int, output_tokens: int,
                 arrival_s: float, deadline_s: float, prefix_blocks: tuple[int, ...] = ()) -> None:
        self.id = id
        self.model = model
        self.tenant = tenant
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.arrival_s = arrival_s
        self.deadline_s = deadline_s
        self.prefix_blocks = prefix_blocks  # prompt block ids (core/prefix_cache.py); () when the trace has none
        self.cached_tokens = 0  # prompt tokens its prefill skipped (a prefix-cache hit on its instance)
        self.instance: Any = None  # the SimEngine it was routed to
        self.pressure_node: str | None = None  # the node where this waiting request last asked for GPU pressure
        self.node = ""
        self.cold = False
        self.source_tier = ""
        self.placed_s = _NAN
        self.admitted_s = _NAN
        self.prefill_start_s = _NAN
        self.first_token_s = _NAN
        self.finish_s = _NAN
        self.outcome = ""
        self.reason = ""
        self.cache = ""  # "exact" / "semantic": answered by the gateway's response cache (no engine)
        self.client_region = ""  # where its client is (core/regions.py; "" = regions off)
