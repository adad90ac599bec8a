"""The record schema shared by the simulator and the live runtime, and its parquet writer.

Three tables: one row per request, one per tier movement, one per instance lifecycle
change. Sim and live build them with the same functions so rows compare one to one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

OUTCOMES: tuple[str, ...] = ("completed", "rejected", "failed")

#: column -> dtype, in order
REQUEST_SCHEMA: dict[str, str] = {
    "request_id": "int64",
    "tenant": "string",
    "model": "string",
    "arrival_s": "float64",
    "queue_s": "float64",
    "cold_start": "bool",
    "source_tier": "string",  # "gpu" when served warm
    "fetch_s": "float64",  # source tier -> host memory (NaN when none)
    "to_gpu_s": "float64",  # host -> GPU
    "engine_init_s": "float64",  # engine start, KV allocation, capture/compile left on the critical path
    "cold_start_s": "float64",  # the request's extra wait caused by the load
    "prefill_s": "float64",
    "ttft_s": "float64",
    "tpot_s": "float64",
    "e2e_s": "float64",
    "prompt_tokens": "int64",
    "output_tokens": "int64",
    "node": "string",
    "instance": "string",
    "outcome": "string",
    "reason": "string",
    "cost_usd": "float64",
    "cache": "string",  # "" served by an engine; "exact" / "semantic": answered by the response cache (no engine)
    "cached_tokens": "int64",  # prompt tokens served from the instance's prefix (KV) cache, not prefilled (0: none)
    "variant": "string",  # the weight format that served it ("" = the catalog's own; fp8, int8, ...: core/variants.py)
    "client_region": "string",  # where the client is (core/regions.py; "" = regions off)
    "network_s": "float64",  # client <-> serving region round trip, already in ttft_s and e2e_s (NaN = not modelled)
}

MOVE_SCHEMA: dict[str, str] = {
    "time_s": "float64",
    "end_s": "float64",
    "model": "string",
    "node": "string",
    "from_tier": "string",
    "to_tier": "string",
    "kind": "string",
    "bytes": "float64",
    "duration_s": "float64",
}

INSTANCE_SCHEMA: dict[str, str] = {
    "time_s": "float64",
    "instance": "string",
    "model": "string",
    "node": "string",
    "event": "string",  # loading, weights_resident, ready, stopped
    "source_tier": "string",
    "gpus": "int64",
    "gpu_bytes": "float64",
    "weights_bytes": "float64",
    "reason": "string",
}


class SchemaError(ValueError):
    """Columns handed to a table builder do not match the schema."""


def frame(schema: Mapping[str, str], columns: Mapping[str, Sequence[Any] | np.ndarray]) -> pd.DataFrame:
    """Build a table with exactly the schema's columns, in order, with its dtypes."""
    missing = [c for c in schema if c not in columns]
    extra = [c for c in columns if c not in schema]
    if missing or extra:
        raise SchemaError(f"columns missing {missing}, unexpected {extra}")
    data = {}
    for col, dtype in schema.items():
        values = columns[col]
        data[col] = pd.array(np.asarray(values), dtype=dtype) if dtype != "string" else pd.array(
            [str(v) for v in values], dtype="string")
    return pd.DataFrame(data)


def empty(schema: Mapping[str, str]) -> pd.DataFrame:
    return frame(schema, {c: [] for c in schema})


def rows_to_columns(schema: Mapping[str, str], rows: Sequence[Sequence[Any]]) -> dict[str, list[Any]]:
    """Transpose tuples in schema order into columns."""
    cols: dict[str, list[Any]] = {c: [] for c in schema}
    names = list(schema)
    for r in rows:
        if len(r) != len(names):
            raise SchemaError(f"row has {len(r)} values, schema has {len(names)}")
        for c, v in zip(names, r, strict=True):
            cols[c].append(v)
    return cols


def write_tables(out_dir: str | Path, requests: pd.DataFrame, moves: pd.DataFrame,
                 instances: pd.DataFrame) -> dict[str, Path]:
    """Write records.parquet (requests), tier_moves.parquet and instances.parquet into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "requests": out / "records.parquet",
        "moves": out / "tier_moves.parquet",
        "instances": out / "instances.parquet",
    }
    for key, df in (("requests", requests), ("moves", moves), ("instances", instances)):
        write_table(paths[key], df)
    return paths


def write_table(path: str | Path, df: pd.DataFrame) -> Path:
    """Write one table as parquet through a temp name, so a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_suffix(".parquet.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path
