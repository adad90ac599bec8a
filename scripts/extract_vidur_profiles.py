"""Extract the GPU measurements tierlab's inference model is fitted to from a Vidur checkout.

Vidur (github.com/microsoft/vidur, MIT licence) publishes per-operator GPU profiles: the median kernel time of
every operator of one transformer layer at a number of tokens and a tensor-parallel degree (`mlp.csv`), and
NCCL all-reduce times by buffer size and GPU count (`all_reduce.csv`). This script reads those files and writes
two small tables under docs/results/gpu_profiles/ (a log-spaced subset of token counts and buffer sizes):

- `vidur_layers.csv`: gpu, model, the layer's shape, num_tokens, tp, `layer_s` (the sum of the medians of every
  operator of one layer: norms, QKV / output projections, rotary, MLP up / activation / down, residual add;
  Vidur's attention kernel is profiled separately and is not in it) and `linear_s` (the four projections);
- `vidur_allreduce.csv`: gpu, n_gpus, bytes (Vidur's `size` is fp16 elements: x 2), `time_s` (median).

Usage: python scripts/extract_vidur_profiles.py VIDUR_DIR [--out docs/results/gpu_profiles] [--commit SHA]
`--commit` is only recorded in the output's SOURCE line (the files are read from VIDUR_DIR as they are).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

GPUS = ("h100", "a100")
OPERATORS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
             "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
LINEAR = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
TOKENS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
SHAPE = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp")


def _median_ms(row: pd.Series, op: str) -> float:
    # phi-2 runs attention and MLP in parallel off one norm: it has no post_attention_layernorm column
    return float(row.get(f"time_stats.{op}.median", 0.0) or 0.0)


def layers(vidur: Path) -> pd.DataFrame:
    """One row per (gpu, model, num_tokens, tp) of every `data/profiling/compute/<gpu>/**/mlp.csv`."""
    rows = []
    for gpu in GPUS:
        for path in sorted((vidur / "data/profiling/compute" / gpu).glob("*/*/mlp.csv")):
            model = f"{path.parent.parent.name}/{path.parent.name}"
            table = pd.read_csv(path)
            table = table[table["num_tokens"].isin(TOKENS)].drop_duplicates(["num_tokens",
                                                                              "num_tensor_parallel_workers"])
            for _, r in table.iterrows():
                rows.append({"gpu": gpu, "model": model, **{k: r[k] for k in SHAPE},
                             "num_tokens": int(r["num_tokens"]), "tp": int(r["num_tensor_parallel_workers"]),
                             "layer_s": sum(_median_ms(r, op) for op in OPERATORS) * 1e-3,
                             "linear_s": sum(_median_ms(r, op) for op in LINEAR) * 1e-3})
    return pd.DataFrame(rows).sort_values(["gpu", "model", "tp", "num_tokens"], ignore_index=True)


def allreduce(vidur: Path, per_n: int = 40) -> pd.DataFrame:
    """Rank 0's median all-reduce time of `data/profiling/network/<gpu>_dgx/all_reduce.csv`, GPUs of one node,
    `per_n` log-spaced buffer sizes per GPU count."""
    frames = []
    for gpu in GPUS:
        t = pd.read_csv(vidur / f"data/profiling/network/{gpu}_dgx/all_reduce.csv")
        t = t[(t["rank"] == 0) & (t["num_workers"] <= t["devices_per_node"])]
        for n, g in t.groupby("num_workers"):
            sizes = sorted(g["size"].unique())
            keep = sorted({sizes[round(i * (len(sizes) - 1) / (per_n - 1))] for i in range(per_n)})
            g = g[g["size"].isin(keep)].drop_duplicates("size")
            frames.append(pd.DataFrame({"gpu": gpu, "n_gpus": int(n), "bytes": g["size"].astype(float) * 2,
                                        "time_s": g["time_stats.all_reduce.median"] * 1e-3}))
    return pd.concat(frames).sort_values(["gpu", "n_gpus", "bytes"], ignore_index=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vidur", type=Path, help="a Vidur checkout (its data/profiling folder is read)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/gpu_profiles"))
    ap.add_argument("--commit", default="", help="the checkout's commit, recorded in the output")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lay, ar = layers(args.vidur), allreduce(args.vidur)
    lay.to_csv(args.out / "vidur_layers.csv", index=False, float_format="%.6g")
    ar.to_csv(args.out / "vidur_allreduce.csv", index=False, float_format="%.6g")
    print(f"wrote {len(lay)} layer rows ({lay['model'].nunique()} models x {lay['gpu'].nunique()} GPUs) and "
          f"{len(ar)} all-reduce rows to {args.out} (vidur {args.commit or 'commit not given'})")


if __name__ == "__main__":
    main()
