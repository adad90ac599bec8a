"""Store failover: with the primary store down (connection refused, or hung), loads switch to the next store
within 2 s and switch back once it answers again. Real moto S3 servers and a hanging TCP server on loopback;
the back-off policy itself is unit-tested with a fake clock."""

from __future__ import annotations

import contextlib
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from live.manifest import verify
from live.registry import FetchResult, Registry
from live.store_health import (
    BackoffPolicy,
    StoreHealth,
    StoreState,
    after_failure,
    after_success,
    is_unreachable,
    plan,
)
from live.stores import StoreError, open_store

from .conftest import S3_CREDS
from .services import HOST, ServiceUnavailable, free_port, hanging_server, moto_server

NAME = "llama-tiny"
SWITCH_BUDGET_S = 2.0  # the most a down primary may add to a load (issue 14, item 7)


# --- the policy, pure, on a fake clock ---------------------------------------------------------------------------
def test_plan_puts_down_stores_last_until_their_backoff_passes() -> None:
    policy = BackoffPolicy(base_s=5.0, max_s=60.0)
    states = [StoreState(), StoreState(), StoreState()]
    assert plan(states, 0.0, policy).order == (0, 1, 2)

    states[0] = after_failure(states[0], 10.0, policy)  # primary down at t=10: back-off 5 s
    assert states[0].down_until == 15.0
    p = plan(states, 12.0, policy)
    assert p.order == (1, 2, 0) and p.probes == frozenset()  # tried last, not skipped
    p = plan(states, 15.0, policy)
    assert p.order == (0, 1, 2) and p.probes == {0}  # back-off over: probed in its priority place

    # every store down: all are still tried, in priority order
    down = [after_failure(StoreState(), 0.0, policy) for _ in range(3)]
    assert plan(down, 1.0, policy).order == (0, 1, 2)
    assert plan([StoreState(), *down[1:]], 1.0, policy).order == (0, 1, 2)
    assert plan([down[0], StoreState(), down[2]], 1.0, policy).order == (1, 0, 2)


def test_backoff_doubles_per_consecutive_failure_up_to_the_cap_and_resets_on_success() -> None:
    policy = BackoffPolicy(base_s=5.0, max_s=60.0)
    state, now, waits = StoreState(), 0.0, []
    for _ in range(6):
        state = after_failure(state, now, policy)
        waits.append(state.down_until - now)
        now = state.down_until
    assert waits == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert after_success(state) == StoreState()
    assert after_failure(after_success(state), 0.0, policy).down_until == 5.0


def test_one_caller_probes_at_a_time_and_a_stale_claim_is_given_up() -> None:
    clock = [0.0]
    health = StoreHealth(2, BackoffPolicy(base_s=5.0, probe_grace_s=30.0), clock=lambda: clock[0])
    health.failed(0)
    assert health.plan().order == (1, 0)
    clock[0] = 5.0
    first = health.plan()
    assert first.order == (0, 1) and first.probes == {0}
    second = health.plan()  # the probe is in flight: other callers keep trying the primary last
    assert second.order == (1, 0) and second.probes == frozenset()
    health.release(first.probes)  # the prober did not reach it (e.g. cancelled): another may probe
    third = health.plan()
    assert third.probes == {0}
    clock[0] = 35.0  # the claimer never reported: after the grace another caller probes
    assert health.plan().probes == {0}
    health.failed(0)  # the probe found it still down: back-off doubles
    assert health.states()[0].failures == 2 and health.states()[0].down_until == 45.0
    health.report(0, None)  # it answered
    assert health.plan().order == (0, 1) and not health.is_down(0)


def test_only_no_answer_counts_as_down() -> None:
    assert is_unreachable(ConnectionRefusedError("refused"))
    assert is_unreachable(TimeoutError("read timed out"))
    wrapped = StoreError("s3://b/k: range [0, 8) failed")
    wrapped.__cause__ = TimeoutError("stalled")
    assert is_unreachable(wrapped)
    assert not is_unreachable(FileNotFoundError("no such key"))  # the store answered
    assert not is_unreachable(ValueError("manifest hashes to another revision"))
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError:
            raise FileNotFoundError("not in this store") from None  # replaced on purpose
    except FileNotFoundError as e:
        assert not is_unreachable(e)


# --- real servers --------------------------------------------------------------------------------------------------
class Primary:
    """A primary S3 store on a fixed loopback port, which a test can stop, hang, and bring back."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        self.url = f"s3://tierlab-{uuid.uuid4().hex[:12]}/models"
        self.options = {**S3_CREDS, "endpoint_url": self.endpoint}
        self._stack = contextlib.ExitStack()

    def start(self) -> None:
        """A fresh moto server at the same endpoint, with the bucket (moto keeps data in memory only)."""
        self._stack.enter_context(moto_server(self.workdir, port=self.port))
        bucket = self.url.split("/")[2]
        open_store(f"s3://{bucket}", self.options).fs.mkdir(bucket)

    def stop(self) -> None:
        """Stop the server: connections are refused from now on."""
        self._stack.close()

    def hang(self) -> None:
        """Stop the server and listen in its place without ever answering."""
        self._stack.close()
        self._stack.enter_context(hanging_server(self.port))


@pytest.fixture
def primary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Primary]:
    p = Primary(tmp_path_factory.mktemp("primary"))
    try:
        p.start()
    except ServiceUnavailable as e:
        pytest.fail(f"moto S3 server did not start: {e}")
    try:
        yield p
    finally:
        p.stop()


def _registry(primary: Primary, secondary: tuple[str, dict], backoff_s: float = 5.0) -> Registry:
    return Registry([primary.url, secondary[0]], {primary.url: primary.options, secondary[0]: secondary[1]},
                    chunk_bytes=1 << 20, health_policy=BackoffPolicy(base_s=backoff_s))


def _load(reg: Registry, dest: Path) -> tuple[FetchResult, float]:
    """What an agent does per load: read the manifest, fetch against it; the result and the seconds taken."""
    t0 = time.monotonic()
    manifest = reg.manifest(NAME)
    result = reg.fetch(NAME, dest, streams=8, manifest=manifest)
    elapsed = time.monotonic() - t0
    assert verify(result.path, manifest) == []  # still verified against the manifest's sha256
    return result, elapsed


def _baseline(reg: Registry, tmp_path: Path, want_url: str) -> float:
    """The median of a few healthy loads (all served by `want_url`)."""
    times = []
    for k in range(3):
        result, elapsed = _load(reg, tmp_path / f"base{k}")
        assert result.store_url == want_url and result.failures == ()
        times.append(elapsed)
    return statistics.median(times)


def _no_partial(tmp_path: Path) -> None:
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith((".tierlab-fetch-", ".tierlab-tmp-"))]


def test_refused_primary_switches_to_the_secondary_within_2s(tmp_path: Path, tiny_ckpt: Path, primary: Primary,
                                                             s3_url: tuple[str, dict]) -> None:
    reg = _registry(primary, s3_url)
    reg.publish(NAME, tiny_ckpt)
    base = _baseline(reg, tmp_path, primary.url)

    primary.stop()
    result, first = _load(reg, tmp_path / "down1")  # the load that finds the primary down
    assert result.store_url == s3_url[0]
    result, second = _load(reg, tmp_path / "down2")  # the primary is now tried last: no cost at all
    assert result.store_url == s3_url[0] and result.failures == ()
    print(f"\nrefused primary: healthy load {base:.3f} s; first load after the stop {first:.3f} s "
          f"(+{first - base:.3f} s); next load {second:.3f} s (+{second - base:.3f} s)")
    assert first - base < SWITCH_BUDGET_S
    assert second - base < SWITCH_BUDGET_S
    assert reg.health.is_down(0)
    _no_partial(tmp_path)


def test_hanging_primary_switches_to_the_secondary_within_2s(tmp_path: Path, tiny_ckpt: Path, primary: Primary,
                                                             s3_url: tuple[str, dict]) -> None:
    reg = _registry(primary, s3_url)
    reg.publish(NAME, tiny_ckpt)
    base = _baseline(reg, tmp_path, primary.url)
    # the same healthy fetch by a fresh registry (its store clients made on the way): the baseline of the last check
    t0 = time.monotonic()
    known = _registry(primary, s3_url).fetch(NAME, tmp_path / "fresh-base", streams=8, manifest=reg.manifest(NAME))
    fresh_base = time.monotonic() - t0
    assert known.store_url == primary.url

    primary.hang()  # accepts TCP on the same endpoint, never answers
    result, first = _load(reg, tmp_path / "hung1")
    assert result.store_url == s3_url[0]
    result, second = _load(reg, tmp_path / "hung2")
    assert result.store_url == s3_url[0] and result.failures == ()
    print(f"\nhanging primary: healthy load {base:.3f} s; first load after the hang {first:.3f} s "
          f"(+{first - base:.3f} s); next load {second:.3f} s (+{second - base:.3f} s)")
    assert first - base < SWITCH_BUDGET_S
    assert second - base < SWITCH_BUDGET_S
    _no_partial(tmp_path)

    # a fetch given a manifest read earlier (an agent copying a model it knows) also skips the hung primary
    fresh = _registry(primary, s3_url)
    t0 = time.monotonic()
    got = fresh.fetch(NAME, tmp_path / "hung3", streams=8, manifest=result.manifest)
    took = time.monotonic() - t0
    print(f"hanging primary, fetch with a known manifest, fresh registry: {took:.3f} s (healthy: {fresh_base:.3f} s)")
    assert got.store_url == s3_url[0] and [f.store_url for f in got.failures] == [primary.url]
    assert took - fresh_base < SWITCH_BUDGET_S


def test_primary_is_preferred_again_once_it_answers(tmp_path: Path, tiny_ckpt: Path, primary: Primary,
                                                    s3_url: tuple[str, dict]) -> None:
    backoff_s = 2.0
    reg = _registry(primary, s3_url, backoff_s=backoff_s)
    reg.publish(NAME, tiny_ckpt)
    base = _baseline(reg, tmp_path, primary.url)

    primary.stop()
    result, _elapsed = _load(reg, tmp_path / "down")
    assert result.store_url == s3_url[0]

    primary.start()  # a fresh server: publish the same checkpoint (same revision) to it alone
    Registry([primary.url], {primary.url: primary.options}).publish(NAME, tiny_ckpt)
    back_at = time.monotonic()
    served, times = [], []
    for k in range(40):  # bounded: the back-off is 2 s, loads on loopback take well under a second
        result, elapsed = _load(reg, tmp_path / f"back{k}")
        served.append(result.store_url)
        times.append(elapsed)
        if result.store_url == primary.url:
            break
        time.sleep(0.1)
    switched_after = time.monotonic() - back_at
    print(f"\nswitch back: primary answering again; served by the primary after {switched_after:.3f} s "
          f"({len(served)} loads; back-off {backoff_s} s); load times {[round(t, 3) for t in times]}, "
          f"healthy {base:.3f} s")
    assert served[-1] == primary.url
    assert switched_after < backoff_s + SWITCH_BUDGET_S
    assert not reg.health.is_down(0)
    result, _elapsed = _load(reg, tmp_path / "after")
    assert result.store_url == primary.url and result.failures == ()
