"""`python -m experiments.response_cache [--out docs/results/response_cache.md]`: response and semantic caching
at the edge, measured (issue 15 item 3).

Three parts, each stated for what it is:

1. **Simulator on a trace** (Mooncake FAST'25 conversation trace, the smoke scenario's cluster): the gateway's
   cache consulted at arrival (`core.response_cache_model`). Exact hits come from prompt identity in the
   trace (`hash_ids` + prompt length); semantic hits cannot be measured from a trace without text, so they are
   a hit-rate MODEL, run at the seed's claimed 40 % and 60 % to show what the claim would be worth. Cost and
   latency are compared with the cache off, same trace, same seed.
2. **Threshold sweep on a generated prompt set** (intents x paraphrase templates, seeded): hit rates and the
   quality risk (semantic hits whose cached answer belonged to a different question) of
   `core.response_cache`'s embedding at several cosine thresholds. Pure, no server.
3. **Live loopback run**: a real uvicorn gateway with the cache on, a null-engine process standing in for the
   engine (`--token-delay-s`: an emulated decode time, not a model), two tenants sending the generated set;
   hit rates, latency of hits vs misses as the client sees it, and a replay of the same sequence through the
   pure cache to check the live counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.response_cache import CacheConfig, ResponseCache, prompt_text
from core.response_cache_model import SimCacheConfig

REPO = Path(__file__).resolve().parents[1]
MOONCAKE = REPO.parent / "shared/data/traces/mooncake_fast25/conversation_trace.jsonl"
SIM_OVERRIDES = ("scenario=smoke", "workload=mooncake")
ONE_MODEL = ("models.bases=[llama-3.1-8b]", "models.variants_per_base=1")
CLAIM = "semantic caching: 40-60% hit rates"
THRESHOLDS = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)

# ------------------------------------------------------------------------------------------ 1. simulator


def compose(*overrides: str) -> dict[str, Any]:
    """The simulator's composed config (conf/config.yaml) with `overrides`, as plain containers."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain["progress"] = False
    return plain  # type: ignore[return-value]


def trace_repeats(path: Path = MOONCAKE) -> tuple[int, int]:
    """(requests, requests whose prompt (`hash_ids` + `input_length`) appeared earlier in the trace)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    n = repeats = 0
    with path.open() as f:
        for line in f:
            rec = json.loads(line)
            key = (int(rec["input_length"]), tuple(rec.get("hash_ids") or ()))
            n += 1
            repeats += key in seen
            seen.add(key)
    return n, repeats


def sim_variants(latency_s: float) -> dict[str, SimCacheConfig | None]:
    """The simulator runs: off, exact from the trace, and exact + the semantic model at the claim's ends."""
    exact = CacheConfig(exact=True, ttl_s=3600.0, capacity=100_000)
    both = CacheConfig(exact=True, semantic=True, ttl_s=3600.0, capacity=100_000)
    return {"off": None,
            "exact (trace identity)": SimCacheConfig(exact, gateway_latency_s=latency_s),
            "exact + semantic MODEL 40%": SimCacheConfig(both, semantic_hit_rate=0.4, gateway_latency_s=latency_s),
            "exact + semantic MODEL 60%": SimCacheConfig(both, semantic_hit_rate=0.6, gateway_latency_s=latency_s)}


def sim_table(overrides: Sequence[str], latency_s: float, seed: int = 0) -> list[dict[str, Any]]:
    """One row per variant: hit rates, mean TTFT / e2e of completed requests, cost and GPU-hours."""
    return sim_rows(compose(*overrides, f"seed={seed}"), sim_variants(latency_s), seed)


def sim_rows(cfg: Mapping[str, Any], variants: Mapping[str, SimCacheConfig | None], seed: int = 0
             ) -> list[dict[str, Any]]:
    """`sim_table` on a composed config: one simulation of `cfg` per cache variant (None: no cache)."""
    from experiments.setup import build
    from sim.run import simulate

    s = build(cfg)
    rows = []
    for name, rc in variants.items():
        r = simulate(s.cluster, s.models, s.engine, s.policy, s.workload, seed=seed, response_cache=rc,
                     request_timeout_s=s.sim.get("request_timeout_s", 600.0),
                     drain_timeout_s=s.sim.get("drain_timeout_s", 3600.0))
        done = r.requests[r.requests["outcome"] == "completed"]
        c = r.summary.get("response_cache") or {}
        rows.append({"variant": name, "requests": r.summary["requests"], "completed": r.summary["completed"],
                     "exact_rate": c.get("exact_hit_rate", 0.0), "semantic_rate": c.get("semantic_hit_rate", 0.0),
                     "ttft_mean_s": float(done["ttft_s"].mean()), "ttft_p99_s": float(done["ttft_s"].quantile(0.99)),
                     "e2e_mean_s": float(done["e2e_s"].mean()), "cost_usd": float(r.summary["cost_usd"]),
                     "gpu_hours": float(r.summary["gpu_hours"]), "tokens_saved": c.get("gpu_tokens_saved", 0.0),
                     "semantic_not_identical": (c.get("modelled") or {}).get("semantic", 0)})
    return rows


# ------------------------------------------------------------------------------- 2. generated prompt set

_COUNTRIES = ("France", "Spain", "Italy", "Germany", "Japan", "Brazil", "Canada", "Kenya", "Norway", "Peru")
_UNITS = (("miles", "kilometres"), ("pounds", "kilograms"), ("Fahrenheit", "Celsius"), ("inches", "centimetres"))
_TOPICS = ("photosynthesis", "a hash table", "TCP congestion control", "the French revolution", "compound interest",
           "a binary search", "the water cycle", "inflation")
_TEMPLATES = {
    "capital": ("What is the capital of {x}?", "What's the capital city of {x}?", "Tell me the capital of {x}.",
                "capital of {x}?", "Which city is the capital of {x}?"),
    "convert": ("How do I convert {a} to {b}?", "How to convert {a} into {b}?", "Convert {a} to {b}: how?",
                "What is the formula to convert {a} to {b}?", "how do you convert {a} to {b}"),
    "explain": ("Explain {x} in simple terms.", "Can you explain {x} simply?", "Explain {x} simply, please.",
                "Give me a simple explanation of {x}.", "explain {x} in simple words"),
}


@dataclass(frozen=True)
class Prompt:
    intent: str  # the question asked: two prompts with the same intent want the same answer
    text: str


def intents() -> list[tuple[str, dict[str, str]]]:
    """(template family, fields) for every intent of the generated set (10 + 4 + 8 = 22 intents)."""
    return ([("capital", {"x": c}) for c in _COUNTRIES] + [("convert", {"a": a, "b": b}) for a, b in _UNITS]
            + [("explain", {"x": t}) for t in _TOPICS])


def prompt_set(n: int, seed: int = 0, zipf_s: float = 1.1) -> list[Prompt]:
    """`n` prompts: an intent drawn by a Zipf law over the intents, then one of its 5 paraphrases uniformly."""
    rng = np.random.default_rng(seed)
    all_intents = intents()
    weights = 1.0 / np.arange(1, len(all_intents) + 1) ** zipf_s
    order = rng.permutation(len(all_intents))
    picks = rng.choice(len(all_intents), size=n, p=weights / weights.sum())
    out = []
    for i in picks:
        family, fields = all_intents[order[i]]
        template = _TEMPLATES[family][int(rng.integers(len(_TEMPLATES[family])))]
        out.append(Prompt(f"{family}:{'/'.join(fields.values())}", template.format(**fields)))
    return out


def chat_text(text: str) -> str:
    """The prompt text the gateway keys and embeds for a one-message chat request with `text`."""
    out = prompt_text("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]})
    assert out is not None
    return out


def unique_set(seed: int = 0) -> list[Prompt]:
    """Every (intent, paraphrase) once, shuffled: no exact repeat, so every hit is a similarity hit."""
    rng = np.random.default_rng(seed)
    out = [Prompt(f"{family}:{'/'.join(fields.values())}", t.format(**fields))
           for family, fields in intents() for t in _TEMPLATES[family]]
    return [out[i] for i in rng.permutation(len(out))]


def replay(prompts: Sequence[Prompt], config: CacheConfig, tenants: Sequence[str] = ("a",)) -> dict[str, Any]:
    """The pure cache over the sequence as the gateway sees it (one-message chat requests; request i from tenant
    i % len(tenants), answered before the next): hits by kind, semantic hits whose stored prompt differs, and
    wrong hits (another intent's answer)."""
    cache = ResponseCache(config)
    exact = semantic = wrong = 0
    for i, p in enumerate(prompts):
        tenant = tenants[i % len(tenants)]
        prompt = chat_text(p.text)  # the exact key; the similarity cache embeds the content alone, as the gateway
        hit = cache.lookup(tenant, "scope", prompt, float(i), p.text)
        if hit is None:
            cache.store(tenant, "scope", prompt, p.intent, float(i), p.text)
        elif hit.kind == "exact":
            exact += 1
        else:
            semantic += 1
            wrong += hit.value != p.intent
    n = len(prompts)
    return {"n": n, "exact": exact, "semantic": semantic, "hit_rate": (exact + semantic) / n,
            "exact_rate": exact / n, "semantic_rate": semantic / n, "semantic_not_identical":
            cache.stats.semantic_not_identical, "wrong": wrong, "wrong_share_of_hits":
            wrong / (exact + semantic) if exact + semantic else 0.0}


def sweep(prompts: Sequence[Prompt], thresholds: Sequence[float] = THRESHOLDS) -> list[dict[str, Any]]:
    rows = [{"threshold": "exact only", **replay(prompts, CacheConfig(exact=True))}]
    for t in thresholds:
        rows.append({"threshold": t, **replay(prompts, CacheConfig(exact=True, semantic=True, threshold=t))})
    return rows


# ------------------------------------------------------------------------------------------ 3. live run


@contextlib.contextmanager
def _live_gateway(cache: CacheConfig, token_delay_s: float, reply_tokens: int) -> Iterator[tuple[Any, str]]:
    """A gateway (uvicorn, loopback) with `cache`, over one null-engine process; (gateway, base URL)."""
    import uvicorn

    from live.engines.base import free_port
    from live.engines.null_server import NullEngineProcess
    from live.gateway import AgentRef, Gateway, GatewayConfig, Tenant, create_app
    from live.lifecycle import wait_healthy

    engine = NullEngineProcess(free_port(), model_name="tiny",
                               extra_args=["--token-delay-s", str(token_delay_s), "--reply-tokens", str(reply_tokens)])
    engine.start()
    try:
        engine.wait_ready(30.0)
        tenants = {"sk-a": Tenant("a", ("tiny",)), "sk-b": Tenant("b", ("tiny",))}
        gw = Gateway(GatewayConfig(agents=[AgentRef("s0", "", "")], tenants=tenants, admin_token="admin-x",
                                   response_cache=cache))
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(gw), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, 30.0)
            gw.adopt_instance("tiny", "s0", engine.url)
            yield gw, url
        finally:
            server.should_exit = True
            thread.join(timeout=15)
    finally:
        engine.close()


def live_run(prompts: Sequence[Prompt], cache: CacheConfig, token_delay_s: float = 0.004,
             reply_tokens: int = 32) -> dict[str, Any]:
    """Send `prompts` (tenant a and b alternately, every third streamed) one after the other; latency by kind."""
    import httpx

    lat: dict[str, list[float]] = {"exact": [], "semantic": [], "miss": []}
    with _live_gateway(cache, token_delay_s, reply_tokens) as (gw, url), httpx.Client(timeout=30) as client:
        for i, p in enumerate(prompts):
            body = {"model": "tiny", "messages": [{"role": "user", "content": p.text}], "temperature": 0,
                    "max_tokens": reply_tokens, "stream": i % 3 == 2}
            t0 = time.perf_counter()
            r = client.post(url + "/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer sk-{'ab'[i % 2]}"})
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"request {i}: HTTP {r.status_code} {r.text[:200]}")
            lat[r.headers.get("x-tierlab-cache", "miss").replace("off", "miss")].append(dt)
        records = gw.records()
    n = len(prompts)

    def ms(v: list[float], q: float | None = None) -> float | None:
        return None if not v else 1e3 * float(np.quantile(v, q) if q is not None else np.mean(v))

    return {"n": n, "exact": len(lat["exact"]), "semantic": len(lat["semantic"]), "miss": len(lat["miss"]),
            "hit_rate": (len(lat["exact"]) + len(lat["semantic"])) / n,
            "miss_ms": ms(lat["miss"]), "miss_p50_ms": ms(lat["miss"], 0.5),
            "exact_ms": ms(lat["exact"]), "exact_p50_ms": ms(lat["exact"], 0.5),
            "semantic_ms": ms(lat["semantic"]), "semantic_p50_ms": ms(lat["semantic"], 0.5),
            "records_cache": records["cache"].value_counts().to_dict(),
            "engine_tokens": int(records.loc[records["cache"] == "", "output_tokens"].sum()),
            "cached_tokens": int(records.loc[records["cache"] != "", "output_tokens"].sum())}


# ------------------------------------------------------------------------------------------ the report


def _f(v: Any, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _sim_section(title: str, overrides: Sequence[str], rows: list[dict[str, Any]]) -> list[str]:
    off = rows[0]
    out = [f"### {title}", "", f"`{' '.join(overrides)}`", "",
           "| variant | exact hits | semantic hits | completed | TTFT mean (s) | TTFT p99 (s) | e2e mean (s) | "
           "GPU-hours | cost ($) | cost saved vs off |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        saved = (off["cost_usd"] - r["cost_usd"]) / off["cost_usd"] if off["cost_usd"] else 0.0
        out.append(f"| {r['variant']} | {_pct(r['exact_rate'])} | {_pct(r['semantic_rate'])} | {r['completed']} | "
                   f"{_f(r['ttft_mean_s'])} | {_f(r['ttft_p99_s'])} | {_f(r['e2e_mean_s'])} | "
                   f"{_f(r['gpu_hours'], '.2f')} | {_f(r['cost_usd'], '.2f')} | {_pct(saved)} |")
    return [*out, ""]


def _unique_line(data: dict[str, Any]) -> str:
    parts = []
    for r in data["sweep_unique"][1:]:
        if r["hit_rate"] > 0:
            parts.append(f"threshold {r['threshold']}: {_pct(r['hit_rate'])} hits, {r['wrong']} of "
                         f"{r['semantic']} wrong")
    return "; ".join(parts) or "no hits at any threshold"


def render(data: dict[str, Any]) -> str:
    """The markdown report from `collect`'s data."""
    n, rep = data["trace_repeats"]
    lines = [
        "# Response and semantic caching at the edge", "",
        "Issue 15 item 3. Generated by `python -m experiments.response_cache` "
        f"(seed {data['seed']}; {data['wall_s']:.0f} s wall). Mechanism: `core/response_cache.py` (exact key + "
        "hashed character-3-gram / word embedding, cosine threshold, TTL, per-tenant LRU partitions), "
        "`live/gateway_cache.py` (gateway option `gateway.response_cache`, off by default), "
        "`core/response_cache_model.py` (the simulator's model).", "",
        f"**The seed's claim:** \"{CLAIM}\".", "",
        "**What tierlab measures:**", "",
        f"- Exact prompt reuse in the Mooncake conversation trace: {rep} of {n} requests ({_pct(rep / n)}) repeat an "
        "earlier prompt (same `hash_ids` and length): the ceiling of an exact cache on it. In the simulator the "
        f"exact cache answers {_pct(data['sim_one'][1]['exact_rate'])} with one model, "
        f"{_pct(data['sim_multi'][1]['exact_rate'])} with the 24-deployment catalog (a repeat only hits if its "
        "request went to the same deployment, and after the first answer completed).",
        "- Semantic hit rates cannot be measured from a trace without prompt text; in the simulator they are a "
        "MODEL (rows marked MODEL), run at the claim's 40 % and 60 % to show what the claim would be worth.",
        f"- On the generated paraphrase set ({data['prompts']} prompts, 22 intents x 5 paraphrases, Zipf "
        f"popularity) the live gateway answered {_pct(data['live']['hit_rate'])} from the cache "
        f"(exact {data['live']['exact']}, semantic {data['live']['semantic']}) at threshold "
        f"{data['live_threshold']}; the offline sweep below shows the hit rate and how many of those hits were "
        "another question's answer. Most of those hits are exact repeats (the set draws 240 times from 110 "
        "distinct prompts).",
        f"- Similarity alone (every distinct prompt asked once, so no exact repeat): {_unique_line(data)}. "
        "The hashed n-gram embedding reaches the claim's 40-60 % only at thresholds where a large share of "
        "the hits answer a different question; at a threshold with few wrong answers it answers ~10 %.", "",
        "## 1. Simulator on the Mooncake trace", "",
        "Smoke scenario's cluster (4 nodes x 8 H100), seed_tiered policy, the whole Mooncake conversation trace "
        "(12,031 requests, 59 min). Exact hits: prompt identity from the trace (`hash_ids` + length, per tenant "
        "and model, TTL 3600 s, stored when the first answer completes). Semantic: `semantic_hit_rate` is the "
        "probability that an exact miss is answered when the tenant has a live entry for the model: a MODEL. A "
        f"hit costs {1e3 * data['latency_s']:.0f} ms of gateway time (assumed) and no GPU. Cost is the run's "
        "GPU + storage + egress cost (`summary.cost_usd`); instances still start for the misses, so the cost "
        "falls less than the hit rate. Every modelled semantic hit is counted as not identical (quality risk "
        "upper bound: the simulator cannot tell right from wrong answers).", "",
        *_sim_section("One model (llama-3.1-8b): every repeat can hit", data["sim_one_overrides"], data["sim_one"]),
        *_sim_section("The multi catalog (24 deployments, Zipf): repeats split across deployments",
                      data["sim_multi_overrides"], data["sim_multi"]),
        "Reading the tables: the exact share falls when the semantic model is on because a request answered by "
        "similarity stores nothing (as in the gateway), so its later repeat may miss. Hit rate is not cost "
        "saved: the cost is the instances' lifetimes under the policy's keep-alive, and a thinner request "
        "stream only saves what lets an instance stop or never start. With one model, the 40 % model lets the "
        f"cluster run fewer engines (GPU-hours {data['sim_one'][0]['gpu_hours']:.2f} -> "
        f"{data['sim_one'][2]['gpu_hours']:.2f}, 60 %: {data['sim_one'][3]['gpu_hours']:.2f}); with 24 "
        "deployments each still needs its engine for its misses, so the saving is small or nil (the difference "
        "is which instances happen to stay alive). Latency gains are larger: "
        "fewer requests queue behind loads and batches (TTFT mean and p99 fall by roughly 40-60 % at the "
        "modelled 40-60 % hit rates), and more "
        "requests complete within the timeout.", "",
        "## 2. Threshold sweep: hit rate vs quality risk (generated set, pure cache)", "",
        f"{data['prompts']} prompts from one tenant. *not identical*: semantic hits whose cached prompt differs "
        "from the one asked (all can be right answers to a paraphrase). *wrong*: semantic hits answered with "
        "another intent's answer (e.g. the capital of Spain for the capital of France): the quality risk.", "",
        "| threshold | hit rate | exact | semantic | not identical | wrong | wrong / hits |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["sweep"]:
        lines.append(f"| {r['threshold']} | {_pct(r['hit_rate'])} | {r['exact']} | {r['semantic']} | "
                     f"{r['semantic_not_identical']} | {r['wrong']} | {_pct(r['wrong_share_of_hits'])} |")
    lines += ["", f"The same with every one of the {len(unique_set())} distinct prompts asked once (shuffled): no "
              "exact repeat, so this is the similarity match alone, the number the claim is about.", "",
              "| threshold | hit rate | semantic | wrong | wrong / hits |", "|---|---|---|---|---|"]
    for r in data["sweep_unique"][1:]:
        lines.append(f"| {r['threshold']} | {_pct(r['hit_rate'])} | {r['semantic']} | {r['wrong']} | "
                     f"{_pct(r['wrong_share_of_hits'])} |")
    lv, rp = data["live"], data["live_replay"]
    lines += [
        "", "The embedding is lexical (hashed n-grams, no model download): paraphrases sharing words match, "
        "and so do different questions that share most words; a low threshold buys hit rate with wrong answers.",
        "", "## 3. Live loopback run", "",
        f"A real gateway (uvicorn, loopback) with `response_cache: {{exact: true, semantic: true, threshold: "
        f"{data['live_threshold']}, ttl_s: 3600}}` over one null-engine process (`--token-delay-s "
        f"{data['token_delay_s']} --reply-tokens {data['reply_tokens']}`: an EMULATED decode time, not a model). "
        f"{lv['n']} requests, one after the other, tenants a and b alternately (each has its own partition), "
        "every third streamed. Latency is the client's, request to last byte.", "",
        "| kind | requests | mean (ms) | p50 (ms) |", "|---|---|---|---|",
        f"| miss (engine) | {lv['miss']} | {_f(lv['miss_ms'], '.1f')} | {_f(lv['miss_p50_ms'], '.1f')} |",
        f"| exact hit | {lv['exact']} | {_f(lv['exact_ms'], '.1f')} | {_f(lv['exact_p50_ms'], '.1f')} |",
        f"| semantic hit | {lv['semantic']} | {_f(lv['semantic_ms'], '.1f')} | {_f(lv['semantic_p50_ms'], '.1f')} |",
        "", f"Hit rate {_pct(lv['hit_rate'])}; engine output tokens {lv['engine_tokens']}, tokens answered from "
        f"the cache {lv['cached_tokens']}; records' `cache` column: {lv['records_cache']}. The same sequence "
        f"through the pure cache: exact {rp['exact']}, semantic {rp['semantic']}, of which "
        f"{rp['semantic_not_identical']} not identical and {rp['wrong']} wrong (another intent's answer).", "",
        "Two tenants each with their own partition hit less than one tenant over the same sequence (the "
        "sweep's one-tenant 0.85 row): isolation costs hits, by design.", "",
        "## Tests", "",
        "- `tests/test_response_cache.py`: TTL, LRU capacity, threshold, scope, tenant isolation (identical "
        "prompt, other tenant: no hit; one tenant filling its partition never evicts another's), which requests "
        "are cacheable, the simulator's model, this report's sweep.",
        "- `tests/live_gateway/test_gateway_cache.py`: real uvicorn gateway + null-engine process; after the "
        "engine is killed, exact (plain and streamed) and semantic hits are still answered (so without it), "
        "with the header, the records' `cache` column, cost 0 and the metrics; another tenant, a sampled request "
        "and other parameters are not; with the cache off (default, or both kinds false) the same request "
        "fails: the test that fails when the mechanism is switched off.",
        "- `tests/test_response_cache_sim.py`: hit rate > 0 and cost down when on; off or disabled, records "
        "identical to a run without it; exact hits from Mooncake prompt identity bounded by the trace's "
        "repeats, fewer when the requests are split over two tenants.", "",
        "## What this does not show", "",
        "- No trace here carries prompt text, so no semantic hit rate is measured on real traffic; the 40-60 % "
        "rows are the claim put into the model, not evidence for it.",
        "- The live engine is the null engine: a miss's latency is the emulated decode, not a real model's; the "
        "hits' latency (gateway only) is real.",
        "- Answer quality is judged by intent labels of a generated set, not by comparing model outputs.", "",
    ]
    return "\n".join(lines)


def collect(seed: int = 0, prompts: int = 240, live_threshold: float = 0.85, latency_s: float = 0.002,
            token_delay_s: float = 0.004, reply_tokens: int = 32, live: bool = True) -> dict[str, Any]:
    """Run the three parts; the data `render` writes."""
    t0 = time.perf_counter()
    one, multi = (*SIM_OVERRIDES, *ONE_MODEL), SIM_OVERRIDES
    data: dict[str, Any] = {"seed": seed, "prompts": prompts, "latency_s": latency_s, "live_threshold": live_threshold,
                            "token_delay_s": token_delay_s, "reply_tokens": reply_tokens,
                            "trace_repeats": trace_repeats(), "sim_one_overrides": one, "sim_multi_overrides": multi,
                            "sim_one": sim_table(one, latency_s, seed), "sim_multi": sim_table(multi, latency_s, seed)}
    ps = prompt_set(prompts, seed)
    data["sweep"] = sweep(ps)
    data["sweep_unique"] = sweep(unique_set(seed))
    cache = CacheConfig(exact=True, semantic=True, threshold=live_threshold, ttl_s=3600.0)
    data["live_replay"] = replay(ps, cache, ("a", "b"))
    empty = {"n": 0, "exact": 0, "semantic": 0, "miss": 0, "hit_rate": 0.0, "records_cache": {},
             "engine_tokens": 0, "cached_tokens": 0}
    data["live"] = live_run(ps, cache, token_delay_s, reply_tokens) if live else {
        **empty, **{k: None for k in ("miss_ms", "miss_p50_ms", "exact_ms", "exact_p50_ms", "semantic_ms",
                                       "semantic_p50_ms")}}
    data["wall_s"] = time.perf_counter() - t0
    return data


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "docs/results/response_cache.md"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=240)
    ap.add_argument("--threshold", type=float, default=0.85, help="the live run's cosine threshold")
    ap.add_argument("--no-live", action="store_true", help="skip the live loopback run")
    a = ap.parse_args(argv)
    data = collect(a.seed, a.prompts, a.threshold, live=not a.no_live)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data))
    (out.with_suffix(".json")).write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {out}: live hit rate {_pct(data['live']['hit_rate'])}, "
          f"trace exact {_pct(data['sim_one'][1]['exact_rate'])}")


if __name__ == "__main__":
    main()
