"""Crash consistency of the registry (issue 14 item 8): a publisher and a download SIGKILLed at seeded points; the
store and the destination hold only complete, verified checkpoints (the checks: tests/live_crash/trials.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from live.agent_tiers import STAGING_PREFIX, Tier, TierConfig
from live.manifest import build_manifest, verify
from live.pacing import PACE_FILE
from live.registry import Registry, RegistryError
from live.registry_admin import current_revision_or_none
from live.registry_versions import locate, revision_of
from live.stores import TMP_PREFIX, open_store
from tests.live_agent.conftest import MODEL, Cloud
from tests.live_crash.trials import (
    REPO,
    SCRIPT,
    Summary,
    done_seconds,
    fetch_verified,
    kill_points,
    n_trials,
    rng_for,
    run_child,
    show_summary,
)
from tests.live_registry.conftest import S3_CREDS
from tests.live_serve.serving import env


# --- 1. publisher killed ---------------------------------------------------------------------------------------
@dataclass
class StoreUnderTest:
    """A fresh store (file:// dir or moto bucket) for one trial."""

    url: str
    options: dict
    root: Path | None  # a file:// store's dir (to look for temp files left on disk)

    def registry(self) -> Registry:
        """A fresh Registry (no manifests cached from this process's own publishes)."""
        return Registry([self.url], store_options={self.url: self.options})

    def temp_leftovers(self) -> list[str]:
        """Temp objects of interrupted atomic writes (`.tierlab-tmp-*`): hidden from listings, collected by gc."""
        if self.root is not None:
            return sorted(str(p.relative_to(self.root)) for p in self.root.rglob(f"{TMP_PREFIX}*"))
        fs = open_store(self.url, self.options).fs
        bucket = self.url.removeprefix("s3://").split("/", 1)[0]
        return sorted(k for k in fs.find(bucket) if TMP_PREFIX in k)


def _new_store(kind: str, tmp: Path, request: pytest.FixtureRequest) -> StoreUnderTest:
    if kind == "file":
        root = tmp / f"store-{uuid.uuid4().hex[:8]}"
        return StoreUnderTest(f"file://{root}", {}, root)
    endpoint = request.getfixturevalue("moto_endpoint")
    options = {**S3_CREDS, "endpoint_url": endpoint}
    bucket = f"crash-{uuid.uuid4().hex[:12]}"
    open_store(f"s3://{bucket}", options).fs.mkdir(bucket)
    return StoreUnderTest(f"s3://{bucket}/models", options, None)


def check_registry(store: StoreUnderTest, name: str, known: set[str], tmp: Path) -> dict[str, str]:
    """Assert the store is consistent; the state of each revision ("current", "complete", "partial")."""
    registry = store.registry()
    raw = registry.store_list[0]
    infos = registry.versions(name)
    states: dict[str, str] = {}
    for v in infos:
        if v.complete:
            assert v.revision in known, f"unknown revision {v.revision} listed complete"
            prefix, manifest = locate(raw, name, v.revision)
            held = raw.list_detail(prefix)
            missing = [e.name for e in manifest.files
                       if (info := held.get(f"{prefix}/{e.name}")) is None or info.size_bytes != e.size_bytes]
            assert not missing, f"manifest of {name}@{v.revision} names files the store lacks: {missing}"
            states[v.revision] = "current" if v.current else "complete"
        else:
            assert not v.current, f"incomplete revision {v.revision!r} listed as current"
            assert v.revision in known | {""}
            states[v.revision or "(in place)"] = "partial"
    alias = registry.alias(name)
    if alias is not None:
        assert states.get(alias.revision) == "current", f"alias names {alias.revision}, listed {states}"
    current = current_revision_or_none(raw, name)
    if current is not None:
        assert states.get(current) == "current"
        manifest = fetch_verified(registry, name, tmp / f"cur-{uuid.uuid4().hex[:8]}")
        assert revision_of(manifest) == current
    else:
        with pytest.raises(RegistryError):
            registry.manifest(name)
    return states


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_publisher_killed(kind: str, tmp_path: Path, tiny_ckpt: Path, tiny_ckpt_v2: Path,
                          request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGKILL `publish_version` at random points: never a manifest naming missing files; an incomplete revision
    is listed incomplete, not current, not fetchable, and collected by gc; a re-publish succeeds."""
    rng = rng_for(f"publish-{kind}")
    pace_s = 0.08 if kind == "file" else 0.04  # moto's puts are slow already
    rev1 = revision_of(build_manifest(tiny_ckpt, name=MODEL))
    rev2 = revision_of(build_manifest(tiny_ckpt_v2, name=MODEL))
    known = {rev1, rev2}

    def publish_argv(store: StoreUnderTest) -> list[str]:
        return ["publish", "--store", store.url, "--options", json.dumps(store.options), "--name", MODEL,
                "--dir", str(tiny_ckpt_v2), "--pace-s", str(pace_s)]

    # measure: a second-revision publish (the longer kind: it also moves the alias), not killed
    probe = _new_store(kind, tmp_path, request)
    probe.registry().publish_version(MODEL, tiny_ckpt)
    _killed, out = run_child(publish_argv(probe), None)
    summary = Summary(f"publisher killed ({kind}://)", done_seconds(out))

    trials = n_trials(6)
    for trial, fraction in zip(range(trials), kill_points(rng, trials), strict=True):
        store = _new_store(kind, tmp_path, request)
        first = trial % 3 == 2  # a third of the trials kill the model's first publish (in place, no alias)
        if not first:
            store.registry().publish_version(MODEL, tiny_ckpt)
        killed, _out = run_child(publish_argv(store), fraction * summary.measured_s)
        trial_dir = tmp_path / f"pub-{trial}"
        states = check_registry(store, MODEL, known, trial_dir)
        new_state = states.get(rev2, "partial" if "(in place)" in states else "absent")
        if not first:
            assert states.get(rev1) in ("current", "complete"), f"the earlier revision was damaged: {states}"
            assert {s for r, s in states.items() if s == "current"} == {"current"}
        if new_state in ("current", "complete"):
            fetch_verified(store.registry(), f"{MODEL}@{rev2}", trial_dir / "new")
        else:
            with pytest.raises(RegistryError):
                store.registry().fetch(f"{MODEL}@{rev2}", trial_dir / "new")
            assert not (trial_dir / "new").exists()
        temps = store.temp_leftovers()
        # half the trials collect first (grace 0), half re-publish straight over what the kill left
        if trial % 2 == 0:
            current_before = current_revision_or_none(store.registry().store_list[0], MODEL)
            store.registry().gc(MODEL, grace_s=0.0)
            after = store.registry().versions(MODEL)
            assert all(v.complete for v in after), f"gc left an incomplete revision: {after}"
            assert [v.revision for v in after if v.current] == ([current_before] if current_before else [])
            check_registry(store, MODEL, known, trial_dir / "after-gc")
        store.registry().publish_version(MODEL, tiny_ckpt_v2)
        states = check_registry(store, MODEL, known, trial_dir / "republished")
        assert states.get(rev2) == "current", states
        # temp files of an atomic write the kill interrupted: hidden from every listing (never a visible partial
        # object); gc collects them once past its grace, and a re-publish never adds its own
        temps_end = store.temp_leftovers()
        assert set(temps_end) <= set(temps), f"the re-publish left temp files of its own: {temps_end}"
        if trial % 2 == 0:
            assert temps_end == [], f"gc (grace 0) left temp files of the killed publish: {temps_end}"
        left = [f"store-temp:{len(temps)}"] if temps else []
        left += [f"store-temp-after-gc+republish:{len(temps_end)}"] if temps_end else []
        summary.add(fraction, f"{'first' if first else 'second'}:{new_state if killed else 'done'}", ",".join(left))
    show_summary(capsys, summary)


@pytest.mark.parametrize("first", [
    pytest.param(True, id="in-place"),
    pytest.param(False, id="revision-dir"),
])
def test_publisher_killed_mid_write_leaves_no_temp_after_gc(first: bool, tmp_path: Path, tiny_ckpt: Path,
                                                            tiny_ckpt_v2: Path) -> None:
    """Kill a publish between a temp file's write and its rename (deterministic: as soon as the temp file is on
    disk); gc (grace 0) and a re-publish then leave no temp file of it in a file:// store."""
    root = tmp_path / "store"
    store = StoreUnderTest(f"file://{root}", {}, root)
    if not first:
        store.registry().publish_version(MODEL, tiny_ckpt)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "publish", "--store", store.url, "--name", MODEL,
                             "--dir", str(tiny_ckpt_v2), "--pace-s", "1.0"], env=env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not store.temp_leftovers():
            assert proc.poll() is None and time.monotonic() < deadline, "no temp file seen before the publish ended"
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    temps = store.temp_leftovers()
    assert temps
    check_registry(store, MODEL, {revision_of(build_manifest(p, name=MODEL)) for p in (tiny_ckpt, tiny_ckpt_v2)},
                   tmp_path / "check")
    store.registry().gc(MODEL, grace_s=0.0)
    store.registry().publish_version(MODEL, tiny_ckpt_v2)
    assert store.temp_leftovers() == [], f"temp files of the killed publish are left in the store: {temps}"


# --- 2. download killed ----------------------------------------------------------------------------------------
def test_download_killed(cloud: Cloud, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGKILL `Registry.fetch` at random points: dest absent or complete and verified; staging leftovers are
    `.tierlab-fetch-` dirs beside it (not a model to any tier, swept by an agent's tier) and a new fetch works."""
    rng = rng_for("download")
    manifest = cloud.registry.manifest(MODEL)
    stream_Bps = 3e6

    def fetch_argv(dest: Path) -> list[str]:
        return ["fetch", "--store", cloud.url, "--name", MODEL, "--dest", str(dest), "--stream-Bps", str(stream_Bps),
                "--streams", "2"]

    _killed, out = run_child(fetch_argv(tmp_path / "probe" / MODEL), None)
    summary = Summary("download killed (file://, paced)", done_seconds(out))
    trials = n_trials(6)
    for trial, fraction in zip(range(trials), kill_points(rng, trials), strict=True):
        parent = tmp_path / f"dl-{trial}"
        dest = parent / MODEL
        killed, _out = run_child(fetch_argv(dest), fraction * summary.measured_s)
        if dest.exists():
            assert verify(dest, manifest) == [], "a killed fetch left a dest that does not match the manifest"
            outcome = "complete"
        else:
            outcome = "absent"
        leftovers = sorted(p.name for p in parent.iterdir() if p.name != MODEL) if parent.exists() else []
        assert all(n.startswith(".tierlab-fetch-") for n in leftovers), leftovers
        assert all(n.startswith(STAGING_PREFIX) for n in leftovers)  # never listed as a model by a tier
        got = Registry([cloud.url]).fetch(MODEL, dest, streams=4, manifest=manifest)
        assert got.cached == (outcome == "complete")
        assert verify(dest, manifest) == []
        # the leftovers are not cleaned by a fetch; a tier over that dir sweeps them at start, keeping the model
        still = sorted(p.name for p in parent.iterdir() if p.name != MODEL)
        assert still == leftovers
        tier = Tier(TierConfig("scratch", parent, 1 << 30))
        assert tier.swept == leftovers
        assert sorted(p.name for p in parent.iterdir() if p.name != PACE_FILE) == [MODEL]
        summary.add(fraction, outcome if killed else "done", f"fetch-staging:{len(leftovers)}" if leftovers else "")
    show_summary(capsys, summary)
