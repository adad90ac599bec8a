"""sim/fabric.py: links shared max-min fairly, driven by a real SimPy environment.

Every expected finish time below is worked out by hand from the rates the scenario implies.
"""

from __future__ import annotations

import math

import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.fabric import Fabric, Flow

INF = float("inf")


def _world(caps: dict[str, float], streams: dict[str, int] | None = None, t0: float = 0.0):
    env = simpy.Environment(initial_time=t0)
    fab = Fabric(env)
    in_flight: dict[str, float] = {}
    fab.add_node("n", caps, streams or {}, in_flight)
    return env, fab, in_flight


def _go(env, fab, done: dict[str, float], name: str, links, nbytes, cap=INF, latency=0.0, track=False) -> Flow:
    def on_done(flow: Flow) -> None:
        assert name not in done, f"{name} finished twice"
        done[name] = env.now

    return fab.transfer("n", tuple(links), nbytes, cap, latency, on_done, track=track)


def _start_at(env, t: float, fn) -> None:
    def proc():
        yield env.timeout(t)
        fn()

    env.process(proc())


# --------------------------------------------------------------------------- one flow
@pytest.mark.parametrize(
    ("link_bw", "cap", "latency", "expected"),
    [
        (100.0, INF, 0.0, 10.0),  # link-bound
        (100.0, 40.0, 0.0, 25.0),  # cap-bound
        (100.0, 40.0, 0.5, 25.5),  # latency is added before the bytes move
        (30.0, 40.0, 2.0, 2.0 + 1000.0 / 30.0),
    ],
)
def test_single_flow_finishes_at_bytes_over_min_of_link_and_cap(link_bw, cap, latency, expected):
    env, fab, _ = _world({"a": link_bw})
    done: dict[str, float] = {}
    f = _go(env, fab, done, "f", ["a"], 1000.0, cap=cap, latency=latency)
    env.run()
    assert done["f"] == pytest.approx(expected, rel=1e-12)
    assert f.done and f.remaining == 0.0
    assert f.started_s == pytest.approx(latency)


def test_flow_waiting_out_its_latency_has_not_started():
    env, fab, _ = _world({"a": 100.0})
    f = _go(env, fab, {}, "f", ["a"], 1000.0, latency=3.0)
    env.run(until=1.0)
    assert math.isnan(f.started_s) and f.rate == 0.0 and not f.done
    env.run(until=4.0)
    assert f.started_s == 3.0 and f.rate == 100.0


# --------------------------------------------------------------------------- sharing
def test_two_equal_flows_share_the_link_and_finish_together_at_twice_the_time():
    env, fab, _ = _world({"a": 100.0})
    done: dict[str, float] = {}
    f1 = _go(env, fab, done, "f1", ["a"], 1000.0)
    f2 = _go(env, fab, done, "f2", ["a"], 1000.0)
    assert f1.rate == f2.rate == 50.0
    env.run()
    assert done["f1"] == pytest.approx(20.0) and done["f2"] == pytest.approx(20.0)


def test_capped_flow_leaves_its_unused_share_to_the_other_flow():
    env, fab, _ = _world({"a": 100.0})
    done: dict[str, float] = {}
    slow = _go(env, fab, done, "slow", ["a"], 1000.0, cap=20.0)
    fast = _go(env, fab, done, "fast", ["a"], 1000.0)
    assert slow.rate == 20.0 and fast.rate == 80.0  # not 50/50: max-min gives the spare 30 to `fast`
    env.run()
    assert done["fast"] == pytest.approx(1000.0 / 80.0)
    # `slow` stays at its cap after `fast` leaves: 1000 / 20
    assert done["slow"] == pytest.approx(50.0)


def test_flow_over_two_links_is_bounded_by_the_tighter_and_the_spare_goes_to_the_other_flow():
    env, fab, _ = _world({"x": 100.0, "y": 30.0})
    done: dict[str, float] = {}
    both = _go(env, fab, done, "both", ["x", "y"], 300.0)
    only_x = _go(env, fab, done, "only_x", ["x"], 1400.0)
    assert both.rate == pytest.approx(30.0) and only_x.rate == pytest.approx(70.0)
    env.run()
    assert done["both"] == pytest.approx(10.0)
    # only_x: 700 B at 70 B/s in 10 s, then the last 700 B alone at 100 B/s
    assert done["only_x"] == pytest.approx(17.0)


def test_three_flows_two_links_max_min():
    # A on x+y, B on y, C on x. y=30 is shared by A and B (15 each); C gets x - 15 = 85.
    env, fab, _ = _world({"x": 100.0, "y": 30.0})
    a = _go(env, fab, {}, "a", ["x", "y"], 1e6)
    b = _go(env, fab, {}, "b", ["y"], 1e6)
    c = _go(env, fab, {}, "c", ["x"], 1e6)
    assert (a.rate, b.rate, c.rate) == pytest.approx((15.0, 15.0, 85.0))


def test_flow_starting_midway_slows_the_first_exactly():
    env, fab, _ = _world({"a": 100.0})
    done: dict[str, float] = {}
    first = _go(env, fab, done, "first", ["a"], 1000.0, track=True)
    second = _go(env, fab, done, "second", ["a"], 300.0, latency=4.0)
    env.run()
    # 0-4 s: first alone at 100 (400 B). 4-10 s: both at 50, second's 300 B done at 10, first has 300 B left.
    # 10-13 s: first alone again at 100.
    assert done["second"] == pytest.approx(10.0)
    assert done["first"] == pytest.approx(13.0)
    assert second.started_s == 4.0
    expected = [(0.0, 0.0), (4.0, 400.0), (10.0, 700.0), (13.0, 1000.0)]
    assert len(first.trace) == len(expected)
    for got, want in zip(first.trace, expected, strict=True):
        assert got == pytest.approx(want)


def test_time_at_bytes_inverts_piecewise_constant_progress():
    env, fab, _ = _world({"a": 100.0})
    first = _go(env, fab, {}, "first", ["a"], 1000.0, track=True)
    _go(env, fab, {}, "second", ["a"], 300.0, latency=4.0)
    env.run()
    for target, t in [(0.0, 0.0), (200.0, 2.0), (400.0, 4.0), (550.0, 7.0), (700.0, 10.0), (850.0, 11.5),
                      (1000.0, 13.0)]:
        assert first.time_at_bytes(target) == pytest.approx(t, abs=1e-9), target


def test_time_at_bytes_of_a_flow_that_waited_for_a_stream_starts_at_admission():
    env, fab, _ = _world({"a": 100.0}, streams={"a": 1})
    _go(env, fab, {}, "first", ["a"], 500.0)
    later = _go(env, fab, {}, "later", ["a"], 500.0, track=True)
    env.run()
    assert later.started_s == pytest.approx(5.0)
    assert later.time_at_bytes(250.0) == pytest.approx(7.5)
    assert later.time_at_bytes(500.0) == pytest.approx(10.0)


def test_untracked_flow_keeps_no_trace():
    env, fab, _ = _world({"a": 100.0})
    f = _go(env, fab, {}, "f", ["a"], 10.0)
    env.run()
    assert f.trace is None


# --------------------------------------------------------------------------- streams
def test_max_streams_make_extra_flows_wait_in_line():
    env, fab, _ = _world({"r": 100.0}, streams={"r": 2})
    done: dict[str, float] = {}
    a = _go(env, fab, done, "a", ["r"], 500.0)
    b = _go(env, fab, done, "b", ["r"], 1000.0)
    c = _go(env, fab, done, "c", ["r"], 500.0)
    assert a.rate == b.rate == 50.0 and c.rate == 0.0 and math.isnan(c.started_s)
    env.run()
    # a done at 10 (500 at 50); c admitted then, shares with b (500 left) at 50 each -> both done at 20
    assert done["a"] == pytest.approx(10.0)
    assert c.started_s == pytest.approx(10.0)
    assert done["b"] == pytest.approx(20.0) and done["c"] == pytest.approx(20.0)


def test_a_full_link_does_not_block_flows_on_other_links():
    env, fab, _ = _world({"r": 100.0, "s": 10.0}, streams={"r": 1})
    done: dict[str, float] = {}
    _go(env, fab, done, "a", ["r"], 1000.0)
    b = _go(env, fab, done, "b", ["r"], 100.0)
    c = _go(env, fab, done, "c", ["s"], 50.0)
    assert math.isnan(b.started_s) and c.started_s == 0.0 and c.rate == 10.0
    env.run()
    assert done == pytest.approx({"a": 10.0, "b": 11.0, "c": 5.0})


def test_a_flow_needing_a_full_link_waits_even_if_its_other_link_is_free():
    env, fab, _ = _world({"r": 100.0, "w": 100.0}, streams={"r": 1})
    done: dict[str, float] = {}
    _go(env, fab, done, "a", ["r"], 1000.0)
    _go(env, fab, done, "copy", ["r", "w"], 500.0)
    env.run()
    assert done == pytest.approx({"a": 10.0, "copy": 15.0})


# --------------------------------------------------------------------------- in_flight
def test_in_flight_reflects_remaining_bytes_on_every_link_and_waiting_flows():
    env, fab, in_flight = _world({"r": 100.0, "w": 50.0}, streams={"r": 1})
    _go(env, fab, {}, "a", ["r"], 1000.0)
    assert in_flight == {"r": 1000.0}
    snapshots = {}

    def add_second():
        _go(env, fab, {}, "copy", ["r", "w"], 300.0)  # waits for `a` to free the single stream on r
        snapshots["t4"] = dict(in_flight)

    _start_at(env, 4.0, add_second)
    env.run(until=10.5)
    snapshots["t10.5"] = dict(in_flight)
    env.run()
    # at 4 s `a` has 600 B left; the waiting copy counts fully on both its links
    assert snapshots["t4"] == pytest.approx({"r": 900.0, "w": 300.0})
    # at 10 s `a` finished and the copy started at 50 B/s (bounded by w): the dict is refreshed on events only
    assert snapshots["t10.5"] == pytest.approx({"r": 300.0, "w": 300.0})
    assert in_flight == {}


def test_in_flight_is_the_dict_passed_in():
    env, fab, in_flight = _world({"a": 10.0})
    assert fab.nodes["n"].in_flight is in_flight
    _go(env, fab, {}, "f", ["a"], 20.0)
    assert in_flight == {"a": 20.0}


# --------------------------------------------------------------------------- properties
_LINKS = ("x", "y", "z")


@st.composite
def _scenarios(draw):
    caps = {k: draw(st.floats(1.0, 1000.0)) for k in _LINKS}
    n = draw(st.integers(1, 6))
    flows = []
    for _ in range(n):
        links = draw(st.lists(st.sampled_from(_LINKS), min_size=1, max_size=3, unique=True))
        cap = draw(st.one_of(st.just(INF), st.floats(0.5, 1500.0)))
        nbytes = draw(st.floats(1.0, 1e5))
        flows.append((tuple(links), cap, nbytes))
    return caps, flows


@settings(max_examples=150, deadline=None)
@given(_scenarios())
def test_rates_are_max_min_fair_and_every_flow_finishes(scenario):
    caps, spec = scenario
    env, fab, _ = _world(caps)
    done: dict[str, float] = {}
    flows = [_go(env, fab, done, str(i), links, nbytes, cap=cap) for i, (links, cap, nbytes) in enumerate(spec)]
    tol = 1e-9
    # feasibility: no link over capacity, no flow over its cap
    for link, c in caps.items():
        assert sum(f.rate for f in flows if link in f.links) <= c * (1 + tol)
    for f in flows:
        assert 0 < f.rate <= f.cap * (1 + tol)
    # max-min: every flow is at its cap, or crosses a saturated link on which no flow gets more than it
    for f in flows:
        if f.rate >= f.cap * (1 - tol):
            continue
        bottlenecked = False
        for link in f.links:
            on_link = [g for g in flows if link in g.links]
            saturated = sum(g.rate for g in on_link) >= caps[link] * (1 - tol)
            if saturated and all(g.rate <= f.rate * (1 + tol) for g in on_link):
                bottlenecked = True
        assert bottlenecked, (f.links, f.rate)
    env.run()
    assert len(done) == len(flows)
    for i, (links, cap, nbytes) in enumerate(spec):
        # nobody beats having the links to itself (less the 1e-3 B the fabric rounds a finish by)
        alone = (nbytes - 1e-3) / min(cap, *(caps[k] for k in links))
        assert done[str(i)] >= alone * (1 - 1e-9)


def test_flow_completes_late_in_a_long_simulation():
    env, fab, _ = _world({"a": 7.45e9}, t0=3e7)  # ~347 days in
    done: dict[str, float] = {}
    _go(env, fab, done, "f", ["a"], 1e10)
    steps = 0
    while env.peek() < INF and steps < 1000:
        env.step()
        steps += 1
    assert done.get("f") == pytest.approx(3e7 + 1e10 / 7.45e9)
