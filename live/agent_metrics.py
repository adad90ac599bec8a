"""A node agent's Prometheus metrics (`prometheus_client`), read off the agent's state when scraped (GET /metrics).

Each agent has its own `CollectorRegistry`. Labels are bounded by the node's tiers, its catalog of models and
the tier names; `node` is on every family so that several agents can be scraped into one Prometheus.

    tierlab_agent_tier_capacity_bytes{node,tier}, tierlab_agent_tier_used_bytes{node,tier},
    tierlab_agent_tier_models{node,tier}                      tier occupancy (used includes copies in flight)
    tierlab_agent_host_used_bytes{node}                       host memory outside the tiers (cloud loads' copies)
    tierlab_agent_link_bandwidth_bytes_per_second{node,device,link}   an emulated device's configured bandwidth
    tierlab_agent_link_bandwidth_in_use_bytes_per_second{node,device,link}   that bandwidth while the link is
                                                              booked (`live.pacing.Device.next_free`), else 0
    tierlab_agent_link_backlog_seconds{node,device,link}      how long the link stays booked from now
    tierlab_agent_transfers_in_flight{node}                   copies and fetches under way
    tierlab_agent_instances{node,model,status}                engines by status
    tierlab_agent_moves_total{node,from_tier,to_tier,kind}, tierlab_agent_moved_bytes_total{...}   tier movements
    tierlab_agent_loads_total{node,model,source_tier}         /load calls that started an engine
    tierlab_agent_load_phase_seconds{node,source_tier,phase}  histogram: fetch (each hop), engine_start, ready
    tierlab_agent_errors{node}                                recent errors kept for /status

Devices are the tiers (by name) and the NIC ("nic", its write link: the cloud fetches it carries).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from live.gateway_metrics import CONTENT_TYPE, PHASE_BUCKETS_S, Histogram, histograms, samples
from live.pacing import READ, WRITE, Device

if TYPE_CHECKING:
    from live.agent_node import NodeAgent

__all__ = ["CONTENT_TYPE", "AgentMetrics"]
LINKS = (("read", READ), ("write", WRITE))


class AgentMetrics(Collector):
    """The agent's collector and registry; `load_done(result)` notes each successful /load's timings."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.registry = CollectorRegistry(auto_describe=False)
        self.loads: Counter[tuple[str, str]] = Counter()  # (model, source tier)
        self.phases: dict[tuple[str, str], Histogram] = defaultdict(lambda: Histogram(PHASE_BUCKETS_S))
        self._moves_seen = 0
        self.moves: Counter[tuple[str, str, str]] = Counter()
        self.moved_bytes: Counter[tuple[str, str, str]] = Counter()
        self.registry.register(self)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def load_done(self, result: Mapping[str, Any]) -> None:
        """Count a /load's result: its source tier, and each phase it reports (a load, not a hot path)."""
        timings = result.get("timings") or {}
        source = str(timings.get("source_tier", ""))
        self.loads[str(result.get("instance", {}).get("model", "")), source] += 1
        for hop in timings.get("fetch_s") or []:
            self.phases[source, "fetch"].observe(float(hop.get("duration_s", 0.0)))
        for phase, key in (("engine_start", "engine_start_s"), ("ready", "ready_s")):
            if isinstance(timings.get(key), int | float):
                self.phases[source, phase].observe(float(timings[key]))

    def _read_moves(self) -> None:
        agent = self.agent
        with agent._lock:
            new = agent.moves[self._moves_seen:]
            self._moves_seen = len(agent.moves)
        for m in new:
            key = (m["from_tier"], m["to_tier"], m["kind"])
            self.moves[key] += 1
            self.moved_bytes[key] += m["bytes"]

    def _devices(self) -> list[tuple[str, Device]]:
        agent = self.agent
        out = [(name, tier.device) for name, tier in agent.tiers.items()]
        return out + ([("nic", agent.nic)] if agent.nic is not None else [])

    def collect(self) -> Iterator[Metric]:
        agent, node = self.agent, self.agent.config.node
        self._read_moves()
        yield from self._tier_families(node)
        yield self._one("tierlab_agent_host_used_bytes", "Bytes in host memory outside the tiers.", node,
                        agent.host.used_bytes())
        yield from self._link_families(node)
        yield self._one("tierlab_agent_transfers_in_flight", "Copies and fetches under way.", node,
                        len(agent.transfers_in_flight()))
        with agent._lock:
            instances = Counter((i.model, i.status) for i in agent.instances.values())
            errors = len(agent.errors)
        yield samples(GaugeMetricFamily("tierlab_agent_instances", "Engines by model and status.",
                                        labels=["node", "model", "status"]),
                      [((node, m, s), n) for (m, s), n in sorted(instances.items())])
        yield self._one("tierlab_agent_errors", "Recent errors kept for /status.", node, errors)
        yield samples(CounterMetricFamily("tierlab_agent_moves", "Tier movements.",
                                          labels=["node", "from_tier", "to_tier", "kind"]),
                      [((node, *k), n) for k, n in sorted(self.moves.items())])
        yield samples(CounterMetricFamily("tierlab_agent_moved_bytes", "Bytes moved between tiers.",
                                          labels=["node", "from_tier", "to_tier", "kind"]),
                      [((node, *k), n) for k, n in sorted(self.moved_bytes.items())])
        yield samples(CounterMetricFamily("tierlab_agent_loads", "Engines started by /load, by source tier.",
                                          labels=["node", "model", "source_tier"]),
                      [((node, *k), n) for k, n in sorted(self.loads.items())])
        yield histograms("tierlab_agent_load_phase_seconds", "Phases of the loads: fetch (each hop), "
                         "engine_start (process start), ready (start until ready).",
                         ["node", "source_tier", "phase"],
                         [((node, *k), h) for k, h in sorted(self.phases.items())])

    @staticmethod
    def _one(name: str, doc: str, node: str, value: float) -> GaugeMetricFamily:
        return samples(GaugeMetricFamily(name, doc, labels=["node"]), [((node,), value)])

    def _tier_families(self, node: str) -> Iterator[Metric]:
        tiers = self.agent.tiers
        yield samples(GaugeMetricFamily("tierlab_agent_tier_capacity_bytes", "A tier's capacity.",
                                        labels=["node", "tier"]),
                      [((node, n), t.config.capacity_bytes) for n, t in tiers.items()])
        yield samples(GaugeMetricFamily("tierlab_agent_tier_used_bytes", "Bytes a tier holds or has reserved "
                                        "for copies in flight.", labels=["node", "tier"]),
                      [((node, n), t.used_bytes()) for n, t in tiers.items()])
        yield samples(GaugeMetricFamily("tierlab_agent_tier_models", "Complete checkpoints a tier holds.",
                                        labels=["node", "tier"]),
                      [((node, n), len(t.models())) for n, t in tiers.items()])

    def _link_families(self, node: str) -> Iterator[Metric]:
        now = time.monotonic()
        bw, in_use, backlog = [], [], []
        for name, device in self._devices():
            for link_name, link in LINKS:
                rate = device.bandwidth_Bps(link)
                if rate is None:
                    continue
                ahead = max(0.0, device.next_free(link) - now)
                bw.append(((node, name, link_name), rate))
                in_use.append(((node, name, link_name), rate if ahead > 0 else 0.0))
                backlog.append(((node, name, link_name), ahead))
        labels = ["node", "device", "link"]
        yield samples(GaugeMetricFamily("tierlab_agent_link_bandwidth_bytes_per_second", "An emulated device's "
                                        "bandwidth (paced links only).", labels=labels), bw)
        yield samples(GaugeMetricFamily("tierlab_agent_link_bandwidth_in_use_bytes_per_second", "The link's "
                                        "bandwidth while transfers have it booked, else 0.", labels=labels), in_use)
        yield samples(GaugeMetricFamily("tierlab_agent_link_backlog_seconds", "How long the link stays booked "
                                        "from now.", labels=labels), backlog)
