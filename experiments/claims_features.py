"""The seed-claims audit's rows for the production features of issue 15, each judged on its own mechanism in its
own scenario: semantic (response) caching, edge sites with sub-100 ms routing, FP8/INT8 weight variants, KV-cache
quantisation and speculative decoding. (Memory pooling and defragmentation: `claims_cost.claim_memory_pooling`.)

Each row runs the mechanism the simulator now has (core/response_cache_model.py, core/regions.py,
core/variants.py) against the same scenario with it off, on the settings' seeds and trace window."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from core.specs import ModelSpec
from core.variants import acceptance_for_speedup, apply_variants, speculative_speedup, variants_from_dict
from experiments.claims_base import CLAIMS, REGIMES, ClaimResult, Context, _pct, _s
from experiments.claims_rules import BOUNDS, rule_at_reference, rule_edge_routing
from experiments.plots import claim_bars

#: the semantic hit rates the response-cache row models on top of the trace's exact repeats (the claim's range
#: and below it): what a trace without prompt text cannot show
SEMANTIC_MODEL_RATES = (0.2, 0.4, 0.6)
#: the similarity threshold of the generated-prompt evidence (the live gateway's default, conf/live/serve.yaml)
SEMANTIC_THRESHOLD = 0.85


def _mean(xs: Sequence[float]) -> float:
    return float(statistics.fmean(xs))


def _seeds(ctx: Context) -> tuple[int, ...]:
    return ctx.settings.seeds


def _seed_text(ctx: Context) -> str:
    seeds = _seeds(ctx)
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {', '.join(map(str, seeds))}"


# ============================================================================ semantic caching
def claim_semantic_cache(ctx: Context) -> ClaimResult:
    """Hit rate of the gateway's response cache on the Mooncake trace (exact prompt identity from its block
    hashes), and what a semantic layer would have to add; the similarity cache's quality risk on paraphrases."""
    from core.response_cache import CacheConfig
    from core.response_cache_model import SimCacheConfig
    from experiments.response_cache import ONE_MODEL, prompt_set, replay, sim_rows, trace_repeats

    scen = REGIMES["semantic_cache"][0]
    exact = CacheConfig(exact=True, ttl_s=3600.0, capacity=100_000)
    both = CacheConfig(exact=True, semantic=True, ttl_s=3600.0, capacity=100_000)
    variants: dict[str, SimCacheConfig | None] = {"off": None, "exact": SimCacheConfig(exact)}
    variants |= {f"semantic {r:g}": SimCacheConfig(both, semantic_hit_rate=r) for r in SEMANTIC_MODEL_RATES}
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in _seeds(ctx):
        cfg = ctx.config("workload=mooncake", *ONE_MODEL, f"seed={seed}", scenario=scen)
        for row in sim_rows(cfg, variants, seed):
            runs.setdefault(row["variant"], []).append(row)

    def hit(name: str) -> float:
        return _mean([r["exact_rate"] + r["semantic_rate"] for r in runs[name]])

    measured = hit("exact")
    sweep = [(f"at least {r:.0%} of the exact misses with an answer cached for the same tenant and model are "
              "paraphrases of that prompt (a semantic hit rate the trace cannot show: modelled)",
              hit(f"semantic {r:g}"))
             for r in SEMANTIC_MODEL_RATES]
    # the modelled rates rise: name only the smallest that would do (a larger one then does too)
    passing = [(c, x) for c, x in sweep if BOUNDS["cache_hit_rate"].ok(x)]
    v = rule_at_reference("cache_hit_rate", measured, passing[:1])
    n_trace, repeats = trace_repeats()
    gen = replay(prompt_set(240, seed=0), CacheConfig(exact=True, semantic=True, threshold=SEMANTIC_THRESHOLD))
    off, on = runs["off"], runs["exact"]
    fig = ctx.figure("semantic_cache", lambda p: claim_bars(
        p, ["exact (trace)", *(f"+ semantic model {r:.0%}" for r in SEMANTIC_MODEL_RATES), "generated paraphrases"],
        {"hit rate": [measured, *(hit(f"semantic {r:g}") for r in SEMANTIC_MODEL_RATES), gen["hit_rate"]]},
        ylabel="share of requests answered by the cache", title="Response-cache hit rate",
        bands={"claimed 40-60%": (0.4, 0.6)}))
    return ClaimResult(
        key="semantic_cache", claim=CLAIMS["semantic_cache"],
        scenario=(f"scenario={scen}, workload=mooncake (the Mooncake FAST'25 conversation trace"
                  f"{', its window' if ctx.settings.window_s else ''}), one 8B deployment; the gateway's response "
                  "cache (exact, TTL 1 h) at arrival, vs none; semantic hits modelled at "
                  f"{', '.join(f'{r:.0%}' for r in SEMANTIC_MODEL_RATES)} of exact misses"),
        measured=(f"hit rate {_pct(measured, 2)} (exact repeats of the trace; {_seed_text(ctx)}); the whole trace "
                  f"repeats {repeats} of {n_trace} prompts ({repeats / n_trace:.2%})"),
        verdict=v, rule=f"hit rate {BOUNDS['cache_hit_rate'].text()} on the real trace (a higher rate is more than "
        "claimed, not less)",
        command=ctx.command("semantic_cache"), figure=fig,
        evidence=[
            "Cache off vs exact cache: mean TTFT " + f"{_s(_mean([r['ttft_mean_s'] for r in off]), 3)} vs "
            f"{_s(_mean([r['ttft_mean_s'] for r in on]), 3)}, cost ${_mean([r['cost_usd'] for r in off]):.2f} vs "
            f"${_mean([r['cost_usd'] for r in on]):.2f}, GPU tokens saved "
            f"{_mean([r['tokens_saved'] for r in on]):.0f}.",
            *(f"With the semantic model at {r:.0%}: hit rate {_pct(hit(f'semantic {r:g}'), 1)}, cost "
              f"${_mean([x['cost_usd'] for x in runs[f'semantic {r:g}']]):.2f}, semantic hits that were not the same "
              f"prompt {_mean([x['semantic_not_identical'] for x in runs[f'semantic {r:g}']]):.0f} (each a quality "
              "risk)." for r in SEMANTIC_MODEL_RATES),
            f"Generated paraphrase set (240 prompts over 22 intents, Zipf 1.1, 5 paraphrases each; "
            f"experiments.response_cache): hit rate {_pct(gen['hit_rate'], 1)} at cosine threshold "
            f"{SEMANTIC_THRESHOLD:g} ({_pct(gen['semantic_rate'], 1)} semantic), {gen['wrong']} hits answered another "
            f"question ({_pct(gen['wrong_share_of_hits'], 1)} of hits). That rate is set by how the set was "
            "generated, so it is evidence about the cache's mechanism and risk, not about real traffic.",
            "Full study: `python -m experiments.response_cache` (docs/results/response_cache.md), which also runs the "
            "cache live on a loopback gateway.",
        ],
        assumptions=[
            "Exact identity on the trace = same `input_length` and the same `hash_ids` (512-token block hashes); a "
            "trace without text cannot show paraphrases, so semantic hits are a stated hit-rate model.",
            "Responses are cached per tenant and model, never across tenants (core/response_cache.py).",
        ],
        values={"hit_rate": measured, "trace_repeat_frac": repeats / n_trace,
                "modelled": {f"{r:g}": hit(f"semantic {r:g}") for r in SEMANTIC_MODEL_RATES},
                "generated_hit_rate": gen["hit_rate"], "generated_wrong": gen["wrong"]},
    )


# ============================================================================ edge sites and routing
def claim_edge_routing(ctx: Context) -> ClaimResult:
    """Edge sites in the scenario and the client <-> serving-region RTT, region-aware vs region-blind routing."""
    from core.regions import regions_from_dict
    from experiments.regions import MODES, run_metrics

    scen = REGIMES["edge_routing"][0]
    cfg0 = ctx.config(scenario=scen)
    table = regions_from_dict(cfg0["regions"])
    sites = len(table.of_kind("edge"))
    runs = {mode: [run_metrics(ctx.config(f"seed={seed}", f"policy.placement.region_aware={flag}", scenario=scen),
                               table) for seed in _seeds(ctx)] for mode, flag in MODES.items()}

    def m(mode: str, key: str) -> float:
        return _mean([r[key] for r in runs[mode]])

    share = m("region-aware", "share_rtt_under_100ms")
    v = rule_edge_routing(sites, share, [("routing ignores where clients are (region-blind)", sites,
                                          m("region-blind", "share_rtt_under_100ms"))])
    fig = ctx.figure("edge_routing", lambda p: claim_bars(
        p, list(MODES), {"share RTT < 100 ms": [m(x, "share_rtt_under_100ms") for x in MODES],
                         "RTT p99 / 1 s": [m(x, "rtt_ms_p99") / 1e3 for x in MODES]},
        ylabel="share of completed requests / seconds", title=f"{sites} edge sites: client <-> serving-region RTT",
        hlines={"claimed: every request < 100 ms (99%)": BOUNDS["rtt_under_100ms_share"].at_least or 0.99}))
    return ClaimResult(
        key="edge_routing", claim=CLAIMS["edge_routing"],
        scenario=(f"scenario={scen}: {sites} edge sites (1 L4 each) + 4 AWS regions, clients spread over 28 metros, "
                  "the Azure code trace; policy region_aware vs the same policy region-blind"),
        measured=(f"{sites} edge sites; {_pct(share, 1)} of requests under 100 ms RTT (p50 "
                  f"{m('region-aware', 'rtt_ms_p50'):.0f} ms, p99 {m('region-aware', 'rtt_ms_p99'):.0f} ms; "
                  f"{_seed_text(ctx)})"),
        verdict=v, rule=(f"edge sites {BOUNDS['edge_sites'].text()} and a share "
                         f"{BOUNDS['rtt_under_100ms_share'].text()} of completed requests with client <-> "
                         "serving-region RTT < 100 ms (sub-100 ms for all but the 1% tail)"),
        command=ctx.command("edge_routing"), figure=fig,
        evidence=[
            f"{mode}: share < 100 ms {_pct(m(mode, 'share_rtt_under_100ms'), 1)}, RTT p50 "
            f"{m(mode, 'rtt_ms_p50'):.0f} ms p99 {m(mode, 'rtt_ms_p99'):.0f} ms, TTFT p50 "
            f"{_s(m(mode, 'ttft_p50_s'), 3)} p99 {_s(m(mode, 'ttft_p99_s'), 2)}, served at the client's own metro "
            f"{_pct(m(mode, 'own_site_share'), 1)}, cost ${m(mode, 'cost_usd'):.2f}." for mode in MODES
        ] + ["The requests over 100 ms come from metros with no site within 100 ms that holds their model "
             "(docs/results/regions.md: gru, syd, jnb); more sites there, not routing, would move them.",
             "Cross-region failover, live (tests/live_gateway/test_regions_live.py): 0.93-0.96 s from a region's "
             "loss to its clients served elsewhere, by health checks with timeouts.",
             "Full study: `python -m experiments.regions` (docs/results/regions.md)."],
        assumptions=["RTTs: measured inter-region pairs as cited in conf/regions/default.yaml, other pairs from a "
                     "great-circle model fitted to them, plus a 10 ms client access; the client mix over metros is "
                     "an ASSUMPTION.",
                     "`sub-100 ms routing` is read as the network round trip from client to the region serving it "
                     "(the routing decision itself takes microseconds in the simulator)."],
        values={"edge_sites": sites, "share_rtt_under_100ms": share,
                "blind_share_rtt_under_100ms": m("region-blind", "share_rtt_under_100ms")},
    )


# ============================================================================ weight variants
def _catalog_reduction(models: Sequence[ModelSpec], table: Mapping[str, Any], fmt: str,
                       quantize_embeddings: bool = False) -> float:
    """bf16 bytes / `fmt` bytes of the weights of every deployment of `models` (a scenario's catalog)."""
    weights = {k: dict(f) for k, f in table["weights"].items()}
    if quantize_embeddings:
        weights[fmt]["quantize_embeddings"] = True
    served = apply_variants(models, variants_from_dict({**table, "weights": weights, "serve": fmt}))
    return sum(m.weights_bytes for m in models) / sum(m.weights_bytes for m in served)


def _sim(ctx: Context, scen: str, *overrides: str) -> list[dict[str, Any]]:
    from experiments.variants import run_metrics

    # the scenario's own cluster: with its draft model, the 70 B speculative instance needs more GPUs than a
    # node of the small cluster has
    return [run_metrics(ctx.config(f"seed={seed}", *overrides, scenario=scen)) for seed in _seeds(ctx)]


def claim_quantised_variants(ctx: Context) -> ClaimResult:
    """Weights and GPU memory per instance, bf16 vs FP8 / INT8, on the scenario's catalog."""
    scen = REGIMES["quantised_variants"][0]
    from experiments.setup import build

    table = ctx.config("+variants=cited", scenario=scen)["variants"]
    models = build(ctx.config(scenario=scen)).models
    red = {f: _catalog_reduction(models, table, f) for f in ("fp8", "int8")}
    red_all = {f: _catalog_reduction(models, table, f, quantize_embeddings=True) for f in ("fp8", "int8")}
    sims = {f: _sim(ctx, scen, *([f"+variants={f}"] if f != "bf16" else [])) for f in ("bf16", "fp8", "int8")}
    mem = {f: _mean([r["mem_per_instance_GB"] for r in sims[f]]) for f in sims}
    measured = min(red.values())
    sweep = [("embeddings and the LM head are quantised too (`quantize_embeddings: true`)", min(red_all.values()))]
    v = rule_at_reference("variant_memory_reduction", measured, sweep)
    fig = ctx.figure("quantised_variants", lambda p: claim_bars(
        p, ["fp8", "int8"], {"weights (catalog)": [red["fp8"], red["int8"]],
                             "weights incl. embeddings": [red_all["fp8"], red_all["int8"]],
                             "GPU memory / instance (simulated)": [mem["bf16"] / mem[f] for f in ("fp8", "int8")]},
        ylabel="bf16 / variant", title="Memory reduction of 8-bit weight variants", hlines={"claimed 2x": 2.0}))
    return ClaimResult(
        key="quantised_variants", claim=CLAIMS["quantised_variants"],
        scenario=(f"scenario={scen} (cluster=medium): every deployment of the catalog served in bf16, "
                  "fp8 (W8A8) or int8 (W8A8) (+variants=fp8 / int8, conf/variants/cited.yaml)"),
        measured=(f"weights {red['fp8']:.2f}x smaller in fp8, {red['int8']:.2f}x in int8 (catalog); GPU memory per "
                  f"instance {mem['bf16'] / mem['fp8']:.2f}x / {mem['bf16'] / mem['int8']:.2f}x (simulated, "
                  f"{_seed_text(ctx)})"),
        verdict=v, rule=f"bf16 / 8-bit weight bytes of the catalog {BOUNDS['variant_memory_reduction'].text()}, "
        "for both formats",
        command=ctx.command("quantised_variants"), figure=fig,
        evidence=[
            f"{f}: weights per instance {_mean([r['weights_per_instance_GB'] for r in sims[f]]):.1f} GB, GPU memory "
            f"per instance {mem[f]:.1f} GB, weights load {_s(_mean([r['load_s'] for r in sims[f]]))}, cold starts "
            f"{_mean([r['cold_starts'] for r in sims[f]]):.0f}, TPOT {_mean([r['tpot_mean_ms'] for r in sims[f]]):.1f}"
            f" ms, cost ${_mean([r['cost_usd'] for r in sims[f]]):.2f}." for f in sims
        ] + [f"With embeddings and the LM head quantised as well: {red_all['fp8']:.2f}x (fp8), {red_all['int8']:.2f}x "
             "(int8).",
             "GPU memory per instance falls less than the weights: each variant keeps its bf16 deployment's KV "
             "reserve (as many KV tokens), so the reserve does not shrink.",
             "Full study: `python -m experiments.variants` (docs/results/variants.md)."],
        assumptions=["Bytes per parameter: bf16 2, fp8 1, int8 1; embeddings and LM head stay bf16 as in published "
                     "FP8 / INT8 checkpoints (conf/variants/cited.yaml, sources there).",
                     "Quality is not modelled; records name the variant that served each request."],
        values={"reduction": measured, "by_format": red, "with_embeddings": red_all,
                "mem_per_instance_ratio": {f: mem["bf16"] / mem[f] for f in ("fp8", "int8")}},
    )


# ============================================================================ KV-cache quantisation
def claim_kv_quantisation(ctx: Context) -> ClaimResult:
    """KV tokens an instance holds with an FP8 KV cache vs bf16, and what that changes in the scenario."""
    from core.config import build_specs
    from core.state import gpus_needed
    from experiments.setup import build

    scen = REGIMES["kv_quantisation"][0]
    cfg_bf16 = ctx.config("+variants=cited", scenario=scen)
    cfg_fp8 = ctx.config("+variants=kv_fp8", scenario=scen)
    specs = build_specs(cfg_bf16)
    node = specs.cluster.nodes[0]
    base_models = build(cfg_bf16).models
    ratios = []
    for m in base_models:
        kv16 = apply_variants([m], variants_from_dict(cfg_bf16["variants"]))[0]
        kv8 = apply_variants([m], variants_from_dict(cfg_fp8["variants"]))[0]
        tok16 = gpus_needed(kv16, node, specs.engine)[2] / kv16.kv_bytes_per_token
        tok8 = gpus_needed(kv8, node, specs.engine)[2] / kv8.kv_bytes_per_token
        ratios.append(tok8 / tok16)
    measured = min(ratios)
    v = rule_at_reference("kv_capacity_ratio", measured, [])
    sims = {"bf16 KV": _sim(ctx, scen), "fp8 KV": _sim(ctx, scen, "+variants=kv_fp8")}

    def sm(k: str, key: str) -> float:
        return _mean([r[key] for r in sims[k]])

    ttft_change = sm("fp8 KV", "ttft_p99_s") / sm("bf16 KV", "ttft_p99_s") - 1
    fig = ctx.figure("kv_quantisation", lambda p: claim_bars(
        p, ["KV tokens / instance", "TPOT", "TTFT p99", "cost"],
        {"fp8 KV / bf16 KV": [measured, sm("fp8 KV", "tpot_mean_ms") / sm("bf16 KV", "tpot_mean_ms"),
                              sm("fp8 KV", "ttft_p99_s") / sm("bf16 KV", "ttft_p99_s"),
                              sm("fp8 KV", "cost_usd") / sm("bf16 KV", "cost_usd")]},
        ylabel="fp8 KV / bf16 KV", title="KV-cache quantisation (FP8)", hlines={"2x capacity": 2.0}))
    return ClaimResult(
        key="kv_quantisation", claim=CLAIMS["kv_quantisation"],
        scenario=(f"scenario={scen} (cluster=medium): bf16 weights with a bf16 vs an FP8 KV cache "
                  "(+variants=kv_fp8) in the same KV reserve"),
        measured=(f"KV tokens per instance x{measured:.2f} (every deployment of the catalog); TPOT "
                  f"x{sm('fp8 KV', 'tpot_mean_ms') / sm('bf16 KV', 'tpot_mean_ms'):.3f}, cost "
                  f"x{sm('fp8 KV', 'cost_usd') / sm('bf16 KV', 'cost_usd'):.3f} ({_seed_text(ctx)})"),
        verdict=v, rule=(f"KV tokens an instance holds, fp8 / bf16, {BOUNDS['kv_capacity_ratio'].text()} for every "
                         "deployment (the seed names no number: 2x is what halving the bytes per element promises)"),
        command=ctx.command("kv_quantisation"), figure=fig,
        evidence=[f"{k}: TTFT mean {_s(sm(k, 'ttft_mean_s'), 3)} p99 {_s(sm(k, 'ttft_p99_s'), 2)}, TPOT "
                  f"{sm(k, 'tpot_mean_ms'):.2f} ms, cold starts {sm(k, 'cold_starts'):.0f}, cost "
                  f"${sm(k, 'cost_usd'):.2f}, completed {_pct(sm(k, 'completed_frac'), 2)}." for k in sims]
        + ["The capacity doubles by construction of the byte count; what it buys depends on whether KV memory was "
           "the bound: " + (f"here TTFT p99 moved by {ttft_change:+.1%}, so admissions were "
                            f"{'hardly ' if abs(ttft_change) < 0.01 else ''}bound by KV memory, and the decode step's "
                            "halved KV reads change TPOT by "
                            f"{sm('fp8 KV', 'tpot_mean_ms') / sm('bf16 KV', 'tpot_mean_ms') - 1:+.1%}.")],
        assumptions=["FP8 KV: 1 byte per element instead of 2 (vLLM docs, quantized KV cache); accuracy not "
                     "modelled; no dequantisation cost modelled."],
        values={"kv_capacity_ratio": measured},
    )


# ============================================================================ speculative decoding
def claim_speculative_decoding(ctx: Context) -> ClaimResult:
    """Simulated decode speed-up (TPOT ratio) of speculative decoding at a typical and at a high acceptance."""
    scen = REGIMES["speculative_decoding"][0]
    spec = ctx.config("+variants=spec", scenario=scen)["variants"]["speculative"]
    hi = ctx.config("+variants=spec_2p8", scenario=scen)["variants"]["speculative"]
    k, c = int(spec["draft_tokens"]), float(spec["draft_cost"])
    sims = {"off": _sim(ctx, scen), "typical": _sim(ctx, scen, "+variants=spec"),
            "high": _sim(ctx, scen, "+variants=spec_2p8")}
    tpot = {x: _mean([r["tpot_mean_ms"] for r in sims[x]]) for x in sims}
    speedup = {x: tpot["off"] / tpot[x] for x in ("typical", "high")}
    sweep = [(f"the draft's tokens are accepted at alpha = {float(hi['acceptance']):g} (k = {hi['draft_tokens']}, "
              f"c = {float(hi['draft_cost']):g})", speedup["high"])]
    v = rule_at_reference("spec_speedup", speedup["typical"], sweep)
    need = acceptance_for_speedup(2.8, k, c)
    alphas = [0.5, 0.6, 0.7, 0.8, 0.9]
    fig = ctx.figure("speculative_decoding", lambda p: claim_bars(
        p, [f"alpha {a:g}" for a in alphas], {"formula (k, c of the preset)": [speculative_speedup(a, k, c)
                                                                                for a in alphas]},
        ylabel="decode speed-up", title="Speculative decoding: speed-up vs acceptance rate",
        hlines={"claimed up to 2.8x": 2.8}))
    return ClaimResult(
        key="speculative_decoding", claim=CLAIMS["speculative_decoding"],
        scenario=(f"scenario={scen} (cluster=medium): a draft model with k = {k}, c = {c:g} at the "
                  f"typical acceptance alpha = {float(spec['acceptance']):g} (+variants=spec) and at "
                  f"{float(hi['acceptance']):g} (+variants=spec_2p8), vs none"),
        measured=(f"TPOT {speedup['typical']:.2f}x faster at alpha {float(spec['acceptance']):g}, "
                  f"{speedup['high']:.2f}x at {float(hi['acceptance']):g} ({_seed_text(ctx)})"),
        verdict=v, rule=(f"simulated TPOT speed-up {BOUNDS['spec_speedup'].text()} at the typical acceptance rate "
                         "(`up to` is read as what a deployment reaches, not a best case)"),
        command=ctx.command("speculative_decoding"), figure=fig,
        evidence=[f"{x}: TPOT {tpot[x]:.2f} ms, TTFT mean {_s(_mean([r['ttft_mean_s'] for r in sims[x]]), 3)}, "
                  f"cost ${_mean([r['cost_usd'] for r in sims[x]]):.2f}." for x in sims]
        + [f"2.8x needs alpha >= {need:.3f} at k = {k}, c = {c:g} (Leviathan et al. 2023, Theorem 3.8)"
           if need is not None else f"2.8x is out of reach at k = {k}, c = {c:g} even at alpha = 1.",
           "The vLLM blog that reports `up to 2.8x` measures ~1.5x with a draft model on ShareGPT at low QPS "
           "(docs/results/variants.md).",
           "Full study: `python -m experiments.variants` (docs/results/variants.md)."],
        assumptions=["Speed-up per decode step from the acceptance-rate formula; the draft prefills the prompt too "
                     "(prefill x (1 + c)) and its weights are resident next to the target's (5% of its params): "
                     "ASSUMPTIONS stated in conf/variants/spec.yaml."],
        values={"speedup": speedup["typical"], "speedup_high": speedup["high"], "alpha_for_2p8": need},
    )
