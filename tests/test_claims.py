"""The seed-claims audit (experiments/claims.py): the small report, its verdict rules and its commands.

The small report is generated for real once per module (about 30-50 s on two cores): every scenario runs
its simulations, so a row that cannot be produced fails here, not in CI's own regeneration only.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shlex
import shutil
from pathlib import Path

import pytest

from core.errors import ConfigError
from experiments import claims as cl
from experiments import claims_base as base
from experiments import claims_cost as cost
from experiments import claims_rules as rules


@pytest.fixture(scope="module")
def small_report(tmp_path_factory) -> tuple[Path, list[base.ClaimResult]]:
    out = tmp_path_factory.mktemp("claims")
    results, doc = cl.run(base.SMALL, out, progress=False)
    assert doc == out / "claims.md"
    return out, results


def _table_rows(doc: str) -> list[list[str]]:
    """The summary table's rows, split into cells (escaped pipes kept inside their cell)."""
    table = doc.split("| claim | scenario |", 1)[1].split("\n\n", 1)[0]
    rows = [ln for ln in table.splitlines()[2:] if ln.startswith("| ")]
    return [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in rows]


# ============================================================================ the small report
def test_small_report_has_a_row_per_claim_with_a_verdict_command_and_figure(small_report):
    out, results = small_report
    rows = _table_rows((out / "claims.md").read_text())
    assert [r[0] for r in rows] == list(base.CLAIMS.values())
    for (_claim, scenario, measured, verdict, command, figure), res in zip(rows, results, strict=True):
        assert scenario and measured
        assert verdict.startswith("**") and verdict.endswith("**")
        v = verdict.strip("*")
        assert v == res.verdict and rules.verdict_kind(v) in base.VERDICTS
        assert v in ("holds", "fails") or (v.startswith("holds only if ") and len(v) > len("holds only if  "))
        assert command == f"`{res.command}`"
        path = out / re.fullmatch(r"\[[^\]]+\]\(([^)]+)\)", figure).group(1)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    # every claim has its section with the rule, the evidence and the command again
    doc = (out / "claims.md").read_text()
    for i, res in enumerate(results, 1):
        section = doc.split(f"## {i}. {res.claim}\n", 1)[1].split("\n## ", 1)[0]
        assert f"**Verdict: {res.verdict}.** Rule: {res.rule}." in section
        assert f"Regenerate: `{res.command}`" in section and res.evidence and res.assumptions


def test_each_rows_command_is_a_real_command_for_that_row(small_report):
    out, results = small_report
    parser = cl.build_parser()
    for res in results:
        argv = shlex.split(res.command)
        assert argv[:3] == ["python", "-m", base.MODULE]
        assert importlib.util.find_spec(argv[2]) is not None
        args = parser.parse_args(argv[3:])
        assert (args.small, args.out, args.claim) == (True, out, [res.key])


def test_verdicts_follow_the_rules_on_the_stored_numbers(small_report):
    _, results = small_report
    by_key = {r.key: r for r in results}
    for key, value, bound in [("cold_start_speedup", "speedup", "cold_start_speedup"),
                              ("storage_cost", "saving", "storage_saving"),
                              ("memory_waste", "memory_waste_frac", "memory_waste_frac"),
                              ("throughput", "ratio", "throughput_ratio"),
                              ("semantic_cache", "hit_rate", "cache_hit_rate"),
                              ("quantised_variants", "reduction", "variant_memory_reduction"),
                              ("kv_quantisation", "kv_capacity_ratio", "kv_capacity_ratio"),
                              ("speculative_decoding", "speedup", "spec_speedup")]:
        res = by_key[key]
        assert (rules.verdict_kind(res.verdict) == "holds") == rules.BOUNDS[bound].ok(res.values[value]), key
    edge = by_key["edge_routing"].values
    assert (rules.verdict_kind(by_key["edge_routing"].verdict) == "holds") == (
        rules.BOUNDS["edge_sites"].ok(edge["edge_sites"]) and rules.BOUNDS["rtt_under_100ms_share"].ok(
            edge["share_rtt_under_100ms"]))
    pool = by_key["memory_pooling"].values
    assert (rules.verdict_kind(by_key["memory_pooling"].verdict) == "holds") == (
        rules.BOUNDS["pooled_memory_waste_frac"].ok(pool["memory_waste_frac"])
        and rules.BOUNDS["slo_attainment_change"].ok(pool["slo_change"]))
    spot = by_key["spot_cost"].values["saving_at_70"]
    assert (rules.verdict_kind(by_key["spot_cost"].verdict) == "holds") == all(
        rules.BOUNDS["spot_saving"].ok(x) for x in spot.values())


def test_results_file_renders_the_report_and_no_temp_file_is_left(small_report):
    out, _ = small_report
    settings, rows = cl.load_results(out)
    assert settings == "small" and list(rows) == list(base.CLAIMS)
    assert (out / "claims.md").read_text() == cl.render(list(rows.values()), "small")
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def test_rerunning_one_claim_keeps_the_other_rows(small_report, tmp_path, capsys):
    src, _ = small_report
    out = tmp_path / "report"
    shutil.copytree(src, out)
    before = json.loads(cl.results_path(out).read_text())["results"]
    cl.main(["--small", "--out", str(out), "--claim", "tier_access"])
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1
    assert re.fullmatch(rf"{len(base.CLAIMS)} claims: \d+ hold, \d+ fail, \d+ hold only if \.\.\. "
                        rf"\(reran tier_access\); wrote "
                        rf"{re.escape(str(out / 'claims.md'))} in \d+ s", line[0]), line[0]
    after = json.loads(cl.results_path(out).read_text())["results"]
    assert [r["key"] for r in after] == list(base.CLAIMS)
    assert [r for r in after if r["key"] != "tier_access"] == [r for r in before if r["key"] != "tier_access"]


def test_a_row_of_other_settings_is_not_merged_into_a_report(small_report, tmp_path, capsys):
    src, _ = small_report
    out = tmp_path / "report"
    shutil.copytree(src, out)
    doc = (out / "claims.md").read_bytes()
    with pytest.raises(SystemExit) as exc:
        cl.main(["--out", str(out), "--claim", "tier_access"])  # full settings into a small report
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "claims.json" in err and "small report" in err
    assert (out / "claims.md").read_bytes() == doc


def test_unknown_claim_and_corrupt_results_are_reported(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cl.build_parser().parse_args(["--claim", "speed"])
    assert exc.value.code == 2 and "invalid choice: 'speed'" in capsys.readouterr().err
    bad = cl.results_path(tmp_path)
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(SystemExit):
        cl.main(["--small", "--out", str(tmp_path), "--claim", "tier_access"])
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "claims.md").exists()


def test_committed_report_is_the_rendering_of_its_results():
    settings, rows = cl.load_results(base.DOCS)
    assert settings == "full", "regenerate with: python -m experiments.claims"
    assert list(rows) == list(base.CLAIMS)
    assert (base.DOCS / "claims.md").read_text() == cl.render(list(rows.values()), "full")
    for res in rows.values():
        assert (base.DOCS / res.figure).is_file(), res.figure
        assert res.command == f"python -m experiments.claims --claim {res.key}"


# ============================================================================ verdict rules
@pytest.mark.parametrize(("bound", "inside", "outside"), [
    (rules.Bound(below=0.04), 0.0399, 0.04),
    (rules.Bound(at_most=15.0), 15.0, 15.001),
    (rules.Bound(at_least=0.54), 0.54, 0.5399),
    (rules.Bound(at_least=180.0, at_most=300.0), 180.0, 179.99),
    (rules.Bound(at_least=180.0, at_most=300.0), 300.0, 300.01),
])
def test_bound_flips_at_its_threshold(bound, inside, outside):
    assert bound.ok(inside) and not bound.ok(outside)
    assert not bound.ok(None) and not bound.ok(math.nan)


def test_verdict_names_conditions_only_when_the_scenario_itself_fails():
    assert rules.verdict(True, ["x"]) == "holds"
    assert rules.verdict(False, []) == "fails"
    assert rules.verdict(False, ["a"]) == "holds only if a"
    many = rules.verdict(False, ["a", "b", "c", "d"])
    assert many == "holds only if a; or b; or 2 more conditions of the sweep"
    assert rules.verdict_kind(many) == "holds only if"
    with pytest.raises(ValueError):
        rules.verdict_kind("mostly")


@pytest.mark.parametrize(("key", "passing", "failing"), [
    ("cold_start_speedup", 6.0, 5.999),
    ("spot_saving", 0.54, 0.539),
    ("storage_saving", 0.40, 0.399),
    ("memory_waste_frac", 0.0399, 0.04),
    ("throughput_ratio", 24.0, 23.9),
])
def test_single_number_rules_flip_at_the_claims_threshold(key, passing, failing):
    assert rules.rule_at_reference(key, passing, []) == "holds"
    assert rules.rule_at_reference(key, failing, []) == "fails"
    assert rules.rule_at_reference(key, failing, [("c1", failing), ("c2", passing)]) == "holds only if c2"
    assert rules.rule_at_reference(key, None, [("c", passing)]) == "holds only if c"


def test_tier_access_rule():
    sizes = [1.0, 2.0, 4.0, 8.0]
    assert rules.largest_within(sizes, [0.5, 1.0, 1.99, 2.5], rules.BOUNDS["access_nvme_s"]) == 4.0
    assert rules.largest_within(sizes, [0.5, 3.0, 1.0, 1.0], rules.BOUNDS["access_nvme_s"]) == 1.0  # a prefix only
    assert rules.largest_within(sizes, [2.0, 1.0, 1.0, 1.0], rules.BOUNDS["access_nvme_s"]) is None
    full = {"gpu": 70.6, "nvme": 70.6, "sata": 70.6, "cloud": 70.6}
    assert rules.rule_tier_access(full, 70.6) == "holds"
    assert rules.rule_tier_access({**full, "nvme": 6.1}, 70.6) == "holds only if models <= 6.1 B params from nvme"
    assert rules.rule_tier_access({**full, "sata": None}, 70.6) == "fails"


def test_cold_start_rule_needs_both_ends_in_the_same_scenario():
    assert rules.rule_cold_start(180.0, 15.0, []) == "holds"
    assert rules.rule_cold_start(179.0, 15.0, []) == "fails"
    assert rules.rule_cold_start(240.0, 15.1, []) == "fails"
    assert rules.rule_cold_start(240.0, None, []) == "fails"
    sweep = [("mvp only", 200.0, 30.0), ("prod only", 60.0, 9.0), ("both", 250.0, 8.0)]
    assert rules.rule_cold_start(60.0, 30.0, sweep) == "holds only if both"


def test_availability_rule_needs_a_measured_fast_recovery():
    assert rules.rule_availability(0.999, 1.99, []) == "holds"
    assert rules.rule_availability(0.99899, 1.0, []) == "fails"
    assert rules.rule_availability(1.0, 2.0, []) == "fails"
    assert rules.rule_availability(1.0, None, []) == "fails"  # no failover happened: nothing to judge
    assert rules.rule_availability(1.0, 30.0, [("slow", 1.0, 30.0), ("fast", 0.9995, 1.0)]) == "holds only if fast"


def test_feature_rules_need_every_part():
    assert rules.rule_edge_routing(22, 0.99, []) == "holds"
    assert rules.rule_edge_routing(19, 1.0, []) == "fails"  # too few sites, however close
    assert rules.rule_edge_routing(22, 0.9, [("few", 5, 1.0), ("near", 25, 0.995)]) == "holds only if near"
    assert rules.rule_memory_pooling(0.039, -0.005, []) == "holds"
    assert rules.rule_memory_pooling(0.01, -0.02, []) == "fails"  # the waste is gone but SLOs were lost
    assert rules.rule_memory_pooling(0.05, 0.1, [("pooled", 0.0, 0.0)]) == "holds only if pooled"


def test_feature_rows_measure_their_mechanism(small_report):
    """Each feature row measures the mechanism against the scenario without it: pooling and elastic KV cut the
    default's waste, the trace's exact hit rate is far below the modelled semantic ones, region-blind routing
    puts fewer requests within 100 ms, and the 8-bit formats, the FP8 KV cache and speculation change bytes,
    KV tokens and TPOT in the direction their mechanism says."""
    _, results = small_report
    by_key = {r.key: r.values for r in results}
    pool = by_key["memory_pooling"]
    assert pool["default_memory_waste_frac"] > 0.2 > pool["memory_waste_frac"]
    cache = by_key["semantic_cache"]
    assert 0 < cache["hit_rate"] < 0.05 and cache["hit_rate"] < cache["modelled"]["0.2"] < cache["modelled"]["0.6"]
    edge = by_key["edge_routing"]
    assert edge["edge_sites"] >= 20 and edge["share_rtt_under_100ms"] > 2 * edge["blind_share_rtt_under_100ms"]
    variants = by_key["quantised_variants"]
    assert 1.5 < variants["reduction"] < 2.0 <= variants["with_embeddings"]["fp8"]
    assert by_key["kv_quantisation"]["kv_capacity_ratio"] == pytest.approx(2.0)
    spec = by_key["speculative_decoding"]
    assert 1.5 < spec["speedup"] < spec["speedup_high"] and spec["alpha_for_2p8"] > 0.6


def test_storage_saving_and_spot_share_helpers():
    p = base.TIER_PRICE_USD_PER_GB_MONTH["nvme"]
    # 10 GB-months on NVMe + 10 on SATA vs 20 on NVMe, no object store: saving = (1 - r) / 2
    for r in (0.0, 0.5, 1.0):
        assert cost.storage_saving({"nvme": 10.0, "sata": 10.0}, 20 * p, 0.0, r) == pytest.approx((1 - r) / 2)
    assert cost._share_for([0.0, 0.5, 1.0], [0.0, 0.4, 0.8], 0.54) == pytest.approx(0.675)
    assert cost._share_for([0.0, 1.0], [0.0, 0.5], 0.54) is None


def test_reference_ids_are_read_from_the_shared_file():
    p5 = base.reference("aws_p5_48xl_pre2025cut")
    assert p5["od_per_hour"] > p5["spot_per_hour"][1] > p5["spot_per_hour"][0] > 0
    with pytest.raises(ConfigError, match="no entry with id 'nope'"):
        base.reference("nope")
