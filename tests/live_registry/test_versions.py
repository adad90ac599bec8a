"""Model versions in the registry, against real moto S3 and azurite servers on loopback: content-addressed
revisions under keys of their own, the alias moved by publish and back by rollback (with history), a fetch of
the old revision in flight while a new one is published, garbage collection (never the aliased or kept
revisions), checkpoints published before versions existed, `name@revision` through the agent, and the CLI."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from live.checkpoint import generate_checkpoint
from live.manifest import MANIFEST_FILE, WEIGHTS_FILE, build_manifest
from live.pacing import CloudPace
from live.registry import Registry, RegistryError, check_model_name, revision_of
from live.registry_cli import main as registry_cli
from live.registry_versions import ALIAS_FILE, REVISIONS_DIR, parse_ref
from live.stores import open_store

from .test_registry import _tree

NAME = "llama-v"


@pytest.fixture(scope="module")
def second_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with other weights (seed 1): same file names, other bytes."""
    return generate_checkpoint(tmp_path_factory.mktemp("ckpt2") / "tiny", "tiny", 1).path


@pytest.fixture(scope="module")
def third_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with one more file: another revision that shares the weights' bytes."""
    out = tmp_path_factory.mktemp("ckpt3") / "tiny"
    shutil.copytree(tiny_ckpt, out)
    (out / "README.md").write_text("v3\n")
    return out


def _store(request: pytest.FixtureRequest, kind: str) -> tuple[str, dict]:
    return request.getfixturevalue("s3_url" if kind == "s3" else "az_url")


def test_names_with_revisions_are_validated() -> None:
    rev = "0123456789abcdef"
    assert check_model_name(f"m@{rev}") == f"m@{rev}" and parse_ref(f"m@{rev}") == ("m", rev)
    assert parse_ref("m") == ("m", None)
    for bad in ("m@", "@" + rev, f"m@{rev}@{rev}", "m@0123456789ABCDEF", "m@0123", "m@../x", f"../m@{rev}",
                f"m@int8@{rev}@{rev}", "m@int8@nope", "m@Int8", f"m@{rev}@int8"):
        with pytest.raises(ValueError, match=r"unsafe model name|is not a revision id|is neither a revision id"):
            check_model_name(bad)
    # a weight variant (`core.variants.variant_name`) is a model of its own, pinned like any other
    assert check_model_name("m@int8") == "m@int8" and parse_ref("m@int8") == ("m@int8", None)
    assert parse_ref(f"m@fp8@{rev}") == ("m@fp8", rev)
    reg = Registry(["file:///nonexistent-store"])
    with pytest.raises(ValueError, match="publish takes a plain model name"):
        reg.publish(f"m@{rev}", ".")


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_publish_pins_alias_moves_rollback_and_gc(kind: str, tmp_path: Path, tiny_ckpt: Path, second_ckpt: Path,
                                                  third_ckpt: Path, request: pytest.FixtureRequest) -> None:
    url, options = _store(request, kind)
    reg = Registry([url], {url: options}, chunk_bytes=1 << 20)
    store = open_store(url, options)
    v1 = reg.publish_version(NAME, tiny_ckpt, by="alice")
    assert v1.revision == revision_of(build_manifest(tiny_ckpt, name=NAME))  # content-addressed
    assert not store.exists(f"{NAME}/{ALIAS_FILE}")  # a first publish is in place: no alias needed yet
    assert reg.publish_version(NAME, tiny_ckpt).revision == v1.revision  # same bytes, same revision

    v2 = reg.publish_version(NAME, second_ckpt, by="bob")
    v3 = reg.publish_version(NAME, third_ckpt, by="carol")
    assert len({v1.revision, v2.revision, v3.revision}) == 3
    keys = set(store.list(NAME))
    for v in (v2, v3):  # every later revision under keys of its own, manifest included
        prefix = f"{NAME}/{REVISIONS_DIR}/{v.revision}"
        assert {f"{prefix}/{f.name}" for f in v.manifest.files} | {f"{prefix}/{MANIFEST_FILE}"} <= keys
    assert (store.get_bytes(f"{NAME}/{WEIGHTS_FILE}") == (tiny_ckpt / WEIGHTS_FILE).read_bytes())  # v1 untouched

    # a fresh registry (another process): plain name -> the alias (v3); pinned names -> their revision
    other = Registry([url], {url: options})
    assert other.version(NAME).revision == v3.revision and other.manifest(NAME) == v3.manifest
    for v, ckpt in ((v1, tiny_ckpt), (v2, second_ckpt), (v3, third_ckpt)):
        got = other.fetch(v.ref, tmp_path / v.revision, streams=4)
        assert got.revision == v.revision and _tree(got.path) == _tree(ckpt)
    alias = other.alias(NAME)
    assert alias is not None and alias.revision == v3.revision
    assert [(m.previous, m.revision, m.op, m.by) for m in alias.history] == [
        (v1.revision, v2.revision, "publish", "bob"), (v2.revision, v3.revision, "publish", "carol")]
    listed = {v.revision: v for v in other.versions(NAME)}
    assert set(listed) == {v1.revision, v2.revision, v3.revision}
    assert listed[v1.revision].in_place and listed[v3.revision].current and not listed[v1.revision].current
    assert all(v.complete and v.size_bytes > 0 and v.modified_unix > 0 for v in listed.values())

    # rollback to v1 (the in-place revision), then to v2; a revision the store does not hold is refused
    other.rollback(NAME, v1.revision, by="ops")
    assert _tree(other.fetch(NAME, tmp_path / "plain-after-rollback").path) == _tree(tiny_ckpt)
    missing = rf"(?s)alias not moved to revision 00000000deadbeef.*{url}.*not in this store"
    with pytest.raises(RegistryError, match=missing):
        other.rollback(NAME, "00000000deadbeef")
    other.rollback(NAME, v2.revision)
    alias = other.alias(NAME)
    assert alias is not None and alias.revision == v2.revision
    assert [(m.previous, m.revision, m.op) for m in alias.history][-2:] == [
        (v3.revision, v1.revision, "rollback"), (v1.revision, v2.revision, "rollback")]

    # gc: the grace period protects everything young; dry run deletes nothing; kept and aliased revisions stay
    assert other.gc(NAME, grace_s=3600) == []
    would = other.gc(NAME, grace_s=0, dry_run=True)
    assert {(i.revision, i.deleted) for i in would} == {(v1.revision, False), (v3.revision, False)}
    assert set(store.list(NAME)) == keys | {f"{NAME}/{ALIAS_FILE}"}
    gone = other.gc(NAME, grace_s=0, keep=[v3.ref])
    assert [(i.revision, i.prefix, i.deleted) for i in gone] == [(v1.revision, NAME, True)]
    left = set(store.list(NAME))
    assert not any(k.startswith(f"{NAME}/{REVISIONS_DIR}/{v2.revision}/") for k in keys - left)  # aliased: kept
    assert not {k for k in left if not k.startswith(f"{NAME}/.")}  # the in-place revision is gone, whole
    with pytest.raises(RegistryError, match=rf"{v1.revision} of model '{NAME}' is not in this store"):
        other.fetch(v1.ref, tmp_path / "gone")
    assert not (tmp_path / "gone").exists()
    assert _tree(other.fetch(v3.ref, tmp_path / "kept").path) == _tree(third_ckpt)
    with pytest.raises(RegistryError, match="not in this store"):
        other.rollback(NAME, v1.revision)  # never point the alias at a collected revision
    assert [i.revision for i in other.gc(grace_s=0)] == [v3.revision]  # every model; v3 no longer kept
    assert other.version(NAME).revision == v2.revision
    assert {v.revision for v in other.versions(NAME)} == {v2.revision}


def test_a_fetch_of_the_old_revision_in_flight_is_undisturbed_by_publish_and_gc(
        tmp_path: Path, tiny_ckpt: Path, second_ckpt: Path, s3_url: tuple[str, dict]) -> None:
    url, options = s3_url
    reg = Registry([url], {url: options}, chunk_bytes=1 << 20)
    v1 = reg.publish_version(NAME, tiny_ckpt)
    agent_side = Registry([url], {url: options}, chunk_bytes=1 << 20)
    old = agent_side.manifest(NAME)  # what an agent does: resolve the manifest, then fetch it (paced)
    # ~10 MB over 4 streams at 1 MB/s each: the fetch takes ~2.5 s, the publish much less
    pace = CloudPace(stream_Bps=1 << 20)
    result: dict = {}

    def fetch() -> None:
        try:
            result["ok"] = agent_side.fetch(NAME, tmp_path / "old", streams=4, manifest=old, pace=pace)
        except Exception as e:  # reported below
            result["error"] = e

    t = threading.Thread(target=fetch)
    t.start()
    time.sleep(0.3)
    v2 = reg.publish_version(NAME, second_ckpt)  # same file names, other bytes: the alias moves
    # gc meanwhile: the revision the fetch reads is kept by the caller (it is being loaded)
    assert all(i.revision != v1.revision for i in reg.gc(NAME, grace_s=0, keep=[v1.ref]))
    assert t.is_alive(), "the paced fetch should still be running while the new revision is published"
    t.join(60)
    assert "error" not in result, result.get("error")
    assert result["ok"].revision == v1.revision and _tree(tmp_path / "old") == _tree(tiny_ckpt)
    assert Registry([url], {url: options}).version(NAME).revision == v2.revision


def test_a_checkpoint_published_before_versions_is_a_legacy_revision(tmp_path: Path, tiny_ckpt: Path,
                                                                     second_ckpt: Path,
                                                                     az_url: tuple[str, dict]) -> None:
    url, options = az_url
    store = open_store(url, options)
    legacy = build_manifest(tiny_ckpt, name=NAME)
    for f in legacy.files:  # the pre-versions publish: `<name>/<file>`, manifest last, no alias
        store.put_file(tiny_ckpt / f.name, f"{NAME}/{f.name}")
    store.put_bytes(f"{NAME}/{MANIFEST_FILE}", legacy.to_json().encode())
    legacy_rev = revision_of(legacy)

    reg = Registry([url], {url: options})
    assert reg.version(NAME).revision == legacy_rev
    assert _tree(reg.fetch(NAME, tmp_path / "a").path) == _tree(tiny_ckpt)
    assert _tree(reg.fetch(f"{NAME}@{legacy_rev}", tmp_path / "b").path) == _tree(tiny_ckpt)
    [info] = reg.versions(NAME)
    assert (info.revision, info.in_place, info.current) == (legacy_rev, True, True)
    assert reg.gc(NAME, grace_s=0) == []  # with no alias, the legacy revision is the current one

    v2 = reg.publish_version(NAME, second_ckpt)
    alias = reg.alias(NAME)
    assert alias is not None and [(m.previous, m.revision) for m in alias.history] == [(legacy_rev, v2.revision)]
    reg.rollback(NAME, legacy_rev)
    assert _tree(reg.fetch(NAME, tmp_path / "c").path) == _tree(tiny_ckpt)


def test_an_altered_revision_manifest_is_refused_and_the_next_store_serves(tmp_path: Path, tiny_ckpt: Path,
                                                                           second_ckpt: Path,
                                                                           s3_url: tuple[str, dict]) -> None:
    primary = (tmp_path / "primary").as_uri()
    reg = Registry([primary, s3_url[0]], {s3_url[0]: s3_url[1]})
    reg.publish(NAME, tiny_ckpt)
    v2 = reg.publish_version(NAME, second_ckpt)
    key = f"{NAME}/{REVISIONS_DIR}/{v2.revision}/{MANIFEST_FILE}"
    store = open_store(primary)
    doc = json.loads(store.get_bytes(key))
    doc["files"][0]["size_bytes"] += 1
    store.put_bytes(key, json.dumps(doc).encode())
    fresh = Registry([primary, s3_url[0]], {s3_url[0]: s3_url[1]})
    v = fresh.version(v2.ref)
    assert v.store_url == s3_url[0] and v.manifest == v2.manifest
    got = fresh.fetch(v2.ref, tmp_path / "d")
    assert got.store_url == s3_url[0] and "altered after publish" in got.failures[0].problem
    assert _tree(got.path) == _tree(second_ckpt)


def test_the_agent_keeps_one_tier_dir_per_pinned_revision(tmp_path: Path, tiny_ckpt: Path,
                                                          second_ckpt: Path) -> None:
    from live.agent_config import AgentConfig
    from live.agent_node import AgentError, NodeAgent
    from live.agent_tiers import TierConfig

    url = (tmp_path / "cloud").as_uri()
    reg = Registry([url])
    v1, v2 = reg.publish_version(NAME, tiny_ckpt), reg.publish_version(NAME, second_ckpt)
    agent = NodeAgent(AgentConfig(token="t", stores=[url], host_dir=tmp_path / "host",
                                  tiers={"sata": TierConfig("sata", tmp_path / "sata", 1 << 30)}))
    try:
        for v in (v1, v2):
            assert agent.copy(v.ref, "sata")["kind"] == "fetch"
        assert _tree(tmp_path / "sata" / v1.ref) == _tree(tiny_ckpt)
        assert _tree(tmp_path / "sata" / v2.ref) == _tree(second_ckpt)
        with pytest.raises(AgentError, match="not in the registry") as err:
            agent.copy(f"{NAME}@00000000deadbeef", "sata")
        assert err.value.status == 404
        with pytest.raises(AgentError, match="is neither a revision id") as err:
            agent.copy(f"{NAME}@No-pe", "sata")
        assert err.value.status == 400
        with pytest.raises(AgentError, match="not in the registry") as err:  # a weight variant never published
            agent.copy(f"{NAME}@int8", "sata")
        assert err.value.status == 404
    finally:
        agent.shutdown()


def test_cli_publish_versions_rollback_gc(tmp_path: Path, tiny_ckpt: Path, second_ckpt: Path,
                                          s3_url: tuple[str, dict], capsys: pytest.CaptureFixture[str]) -> None:
    url, options = s3_url
    base = ["--store", url, "--store-options", json.dumps({url: options})]

    def run(*args: str) -> dict:
        assert registry_cli([*base, "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    first = run("publish", NAME, str(tiny_ckpt))["published"]
    second = run("publish", NAME, str(second_ckpt))["published"]
    listed = run("versions", NAME)
    assert listed["alias"] == second.split("@")[1]
    assert {v["ref"] for v in listed["versions"]} == {first, second}
    assert [h["previous"] for h in listed["history"]] == [first.split("@")[1]]
    assert run("rollback", NAME, first.split("@")[1])["alias"] == first.split("@")[1]
    dry = run("gc", "--grace-s", "0", "--dry-run")
    assert [(f"{i['model']}@{i['revision']}", i["deleted"]) for i in dry["collected"]] == [(second, False)]
    assert run("gc", NAME, "--grace-s", "0", "--keep", second)["collected"] == []
    assert registry_cli([*base, "versions", NAME]) == 0  # the text rendering
    text = capsys.readouterr().out
    assert f"alias -> {first.split('@')[1]}" in text and "current" in text and "rollback" in text
    assert registry_cli([*base, "rollback", NAME, "00000000deadbeef"]) == 1
    assert "not in this store" in capsys.readouterr().err


def test_the_agent_follows_the_alias_for_plain_names(tmp_path: Path, tiny_ckpt: Path, second_ckpt: Path) -> None:
    """A tier copy of a plain name is of the revision the alias named when it was placed: after a publish or a
    rollback moves the alias, the next copy or load replaces it, and no tier copy is made from it."""
    from live.agent_config import AgentConfig
    from live.agent_node import NodeAgent
    from live.agent_tiers import REVISION_FILE, TierConfig

    url = (tmp_path / "cloud").as_uri()
    reg = Registry([url])
    v1 = reg.publish_version(NAME, tiny_ckpt)
    agent = NodeAgent(AgentConfig(token="t", stores=[url], host_dir=tmp_path / "host",
                                  tiers={"nvme": TierConfig("nvme", tmp_path / "nvme", 1 << 30),
                                         "sata": TierConfig("sata", tmp_path / "sata", 1 << 30)}))
    sata = tmp_path / "sata" / NAME
    try:
        assert agent.copy(NAME, "sata")["kind"] == "fetch" and _tree(sata) == _tree(tiny_ckpt)
        assert (sata / REVISION_FILE).read_text().strip() == v1.revision
        assert agent.copy(NAME, "sata")["kind"] == "cached"

        v2 = reg.publish_version(NAME, second_ckpt)  # the alias moves to v2: sata's copy is stale
        assert agent.fastest_holder(NAME, revision=v2.revision) is None
        # nvme gets v2 from the cloud, not sata's v1 (which a copy would have taken: it is local)
        assert agent.copy(NAME, "nvme")["from_tier"] == "cloud"
        assert _tree(tmp_path / "nvme" / NAME) == _tree(second_ckpt)
        moved = agent.copy(NAME, "sata")  # replaced, from the fastest holder of v2
        assert moved["kind"] == "copy" and moved["from_tier"] == "nvme" and _tree(sata) == _tree(second_ckpt)
        assert agent.tiers["sata"].revision(NAME) == v2.revision

        reg.rollback(NAME, v1.revision)  # back to v1: both copies are stale now
        assert agent.copy(NAME, "sata")["from_tier"] == "cloud" and _tree(sata) == _tree(tiny_ckpt)
        assert agent.tiers["sata"].revision(NAME) == v1.revision
        # sizes on disk are the checkpoint's bytes (the mark is not content)
        assert agent.tiers["sata"].models() == {NAME: build_manifest(tiny_ckpt, name=NAME).total_bytes}
    finally:
        agent.shutdown()


def test_gc_collects_stale_temp_objects_only_past_the_grace(tmp_path: Path, tiny_ckpt: Path) -> None:
    """A writer killed between write and rename leaves a `.tierlab-tmp-*` object: hidden from listings, and
    collected by gc once older than the grace (a younger one may be a publish in flight), never the live keys."""
    from live.registry_admin import gc
    from live.stores import TMP_PREFIX

    root = tmp_path / "store"
    reg = Registry([f"file://{root}"])
    reg.publish_version(NAME, tiny_ckpt)
    rev = reg.versions(NAME)[0].revision
    leftovers = [root / NAME / f"{TMP_PREFIX}dead-{WEIGHTS_FILE}",
                 root / NAME / REVISIONS_DIR / "0123456789abcdef" / f"{TMP_PREFIX}dead-{MANIFEST_FILE}"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    store = open_store(f"file://{root}")
    assert not any(TMP_PREFIX in k for k in store.list(NAME))
    assert gc([store], NAME, (), grace_s=3600.0, dry_run=False) == []  # just written: maybe in flight
    assert all(p.exists() for p in leftovers)
    later = time.time() + 7200
    dry = gc([store], NAME, (), grace_s=3600.0, dry_run=True, now_unix=later)
    assert sorted(i.prefix for i in dry) == sorted(str(p.relative_to(root)) for p in leftovers)
    assert {(i.reason, i.deleted, i.size_bytes) for i in dry} == {("stale temp object", False, len(b"partial"))}
    assert all(p.exists() for p in leftovers)
    gc([store], NAME, (), grace_s=3600.0, dry_run=False, now_unix=later)
    assert not any(p.exists() for p in leftovers)
    assert [v.revision for v in reg.versions(NAME) if v.current] == [rev]
    fetch = reg.fetch(NAME, tmp_path / "out")
    assert (fetch.path / WEIGHTS_FILE).read_bytes() == (tiny_ckpt / WEIGHTS_FILE).read_bytes()
