"""Weight variants live: a tiny checkpoint and its int8 copy (`live.quantize`) served by two real CPU engine
processes as `tiny` and `tiny@int8`, behind a real gateway whose bundle carries `VariantByClass`. A tenant whose
class allows int8 at its cost target is served by `tiny@int8` (answer, record `model` and `variant` say so); a
premium tenant keeps bf16; without a variant policy nothing is rewritten and the variant comes from the name."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from tokenizers import Tokenizer

from core.policies.autoscaling import KeepAlive
from core.policies.base import PolicyBundle
from core.policies.caching import NoCaching
from core.policies.placement import TierAware
from core.policies.variants import VariantByClass
from core.records import REQUEST_SCHEMA
from core.variants import apply_variants
from live.checkpoint import generate_checkpoint
from live.engines.base import CpuEngineProcess, free_port
from live.engines.cpu_engine import prepended_bos
from live.engines.llama import LlamaModel
from live.gateway import AgentRef, Gateway, GatewayConfig, Tenant
from live.gateway_records import RequestInfo, request_row, served_variant
from live.llama_config import LlamaConfig, model_spec
from live.quantize import quantize_checkpoint
from tests.live_gateway.conftest import ADMIN_TOKEN, serving

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"sk-cheap": Tenant("cheap", ("tiny",)), "sk-premium": Tenant("premium", ("tiny",))}
CLASSES = [{"name": "premium", "tenants": ["premium"], "allowed": ["bf16"]},
           {"name": "default", "allowed": ["bf16", "int8"], "cost_target": 0.9}]
PROMPT = "hello tierlab"


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[CpuEngineProcess, Path]]]:
    tmp = tmp_path_factory.mktemp("variants")
    bf16 = generate_checkpoint(tmp / "tiny", "tiny", 0).path
    int8 = quantize_checkpoint(bf16, tmp / "tiny-int8", "int8").path
    procs = {name: (CpuEngineProcess(path, free_port(), model_name=name, threads=1), path)
             for name, path in (("tiny", bf16), ("tiny@int8", int8))}
    try:
        for proc, _ in procs.values():
            proc.start()
        for proc, _ in procs.values():
            proc.wait_ready(timeout_s=90)
        yield procs
    finally:
        for proc, _ in procs.values():
            proc.close()


def _gateway(engines: dict[str, tuple[CpuEngineProcess, Path]], variants: VariantByClass | None) -> Gateway:
    """A gateway over the two engines, adopted on one node without an agent; the catalog holds `tiny` and its
    int8 variant, sized by the simulator's weight-format table (conf/variants/cited.yaml)."""
    table = yaml.safe_load((ROOT / "conf" / "variants" / "cited.yaml").read_text()) | {"extra": ["int8"]}
    base = model_spec("tiny", LlamaConfig.from_dir(engines["tiny"][1]), 4)
    specs = {m.name: m for m in apply_variants([base], table)}
    assert set(specs) == {"tiny", "tiny@int8"}
    bundle = PolicyBundle(TierAware(), NoCaching(), KeepAlive(keep_alive_s=300), variants=variants)
    return Gateway(GatewayConfig(agents=[AgentRef("s0", "", "")], tenants=dict(KEYS), models=specs,
                                 admin_token=ADMIN_TOKEN, queue_timeout_s=5.0, tick=False), bundle)


def _adopt(gw: Gateway, engines: dict[str, tuple[CpuEngineProcess, Path]]) -> None:
    for name, (proc, _) in engines.items():
        gw.adopt_instance(name, "s0", proc.url)


def _ask(url: str, key: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0})


def _records(gw: Gateway, n: int) -> pd.DataFrame:
    deadline = time.monotonic() + 10
    while len(gw.records()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return gw.records()


def _greedy(path: Path) -> str:
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    model = LlamaModel.from_dir(path)
    bos = prepended_bos(path, model.config)  # the engine's own rule for a completion prompt
    ids = [*([] if bos is None else [bos]), *tokenizer.encode(PROMPT).ids]
    return str(tokenizer.decode(list(model.generate(ids, max_tokens=4)), skip_special_tokens=True))


def test_the_variant_policy_serves_a_class_with_its_int8_deployment(engines) -> None:  # type: ignore[no-untyped-def]
    gw = _gateway(engines, VariantByClass(CLASSES))
    with serving(gw) as gs:
        _adopt(gw, engines)
        cheap, premium = _ask(gs.url, "sk-cheap"), _ask(gs.url, "sk-premium")
        assert cheap.status_code == 200 and premium.status_code == 200, (cheap.text, premium.text)
        # each answered by the engine it names, computing what that checkpoint computes
        assert cheap.json()["model"] == "tiny@int8" and premium.json()["model"] == "tiny"
        assert cheap.json()["choices"][0]["text"] == _greedy(engines["tiny@int8"][1])
        assert premium.json()["choices"][0]["text"] == _greedy(engines["tiny"][1])
        rows = _records(gw, 2).set_index("tenant")
        assert (rows.loc["cheap", "model"], rows.loc["cheap", "variant"]) == ("tiny@int8", "int8")
        assert (rows.loc["premium", "model"], rows.loc["premium", "variant"]) == ("tiny", "bf16")
        assert (rows["outcome"] == "completed").all()


def test_without_a_variant_policy_nothing_is_rewritten(engines) -> None:  # type: ignore[no-untyped-def]
    gw = _gateway(engines, None)
    with serving(gw) as gs:
        _adopt(gw, engines)
        r = _ask(gs.url, "sk-cheap")
        assert r.status_code == 200 and r.json()["model"] == "tiny"
        (row,) = _records(gw, 1).to_dict("records")
        assert (row["model"], row["variant"]) == ("tiny", "")


def test_the_record_variant_is_the_deployment_name_suffix() -> None:
    assert [served_variant(m) for m in ("x", "x@int8", "org/x@fp8", "x@0123456789abcdef")] == ["", "int8", "fp8", ""]
    variant_col = list(REQUEST_SCHEMA).index("variant")
    assert request_row(RequestInfo(1, "x@fp8", "t", 3, 4, 0.0))[variant_col] == "fp8"
    explicit = RequestInfo(2, "x", "t", 3, 4, 0.0, variant="bf16")  # set by the variant policy: kept
    assert request_row(explicit)[variant_col] == "bf16"


def test_a_published_variant_is_fetched_and_served_through_a_real_agent(tmp_path: Path) -> None:
    """The whole path: `tiny@int8` (a `live.quantize` copy) published to the registry under its variant name, a
    real agent fetching it from the store into a running engine when the variant policy asks for it, and the
    record naming the variant; its checkpoint holds about half the bytes of the original's."""
    from live.registry import Registry
    from tests.live_gateway.conftest import AGENT_TOKEN, start_agent, stop_agent

    store_url = f"file://{tmp_path / 'cloud'}"
    bf16 = generate_checkpoint(tmp_path / "ckpt" / "tiny", "tiny", 0).path
    int8 = quantize_checkpoint(bf16, tmp_path / "ckpt" / "tiny-int8", "int8").path
    registry = Registry([store_url])
    registry.publish("tiny", bf16)
    registry.publish("tiny@int8", int8)
    sizes = {name: registry.manifest(name).total_bytes for name in ("tiny", "tiny@int8")}
    assert sizes["tiny@int8"] < 0.75 * sizes["tiny"]
    table = yaml.safe_load((ROOT / "conf" / "variants" / "cited.yaml").read_text()) | {"extra": ["int8"]}
    specs = {m.name: m for m in apply_variants([model_spec("tiny", LlamaConfig.from_dir(bf16), 4)], table)}
    proc, url = start_agent(tmp_path, "v0", store_url)
    try:
        bundle = PolicyBundle(TierAware(), NoCaching(), KeepAlive(keep_alive_s=300),
                              variants=VariantByClass(CLASSES))
        gw = Gateway(GatewayConfig(agents=[AgentRef("v0", url, AGENT_TOKEN)], tenants=dict(KEYS), models=specs,
                                   admin_token=ADMIN_TOKEN, tick=False), bundle)
        with serving(gw) as gs:
            r = _ask(gs.url, "sk-cheap")
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "tiny@int8" and r.json()["choices"][0]["text"] == _greedy(int8)
            (row,) = _records(gw, 1).to_dict("records")
            assert (row["model"], row["variant"], row["cold_start"], row["source_tier"]) == (
                "tiny@int8", "int8", True, "cloud")
            status = httpx.get(url + "/status", headers={"Authorization": f"Bearer {AGENT_TOKEN}"}).json()
            assert [i["model"] for i in status["instances"]] == ["tiny@int8"]
    finally:
        stop_agent(proc)
