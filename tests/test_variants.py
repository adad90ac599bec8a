"""Weight variants, KV-cache quantisation, speculative decoding and the variant policy (core/variants.py).

Each mechanism has a test that fails when it is switched off: bytes and load time follow the format, the KV
cache holds twice the tokens in fp8, the speculative speed-up divides TPOT, the simulator's TTFT / TPOT move with
each on and stay bit-identical with the table alone, and the policy serves each class the variant it should.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pandas as pd
import pytest

from core.catalog import architecture
from core.inference import InferenceModel
from core.loadtime import transfer_s
from core.policies.variants import VariantByClass, relative_cost
from core.spec_builders import cluster_from_dict
from core.specs import EngineSpec, ModelSpec, ObjectStoreSpec
from core.state import ClusterState, ClusterView, gpus_needed
from core.variants import (
    Speculative,
    WeightFormat,
    acceptance_for_speedup,
    apply_variants,
    expected_tokens_per_step,
    speculative_speedup,
    variant_name,
    variants_from_dict,
)
from core.workload.trace import Workload
from experiments.setup import build_policy
from sim.run import simulate
from tests.conftest import config

BASE = "llama-3.1-8b"
DEP = f"{BASE}/ft-0"
FP8 = WeightFormat("fp8", 1.0, prefill_time_mult=0.7, decode_time_mult=0.625)


def _table(**over: Any) -> dict[str, Any]:
    """conf/variants/cited.yaml as composed, with `over` laid over it."""
    return {**config("+variants=cited")["variants"], **over}


def _cluster() -> Any:
    cfg = config("cluster=small")["cluster"]
    cfg["node_groups"][0]["count"] = 1
    return cluster_from_dict(cfg)


# --------------------------------------------------------------------------- bytes, memory, load time
def test_fp8_halves_the_quantised_bytes_and_load_time_falls() -> None:
    bf16 = architecture(BASE, DEP)
    fp8 = apply_variants([bf16], variants_from_dict(_table(serve="fp8")))[0]
    assert fp8.name == DEP and fp8.variant == "fp8"
    emb = bf16.embed_params
    # the layers halve, embeddings and LM head stay bf16
    assert fp8.weights_bytes == pytest.approx((bf16.params_b * 1e9 - emb) * 1 + emb * 2)
    assert fp8.weights_bytes == pytest.approx(bf16.weights_bytes - (bf16.params_b * 1e9 - emb))
    assert 1.7 < bf16.weights_bytes / fp8.weights_bytes < 2.0
    assert fp8.resident_bytes == pytest.approx(fp8.weights_bytes)
    node = _cluster().nodes[0]
    for tier in ("cloud", "nvme"):
        t16, t8 = (transfer_s(tier, m, node, ObjectStoreSpec(), 1) for m in (bf16, fp8))
        assert t8 < t16 and t16 / t8 == pytest.approx(bf16.weights_bytes / fp8.weights_bytes, rel=0.1)


def test_memory_reduction_is_2x_when_embeddings_are_quantised_too() -> None:
    bf16 = architecture(BASE, DEP)
    table = _table(serve="fp8")
    table["weights"] = {**table["weights"], "fp8": {**table["weights"]["fp8"], "quantize_embeddings": True}}
    fp8 = apply_variants([bf16], table)[0]
    assert bf16.weights_bytes / fp8.weights_bytes == pytest.approx(2.0)
    assert bf16.resident_bytes / fp8.resident_bytes == pytest.approx(2.0)
    int4 = apply_variants([bf16], _table(serve="int4"))[0]
    assert int4.weights_bytes < fp8.weights_bytes


def test_a_variant_keeps_its_kv_reserve_and_fewer_gpus() -> None:
    node = cluster_from_dict(config()["cluster"]).nodes[0]  # 8 x H100-80GB: bf16 70B takes 4, fp8 2
    engine = EngineSpec()
    big = architecture("llama-3.1-70b")
    fp8 = apply_variants([big], _table(serve="fp8"))[0]
    n16, per16, kv16 = gpus_needed(big, node, engine)
    n8, per8, kv8 = gpus_needed(fp8, node, engine)
    assert kv8 == pytest.approx(kv16)  # as many KV bytes (tokens) as bf16
    assert per8 * n8 < per16 * n16 and (n16, n8) == (4, 2)


def test_kv_fp8_doubles_the_tokens_an_instance_holds() -> None:
    node = _cluster().nodes[0]
    bf16 = architecture(BASE, DEP)
    kv8 = apply_variants([bf16], _table(kv_cache="fp8"))[0]
    assert kv8.kv_bytes_per_token == pytest.approx(bf16.kv_bytes_per_token / 2)
    assert kv8.weights_bytes == bf16.weights_bytes
    _, _, budget16 = gpus_needed(bf16, node, EngineSpec())
    _, _, budget8 = gpus_needed(kv8, node, EngineSpec())
    assert budget8 / kv8.kv_bytes_per_token == pytest.approx(2 * budget16 / bf16.kv_bytes_per_token)


# --------------------------------------------------------------------------- speculative decoding
def test_speculative_speedup_formula() -> None:
    assert expected_tokens_per_step(0.8, 4) == pytest.approx((1 - 0.8 ** 5) / 0.2)
    assert expected_tokens_per_step(1.0, 4) == 5.0 and expected_tokens_per_step(0.0, 4) == 1.0
    assert speculative_speedup(0.8, 4, 0.05) == pytest.approx(3.36160 / 1.2, rel=1e-5)
    assert speculative_speedup(0.8, 4, 0.05) == pytest.approx(2.8, abs=0.01)  # the seed's "up to 2.8x"
    assert speculative_speedup(0.0, 4, 0.05) < 1  # nothing accepted: the drafts are pure overhead
    assert acceptance_for_speedup(2.8, 4, 0.05) == pytest.approx(0.8, abs=0.002)
    assert acceptance_for_speedup(2.8, 2, 0.05) is None  # k = 2 never reaches it with a costly draft


def test_inference_model_applies_multipliers_and_speculation() -> None:
    gpu, engine = _cluster().nodes[0].gpu, EngineSpec()
    bf16 = architecture(BASE, DEP)
    spec = Speculative(draft_tokens=4, acceptance=0.8, draft_cost=0.05, draft_params_frac=0.05, max_batch=64)
    base = InferenceModel(bf16, gpu, 1, engine)
    fp8 = InferenceModel(apply_variants([bf16], variants_from_dict(_table(serve="fp8")))[0], gpu, 1, engine)
    vc = variants_from_dict(_table())
    assert vc is not None
    sp = apply_variants([bf16], replace(vc, speculative=spec))[0]
    assert sp.draft_resident_bytes == pytest.approx(0.05 * bf16.params_b * 1e9 * 2)
    spi = InferenceModel(sp, gpu, 1, engine)
    assert fp8.prefill_s(1000) == pytest.approx(0.7 * base.prefill_s(1000))
    assert fp8.decode_iter_s(8, 8000) == pytest.approx(0.625 * base.decode_iter_s(8, 8000))
    assert spi.decode_iter_s(8, 8000) == pytest.approx(base.decode_iter_s(8, 8000) / spec.speedup)
    assert spi.decode_iter_s(64, 8000) == pytest.approx(base.decode_iter_s(64, 8000))  # off at max_batch
    assert spi.prefill_s(1000) == pytest.approx(1.05 * base.prefill_s(1000))  # the draft prefills too


# --------------------------------------------------------------------------- off by default
def test_no_variants_block_or_the_table_alone_change_nothing() -> None:
    models = [architecture(BASE, DEP), architecture("llama-3.2-1b", "x")]
    assert apply_variants(models, None) == models
    assert apply_variants(models, _table()) == models  # bf16 served, no extras, no KV dtype, no speculation
    assert config("+variants=cited")["models"] == config()["models"]
    assert "variants" not in config()


# --------------------------------------------------------------------------- in the simulator
def _sim(variants: dict[str, Any] | None, prompts: list[int] | None = None, policy: Any = None,
         tenants: list[str] | None = None, engine: EngineSpec | None = None) -> pd.DataFrame:
    """A warm-up request, then requests each alone on the warm instance (one node of the small cluster)."""
    prompts = prompts or [512, 512]
    arrivals = [0.0] + [120.0 + 30.0 * i for i in range(len(prompts))]
    wl = Workload.from_columns(arrivals, [32, *prompts], [4] + [64] * len(prompts), model=DEP,
                               tenant=tenants or "default")
    models = apply_variants([architecture(BASE, DEP)], variants)
    res = simulate(_cluster(), models, engine or EngineSpec(), policy or build_policy(config("policy=mvp")["policy"]),
                   wl)
    return res.requests


def test_sim_ttft_and_tpot_move_with_each_mechanism_and_not_without() -> None:
    base = _sim(None)
    assert (base.outcome == "completed").all() and (base.variant == "").all()
    pd.testing.assert_frame_equal(_sim(_table()), base)  # the table alone: bit-identical records
    warm = slice(1, None)
    fp8 = _sim(_table(serve="fp8"))
    assert (fp8.variant == "fp8").all()
    assert (fp8.tpot_s[warm] / base.tpot_s[warm]).to_numpy() == pytest.approx(0.625, rel=1e-6)
    assert (fp8.ttft_s[warm] < base.ttft_s[warm]).all()
    assert fp8.cold_start_s[0] < base.cold_start_s[0]  # the first request waited for a smaller load
    spec = _sim(config("+variants=spec_2p8")["variants"])
    assert (spec.tpot_s[warm] / base.tpot_s[warm]).to_numpy() == pytest.approx(1 / 2.8, rel=0.01)
    assert (spec.ttft_s[warm] > base.ttft_s[warm]).all()  # the draft prefills the prompt too


def test_sim_kv_fp8_admits_a_request_bf16_cannot_hold() -> None:
    bf16 = architecture(BASE, DEP)
    node = _cluster().nodes[0]
    engine = EngineSpec(kv_reserve_frac=0.001)  # ~16 MB of KV: ~130 tokens of bf16 KV for an 8B model
    budget = gpus_needed(bf16, node, engine)[2]
    tokens = int(1.5 * budget / bf16.kv_bytes_per_token)  # fits only at half the bytes per token
    prompts = [tokens - 64]
    off = _sim(None, prompts, engine=engine)
    on = _sim(_table(kv_cache="fp8"), prompts, engine=engine)
    assert off.reason.iloc[-1] == "kv_cache_too_small"
    assert on.outcome.iloc[-1] == "completed"


# --------------------------------------------------------------------------- the variant policy
def _view(models: list[ModelSpec]) -> ClusterView:
    return ClusterView(ClusterState(_cluster(), models, EngineSpec()), object())


class _Req:
    def __init__(self, tenant: str = "default", prompt: int = 100, model: str = DEP) -> None:
        self.id, self.model, self.tenant, self.prompt_tokens, self.output_tokens, self.arrival_s = (
            0, model, tenant, prompt, 10, 0.0)


def test_policy_picks_per_class_and_cost_target() -> None:
    cfg = config("policy=variant_by_class", "+variants=by_class")
    models = apply_variants([architecture(BASE, DEP)], cfg["variants"])
    assert {m.name for m in models} == {DEP, *(variant_name(DEP, f) for f in ("fp8", "int8", "int4"))}
    picker = build_policy(cfg["policy"]).variants
    assert isinstance(picker, VariantByClass)
    view = _view(models)
    assert picker.pick(_Req(tenant="premium", prompt=5000), view) == DEP  # quality floor: bf16 only
    assert picker.pick(_Req(prompt=4000), view) == variant_name(DEP, "fp8")  # best quality under cost 0.5
    assert picker.pick(_Req(prompt=100), view) == variant_name(DEP, "int4")  # only int4 meets cost 0.2
    costs = {m.variant: relative_cost(m, models[0]) for m in models}
    assert costs["int4"] < 0.2 < costs["fp8"] < 0.5 and costs["bf16"] == 1.0
    # nothing meets the target: the cheapest allowed; a missing variant: the requested deployment
    strict = VariantByClass([{"allowed": ["bf16", "fp8"], "cost_target": 0.01}])
    assert strict.pick(_Req(), view) == variant_name(DEP, "fp8")
    assert strict.pick(_Req(), _view([architecture(BASE, DEP)])) == DEP
    assert VariantByClass([{"tenants": ["x"], "allowed": ["int4"]}]).pick(_Req(), view) == DEP  # no class matches


def test_policy_in_the_simulator_records_the_variant() -> None:
    cfg = config("policy=variant_by_class", "+variants=by_class")
    policy = build_policy(cfg["policy"])
    req = _sim(cfg["variants"], prompts=[4000, 100, 3000], policy=policy,
               tenants=["default", "default", "default", "premium"])
    assert list(req.variant) == ["int4", "fp8", "int4", "bf16"]
    assert list(req.model) == [variant_name(DEP, "int4"), variant_name(DEP, "fp8"), variant_name(DEP, "int4"),
                               DEP]
    assert (req.outcome == "completed").all()
    assert not math.isnan(req.tpot_s.iloc[1])


def test_variants_experiment_report_keeps_the_hand_written_head() -> None:
    from experiments.variants import MARK, report, static_rows

    static = static_rows(config())
    fp8 = static[(static.model == BASE) & (static.format == "fp8")].iloc[0]
    assert 1.7 < fp8.weights_reduction < 2.0 and fp8.load_cloud_s < static.load_cloud_s.iloc[0]
    run = {k: 1.0 for k in ("mem_per_instance_GB", "load_s", "cold_start_mean_s", "ttft_mean_s", "ttft_p99_s",
                            "tpot_mean_ms", "gpu_hours", "cost_usd")} | {"variants": "bf16 3"}
    text = report(static, {("smoke", "bf16"): [run, run], ("smoke", "fp8"): [run, run]}, {"smoke": 2}, "cmd",
                  head="# head\n\nhand-written")
    assert text.startswith("# head\n\nhand-written") and MARK.strip() in text and "| fp8 | 1 [1, 1]" in text
