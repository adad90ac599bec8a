"""A sharded checkpoint in the agent's tiers: a fetch from the cloud and a copy between tiers move every shard
and the index, through a staging dir renamed into place (a reader never sees part of a checkpoint), and a
shard missing or corrupt at the source places nothing."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from live.agent import AgentConfig, AgentError, NodeAgent
from live.agent_tiers import REVISION_FILE, TierConfig
from live.checkpoint import shard_checkpoint
from live.manifest import build_manifest
from live.registry import Registry
from live.shards import INDEX_FILE

from .conftest import TOKEN
from .test_agent_host import _nothing_left

MODEL = "tiny-sharded"


@pytest.fixture(scope="module")
def sharded_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / MODEL
    shard_checkpoint(tiny_ckpt, out, 3 << 20)
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != REVISION_FILE}


def _agent(tmp_path: Path, sharded_ckpt: Path) -> tuple[NodeAgent, Path]:
    root = tmp_path / "cloud"
    Registry([root.as_uri()]).publish(MODEL, sharded_ckpt)
    # nvme is written at 4 MB/s: a ~10 MB copy takes ~2.5 s, long enough to look inside while it runs
    tiers = {name: TierConfig(name, tmp_path / name, 1 << 30, *bw)
             for name, bw in (("dram", (None, None)), ("nvme", (None, 4e6)), ("sata", (None, None)))}
    agent = NodeAgent(AgentConfig(token=TOKEN, stores=[root.as_uri()], tiers=tiers, host_dir=tmp_path / "host"))
    return agent, root


def test_fetch_and_tier_copy_move_every_shard_atomically(tmp_path: Path, sharded_ckpt: Path) -> None:
    agent, _root = _agent(tmp_path, sharded_ckpt)
    try:
        manifest = build_manifest(sharded_ckpt, MODEL)
        fetched = agent.copy(MODEL, "sata")
        assert (fetched["from_tier"], fetched["kind"]) == ("cloud", "fetch")
        assert _files(agent.tiers["sata"].model_dir(MODEL)) == _files(sharded_ckpt)

        # while the paced copy sata -> nvme runs, nvme shows no model dir, or the whole checkpoint
        seen: list[bool] = []  # per look at the model dir: was it the whole checkpoint
        staged: list[int] = []  # per look while the copy ran: files in its staging dir
        done = threading.Event()
        nvme = agent.tiers["nvme"]

        def watch() -> None:
            while not done.is_set():
                if nvme.model_dir(MODEL).is_dir():
                    seen.append(_files(nvme.model_dir(MODEL)) == _files(sharded_ckpt))
                staged.extend(len(list(d.iterdir())) for d in nvme.path.glob(".tierlab-copy-*"))
                done.wait(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            copied = agent.copy(MODEL, "nvme")
        finally:
            done.set()
            watcher.join()
        assert (copied["from_tier"], copied["kind"], copied["bytes"]) == ("sata", "copy", manifest.total_bytes)
        seen.append(_files(nvme.model_dir(MODEL)) == _files(sharded_ckpt))
        assert staged, "the watcher never saw the copy in flight"
        assert all(seen), "a partial checkpoint was visible in the tier"
        assert _files(agent.tiers["nvme"].model_dir(MODEL)) == _files(sharded_ckpt)
        assert len([n for n in _files(sharded_ckpt) if n.endswith(".safetensors")]) == 4
    finally:
        agent.shutdown()


def test_a_shard_missing_or_corrupt_at_the_source_places_nothing(tmp_path: Path, sharded_ckpt: Path) -> None:
    agent, root = _agent(tmp_path, sharded_ckpt)
    try:
        shards = sorted(set(json.loads((sharded_ckpt / INDEX_FILE).read_text())["weight_map"].values()))
        (root / MODEL / shards[2]).unlink()  # the cloud lost a shard
        with pytest.raises(AgentError) as err:
            agent.copy(MODEL, "sata")
        assert err.value.code == "fetch_failed" and shards[2] in err.value.message
        _nothing_left(agent)

        # a tier copy whose source shard went bad on disk: checked against the manifest, not placed
        Registry([root.as_uri()]).publish(MODEL, sharded_ckpt)
        agent.copy(MODEL, "sata")
        victim = agent.tiers["sata"].model_dir(MODEL) / shards[1]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        with pytest.raises(AgentError) as err:
            agent.copy(MODEL, "dram")
        assert err.value.code == "checksum_mismatch" and f"{shards[1]}: sha256" in err.value.message
        assert agent.tiers["dram"].models() == {} and agent.tiers["dram"].used_bytes() == 0
    finally:
        agent.shutdown()
