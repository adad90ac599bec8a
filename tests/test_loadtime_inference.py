"""core/loadtime.py and core/inference.py against numbers worked out by hand.

The cluster, engine and measured table are the shipped ones (conf/cluster/small.yaml,
conf/engine/tokasaurus.yaml, conf/inference/measured_example.yaml).
"""

from __future__ import annotations

import dataclasses

import pytest

from core.catalog import architecture
from core.errors import ConfigError
from core.inference import InferenceModel, MeasuredTable, measured_from_dict
from core.loadtime import (
    Hop,
    copy_hop,
    engine_after_weights_s,
    engine_start_s,
    estimate_load_s,
    fetch_hop,
    hop_time_s,
    link_capacities,
    link_streams,
    load_hops,
    progressive_first_token_s,
    to_gpu_hop,
)
from core.spec_builders import cluster_from_dict, engine_from_dict
from tests.conftest import config

_CFG = config("cluster=small", "inference=measured_example", "engine=tokasaurus")  # the formulas by hand
CLUSTER = cluster_from_dict(_CFG["cluster"])
NODE = CLUSTER.nodes[0]
STORE = CLUSTER.store
ENGINE = engine_from_dict(_CFG["engine"])
MEASURED = tuple(measured_from_dict(m, f"inference.measured[{i}]") for i, m in enumerate(_CFG["inference"]["measured"]))

M1 = architecture("llama-3.2-1b")  # 2.48 GB, no compile (< 7B)
M8 = architecture("llama-3.1-8b")  # 16.06 GB
M70 = architecture("llama-3.1-70b")  # 141.2 GB, two GPUs on a small node

CLOUD_BPS = 16 * 93e6  # 1.488 GB/s
SATA_BPS = 0.56e9
NVME_BPS = 7.45e9
H2D_BPS = 35.2e9


def test_shipped_small_cluster_numbers():
    # the hand computations below rely on these
    assert NODE.n_gpus == 2 and NODE.gpu.h2d_Bps == H2D_BPS and NODE.nic_Bps == 8.003e9
    assert NODE.tiers["nvme"].read_bw_Bps == NVME_BPS and NODE.tiers["sata"].read_bw_Bps == SATA_BPS
    assert STORE.streams * STORE.per_stream_Bps == pytest.approx(CLOUD_BPS) and STORE.ttfb_s == 0.02
    assert ENGINE.process_start_s == 4.0 and ENGINE.graph_capture_s == 2.0 and ENGINE.compile_s == 40.0
    assert ENGINE.kv_alloc_Bps == 400e9 and ENGINE.overlap_start_with_fetch


# =========================================================================== loadtime: hops
def test_link_capacities_and_streams():
    caps = link_capacities(NODE)
    assert caps == {
        "nic": 8.003e9, "pcie": 2 * H2D_BPS,
        "dram_r": 50e9, "dram_w": 50e9, "nvme_r": NVME_BPS, "nvme_w": 6.9e9, "sata_r": SATA_BPS, "sata_w": 0.52e9,
    }
    assert link_streams(NODE) == {f"{t}_{d}": 64 for t in ("dram", "nvme", "sata") for d in "rw"}


def test_cloud_fetch_crosses_the_nic_capped_at_streams_times_per_stream_after_ttfb():
    hop = fetch_hop("cloud", M8, NODE, STORE)
    assert hop == Hop("fetch", "cloud", "host", ("nic",), M8.weights_bytes, CLOUD_BPS, 0.02)


def test_cloud_fetch_cap_follows_the_store():
    store = dataclasses.replace(STORE, streams=4, per_stream_Bps=50e6, ttfb_s=0.1)
    hop = fetch_hop("cloud", M8, NODE, store)
    assert hop.cap_Bps == 200e6 and hop.latency_s == 0.1


@pytest.mark.parametrize(("tier", "bw", "lat"), [("nvme", NVME_BPS, 1e-4), ("sata", SATA_BPS, 1e-4)])
def test_local_fetch_reads_the_tier(tier, bw, lat):
    hop = fetch_hop(tier, M8, NODE, STORE)
    assert hop == Hop("fetch", tier, "host", (f"{tier}_r",), M8.weights_bytes, bw, lat)


def test_dram_has_no_fetch_hop():
    assert fetch_hop("dram", M8, NODE, STORE) is None
    hops = load_hops("dram", M8, NODE, STORE, 1)
    assert [h.phase for h in hops] == ["to_gpu"]


@pytest.mark.parametrize("n_gpus", [1, 2])
def test_to_gpu_over_pcie_capped_at_n_gpus_times_h2d(n_gpus):
    hop = to_gpu_hop(M70, NODE, n_gpus)
    assert hop == Hop("to_gpu", "host", "gpu", ("pcie",), M70.weights_bytes, n_gpus * H2D_BPS, 0.0)


@pytest.mark.parametrize("tier", ["cloud", "nvme", "sata"])
def test_load_hops_are_fetch_then_to_gpu(tier):
    hops = load_hops(tier, M8, NODE, STORE, 1)
    assert [(h.phase, h.src, h.dst) for h in hops] == [("fetch", tier, "host"), ("to_gpu", "host", "gpu")]
    assert all(h.nbytes == M8.weights_bytes for h in hops)


def test_copy_hops():
    c = copy_hop("cloud", "sata", M8, NODE, STORE)
    assert (c.links, c.cap_Bps, c.latency_s) == (("nic", "sata_w"), pytest.approx(CLOUD_BPS), 0.02)
    g = copy_hop("gpu", "nvme", M8, NODE, STORE)
    assert (g.links, g.cap_Bps, g.latency_s) == (("pcie", "nvme_w"), H2D_BPS, 0.0)
    t = copy_hop("sata", "nvme", M8, NODE, STORE)
    assert (t.links, t.cap_Bps, t.latency_s) == (("sata_r", "nvme_w"), float("inf"), 1e-4)
    assert (t.src, t.dst, t.phase, t.nbytes) == ("sata", "nvme", "copy", M8.weights_bytes)
    h = copy_hop("host", "dram", M8, NODE, STORE)  # weights already staged in host memory: write only
    assert (h.links, h.cap_Bps, h.latency_s) == (("dram_w",), float("inf"), 0.0)
    # the tighter link bounds a tier-to-tier copy on idle links
    assert hop_time_s(t, link_capacities(NODE)) == pytest.approx(1e-4 + M8.weights_bytes / SATA_BPS)


def test_hop_time_is_latency_plus_bytes_over_tightest_of_cap_and_links():
    caps = {"a": 100.0, "b": 50.0}
    assert hop_time_s(Hop("x", "s", "d", ("a",), 1000.0, float("inf"), 0.5), caps) == 10.5
    assert hop_time_s(Hop("x", "s", "d", ("a", "b"), 1000.0, float("inf"), 0.0), caps) == 20.0
    assert hop_time_s(Hop("x", "s", "d", ("a", "b"), 1000.0, 25.0, 0.0), caps) == 40.0


def test_cloud_fetch_time_on_the_shipped_numbers():
    caps = link_capacities(NODE)
    # the NIC (8 GB/s) is not the bottleneck: 16 streams x 93 MB/s are
    assert hop_time_s(fetch_hop("cloud", M8, NODE, STORE), caps) == pytest.approx(0.02 + 16.06e9 / 1.488e9)
    assert hop_time_s(fetch_hop("sata", M8, NODE, STORE), caps) == pytest.approx(1e-4 + 16.06e9 / 0.56e9)


# =========================================================================== loadtime: estimates
def _est(tier, model=M8, n=1, engine=ENGINE, progressive=False, kv=None):
    kv = model.weights_bytes * engine.kv_reserve_frac if kv is None else kv
    return estimate_load_s(tier, model, NODE, STORE, engine, n, kv, progressive)


def test_estimate_load_by_hand_8b():
    kv = 8.03e9
    after = kv / 400e9 + 2.0 + 40.0  # KV allocation, graph capture, compile (8B >= 7B)
    to_gpu = 16.06e9 / 35.2e9
    assert _est("dram", kv=kv) == pytest.approx(4.0 + after)  # 0.46 s of copy hides under the 4 s start
    assert _est("nvme", kv=kv) == pytest.approx(4.0 + after)  # 2.6 s: still hidden
    assert _est("sata", kv=kv) == pytest.approx(1e-4 + 16.06e9 / 0.56e9 + to_gpu + after)
    assert _est("cloud", kv=kv) == pytest.approx(0.02 + 16.06e9 / 1.488e9 + to_gpu + after)


def test_estimate_load_by_hand_70b_on_two_gpus():
    kv = 2.8e9
    after = kv / 400e9 + 42.0
    to_gpu = 141.2e9 / 70.4e9
    assert _est("dram", M70, n=2, kv=kv) == pytest.approx(4.0 + after)
    assert _est("nvme", M70, n=2, kv=kv) == pytest.approx(1e-4 + 141.2e9 / 7.45e9 + to_gpu + after)
    # one GPU's worth of PCIe would be twice as slow
    assert _est("dram", M70, n=1, kv=kv, engine=dataclasses.replace(ENGINE, process_start_s=0.0)) == pytest.approx(
        141.2e9 / 35.2e9 + after)


@pytest.mark.parametrize("model", [M8, M70])
def test_estimate_orders_local_tiers(model):
    n = 2 if model is M70 else 1
    dram, nvme, sata = (_est(t, model, n) for t in ("dram", "nvme", "sata"))
    # engine start (4 s) overlaps the transfer, so a small model ties between DRAM and NVMe
    assert dram <= nvme < sata
    no_overlap = dataclasses.replace(ENGINE, overlap_start_with_fetch=False)
    d2, n2, s2 = (_est(t, model, n, engine=no_overlap) for t in ("dram", "nvme", "sata"))
    assert d2 < n2 < s2


def test_estimate_dram_strictly_below_nvme_when_the_transfer_outlasts_engine_start():
    assert _est("dram", M70, 2) < _est("nvme", M70, 2)


@pytest.mark.parametrize(("model", "n"), [(M1, 1), (M8, 1), (M70, 2)])
def test_cloud_is_faster_than_sata_on_the_small_cluster(model, n):
    # a real finding: 16 x 93 MB/s = 1.488 GB/s of S3 beats a 0.56 GB/s SATA SSD,
    # so "load from the fastest local tier" is not always the fastest load
    caps = link_capacities(NODE)
    assert hop_time_s(fetch_hop("cloud", model, NODE, STORE), caps) < hop_time_s(
        fetch_hop("sata", model, NODE, STORE), caps)
    assert _est("cloud", model, n) < _est("sata", model, n)
    # NVMe is faster still; for the 1B model both hide behind the 4 s engine start and tie
    assert _est("nvme", model, n) <= _est("cloud", model, n)
    if model is not M1:
        assert _est("nvme", model, n) < _est("cloud", model, n)


def test_cloud_slower_than_sata_when_streams_are_few():
    store = dataclasses.replace(STORE, streams=4)  # 372 MB/s
    e = estimate_load_s
    kv = M8.weights_bytes / 2
    assert e("cloud", M8, NODE, store, ENGINE, 1, kv) > e("sata", M8, NODE, store, ENGINE, 1, kv)


def test_engine_start_overlaps_the_transfer_only_when_allowed():
    kv = 8.03e9
    transfer = 1e-4 + 16.06e9 / 7.45e9 + 16.06e9 / 35.2e9
    after = kv / 400e9 + 42.0
    slow_start = dataclasses.replace(ENGINE, process_start_s=10.0)
    assert engine_start_s(slow_start) == 10.0
    assert _est("nvme", engine=slow_start, kv=kv) == pytest.approx(10.0 + after)
    serial = dataclasses.replace(slow_start, overlap_start_with_fetch=False)
    assert _est("nvme", engine=serial, kv=kv) == pytest.approx(10.0 + transfer + after)


def test_engine_after_weights():
    kv = 40e9
    assert engine_after_weights_s(M8, ENGINE, kv, progressive=False) == pytest.approx(0.1 + 2.0 + 40.0)
    # progressive loading defers capture and compile past the first token
    assert engine_after_weights_s(M8, ENGINE, kv, progressive=True) == pytest.approx(0.1)
    # no compile below compile_min_params_b
    assert engine_after_weights_s(M1, ENGINE, kv, progressive=False) == pytest.approx(0.1 + 2.0)
    at_threshold = dataclasses.replace(M1, params_b=7.0)
    assert engine_after_weights_s(at_threshold, ENGINE, 0.0, progressive=False) == pytest.approx(42.0)


def test_progressive_estimate_drops_capture_and_compile():
    kv = 8.03e9
    assert _est("nvme", kv=kv) - _est("nvme", kv=kv, progressive=True) == pytest.approx(42.0)


@pytest.mark.parametrize(
    ("ready", "compute", "start", "expected"),
    [
        ([1.0, 2.0, 3.0], 0.5, 0.0, 3.5),  # transfer-bound: each layer computed as soon as it lands
        ([1.0, 2.0, 3.0], 2.0, 0.0, 7.0),  # compute-bound after the first layer: 1 + 3 x 2
        ([1.0, 2.0, 3.0], 0.5, 10.0, 11.5),  # engine not ready until 10: all layers resident, 3 x 0.5
        ([0.0, 0.0, 5.0, 5.1], 1.0, 0.0, 7.0),  # 0->1, 1->2, wait for 5 -> 6, 6 -> 7
        ([], 1.0, 4.0, 4.0),
    ],
)
def test_progressive_first_token(ready, compute, start, expected):
    assert progressive_first_token_s(ready, compute, start) == pytest.approx(expected)


def test_progressive_first_token_never_beats_last_layer_plus_its_compute():
    ready = [0.3 * (i + 1) for i in range(32)]
    t = progressive_first_token_s(ready, 0.01, 0.0)
    assert t == pytest.approx(ready[-1] + 0.01)
    assert t < ready[-1] + 32 * 0.01  # overlap: far less than "all weights, then the whole pass"


# =========================================================================== inference: roofline
H100 = NODE.gpu


def _inf(model=M8, n=1, measured=()):
    return InferenceModel(model, H100, n, ENGINE, measured)


# the roofline's structure (dense / attention / logits / all-reduce): tests/test_inference_structure.py


# =========================================================================== inference: measured tables
def test_shipped_measured_table():
    (t,) = MEASURED
    assert (t.engine, t.model, t.gpu) == ("tokasaurus", "llama-3.1-8b", "H100-80GB")
    assert t.decode_batch == (1, 64, 256) and t.decode_iter_s == (0.008, 0.012, 0.025)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.1-8b/ft-3"])
def test_measured_table_overrides_roofline_for_model_or_base(name):
    im = _inf(architecture("llama-3.1-8b", name), measured=MEASURED)
    assert im.prefill_s(1000) == pytest.approx(1000 / 20000.0)
    assert im.decode_iter_s(1, 0) == pytest.approx(0.008)
    assert im.decode_iter_s(64, 1e6) == pytest.approx(0.012)  # context plays no part in a measured table
    assert im.decode_iter_s(256, 0) == pytest.approx(0.025)


def test_measured_table_interpolates_and_extrapolates():
    im = _inf(measured=MEASURED)
    assert im.decode_iter_s(32, 0) == pytest.approx(0.008 + 0.004 * 31 / 63)
    assert im.decode_iter_s(160, 0) == pytest.approx(0.012 + 0.013 * 96 / 192)
    # beyond the last point: along the last segment
    assert im.decode_iter_s(512, 0) == pytest.approx(0.025 + 0.013 / 192 * 256)
    t = MEASURED[0]
    assert t.iter_s(-5) == 0.008  # clamped below the first point


def test_single_point_table_is_constant():
    t = MeasuredTable("tokasaurus", "m", "g", 1.0, (8,), (0.01,))
    assert t.iter_s(1) == t.iter_s(8) == t.iter_s(1000) == 0.01


@pytest.mark.parametrize(
    "change",
    [
        {"engine": "vllm"},
        {"gpu": "A100-80GB"},
        {"model": "llama-3.2-1b"},
    ],
)
def test_measured_table_ignored_unless_engine_model_and_gpu_match(change):
    table = dataclasses.replace(MEASURED[0], **change)
    im = _inf(measured=(table,))
    assert im.prefill_s(1000) == pytest.approx(_inf().prefill_s(1000))
    assert im.decode_iter_s(64, 5000) == pytest.approx(_inf().decode_iter_s(64, 5000))


def test_first_matching_table_wins():
    other = dataclasses.replace(MEASURED[0], model="llama-3.1-8b/ft-0", prefill_tokens_per_s=5000.0)
    im = _inf(architecture("llama-3.1-8b", "llama-3.1-8b/ft-0"), measured=(other, MEASURED[0]))
    assert im.prefill_s(1000) == pytest.approx(0.2)


_GOOD = {"engine": "tokasaurus", "model": "m", "gpu": "H100-80GB", "prefill_tokens_per_s": 100.0,
         "decode_batch": [1, 4], "decode_iter_s": [0.01, 0.02]}


def test_measured_from_dict_builds_a_table():
    t = measured_from_dict(_GOOD, "inference.measured[0]")
    assert t == MeasuredTable("tokasaurus", "m", "H100-80GB", 100.0, (1, 4), (0.01, 0.02))


@pytest.mark.parametrize("field", sorted(_GOOD))
def test_measured_from_dict_names_a_missing_field(field):
    data = {k: v for k, v in _GOOD.items() if k != field}
    with pytest.raises(ConfigError, match=rf"inference\.measured\[2\]: missing field '{field}'"):
        measured_from_dict(data, "inference.measured[2]")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"decode_batch": [4, 1]}, "decode_batch must be strictly increasing"),
        ({"decode_batch": [1, 1]}, "decode_batch must be strictly increasing"),
        ({"decode_batch": [1, 2, 3]}, "as long as decode_iter_s"),
        ({"decode_batch": [], "decode_iter_s": []}, "decode_batch"),
        ({"prefill_tokens_per_s": 0}, "prefill_tokens_per_s"),
        ({"decode_iter_s": [0.01, -0.02]}, "decode_iter_s must be positive"),
    ],
)
def test_measured_from_dict_rejects_bad_tables(change, match):
    with pytest.raises(ConfigError, match=match) as exc:
        measured_from_dict({**_GOOD, **change}, "inference.measured[1]")
    assert "inference.measured[1]" in str(exc.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [({"prefill_tokens_per_s": "fast"}, "prefill_tokens_per_s"), ({"decode_batch": 5}, "decode_batch")],
)
def test_measured_from_dict_names_a_non_numeric_field(change, field):
    with pytest.raises(ConfigError, match=rf"inference\.measured\[0\].*{field}"):
        measured_from_dict({**_GOOD, **change}, "inference.measured[0]")


def test_measured_table_never_extrapolates_downwards_and_rejects_impossible_steps():
    noisy = MeasuredTable("e", "m", "g", 1000.0, (1, 2), (0.004, 0.00002))  # batch 2 measured absurdly fast
    assert noisy.iter_s(3) == noisy.iter_s(64) == 0.00002  # flat beyond the table, never negative
    rising = MeasuredTable("e", "m", "g", 1000.0, (1, 2), (0.004, 0.005))
    assert rising.iter_s(4) == pytest.approx(0.007)
    bad = {"engine": "e", "model": "m", "gpu": "g", "prefill_tokens_per_s": 1000, "decode_batch": [1, 2],
           "decode_iter_s": [1.25e-10, 0.004]}
    with pytest.raises(ConfigError, match=r"inference.measured\[0\].decode_iter_s: 1.25e-10 s is below"):
        measured_from_dict(bad, "inference.measured[0]")
