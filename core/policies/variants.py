"""Variant selection: which weight format (bf16 / fp8 / int8 / int4 deployment) serves a request.

`VariantByClass` sorts a request into the first class whose rule matches it (tenant, model prefix, prompt length)
and serves it with the lowest-cost variant the class's quality floor allows whose relative cost meets the class's
cost target (else the cheapest the floor allows). A variant's relative cost is its GPU-memory-seconds per token
against the requested deployment's: resident bytes ratio x decode time multiplier / speculative speed-up, all read
from the catalog specs the view holds (core/variants.py builds them). Pure: no clock, no state of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.policies.base import RequestView
from core.specs import ModelSpec
from core.state import ClusterView
from core.variants import speculative_speedup, variant_name


@dataclass(frozen=True)
class RequestClass:
    """A rule (all given conditions must hold) and what the class accepts."""

    name: str
    tenants: tuple[str, ...] = ()  # empty: any tenant
    model_prefixes: tuple[str, ...] = ()  # empty: any model
    min_prompt_tokens: int = 0
    max_prompt_tokens: int | None = None
    allowed: tuple[str, ...] = ("bf16",)  # the formats this class may be served in (its quality floor)
    cost_target: float = 1.0  # the highest relative cost (1 = the requested deployment) this class should pay

    def matches(self, req: RequestView) -> bool:
        if self.tenants and req.tenant not in self.tenants:
            return False
        if self.model_prefixes and not any(req.model.startswith(p) for p in self.model_prefixes):
            return False
        if req.prompt_tokens < self.min_prompt_tokens:
            return False
        return self.max_prompt_tokens is None or req.prompt_tokens <= self.max_prompt_tokens


def relative_cost(variant: ModelSpec, base: ModelSpec) -> float:
    """GPU-memory-seconds per decoded token of `variant` over `base`'s (resident bytes x decode step time)."""
    def per_token(m: ModelSpec) -> float:
        speed = (speculative_speedup(m.spec_acceptance, m.spec_draft_tokens, m.spec_draft_cost)
                 if m.spec_draft_tokens > 0 else 1.0)
        return m.resident_bytes * m.decode_time_mult / speed
    return per_token(variant) / per_token(base)


class VariantByClass:
    """Pick a variant per request class and cost target; requests no class matches keep their deployment."""

    def __init__(self, classes: Sequence[Mapping[str, Any]] = (), base_format: str = "bf16") -> None:
        self.base_format = base_format
        self.classes = tuple(
            RequestClass(name=str(c.get("name", f"class{i}")), tenants=tuple(c.get("tenants") or ()),
                         model_prefixes=tuple(c.get("model_prefixes") or ()),
                         min_prompt_tokens=int(c.get("min_prompt_tokens", 0)),
                         max_prompt_tokens=None if c.get("max_prompt_tokens") is None else int(c["max_prompt_tokens"]),
                         allowed=tuple(c.get("allowed") or (base_format,)),
                         cost_target=float(c.get("cost_target", 1.0)))
            for i, c in enumerate(classes))
        for c in self.classes:
            if c.cost_target <= 0:
                raise ValueError(f"variant class {c.name!r}: cost_target must be > 0, got {c.cost_target}")

    def request_class(self, req: RequestView) -> RequestClass | None:
        for c in self.classes:
            if c.matches(req):
                return c
        return None

    def pick(self, req: RequestView, view: ClusterView) -> str:
        """The deployment (`req.model` or one of its `@fmt` variants in the catalog) that should serve `req`."""
        cls = self.request_class(req)
        if cls is None:
            return req.model
        models = view.models
        base = models.get(req.model)
        if base is None:
            return req.model
        options: list[tuple[float, int, str]] = []  # (relative cost, order in `allowed`, deployment)
        for i, fmt in enumerate(cls.allowed):
            name = req.model if fmt == self.base_format else variant_name(req.model, fmt)
            spec = models.get(name)
            if spec is not None:
                options.append((relative_cost(spec, base), i, name))
        if not options:
            return req.model
        # the best-quality variant (first in `allowed`) meeting the cost target, else the cheapest allowed
        meeting = [o for o in options if o[0] <= cls.cost_target + 1e-12]
        if meeting:
            return min(meeting, key=lambda o: o[1])[2]
        return min(options)[2]
