"""Policies: pure objects that take `now` and a cluster view and return decisions.

Placement (which instance or node serves a request), caching (tier movements) and
autoscaling (keep-alive, scale-up, pre-warm) compose into a `PolicyBundle`.
"""

from core.policies.base import PolicyBundle

__all__ = ["PolicyBundle"]
