"""Malformed trace files: `TraceFormatError` must name the file and the 1-based line at fault."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError, TraceFormatError
from core.workload import read_azure_llm, read_mooncake, read_servegen

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"
ROWS = [
    "2023-11-16 18:17:03.9799600,4808,10",
    "2023-11-16 18:17:04.0319600,3180,8",
    "2023-11-16 18:17:04.3520000,110,27",
    "2023-11-16 18:17:05.0000000,7,1",
]


def azure_file(tmp_path: Path, rows: list[str], header: str = HEADER) -> Path:
    # Same framing as the real trace: CRLF, no trailing newline.
    path = tmp_path / "AzureLLMInferenceTrace_test.csv"
    path.write_bytes("\r\n".join([header, *rows]).encode())
    return path


def expect_line(excinfo: pytest.ExceptionInfo[TraceFormatError], path: Path, line: int) -> None:
    err = excinfo.value
    assert (err.path, err.line) == (str(path), line)
    assert str(err).startswith(f"{path}:{line}: ")


# --------------------------------------------------------------------------------------------------- Azure
def test_azure_good_file(tmp_path: Path) -> None:
    wl = read_azure_llm(azure_file(tmp_path, ROWS))
    assert wl.name == "azure_test" and len(wl) == 4
    np.testing.assert_allclose(wl.arrival_s, [0.0, 0.052, 0.37204, 1.02004])
    np.testing.assert_array_equal(wl.prompt_tokens, [4808, 3180, 110, 7])


@pytest.mark.parametrize(
    ("bad_row", "line", "words"),
    [
        ("2023-11-16 18:17:0X.0000000,5,5", 3, "TIMESTAMP"),  # unparseable timestamp
        ("2023-13-16 18:17:04.5000000,5,5", 3, "month"),  # impossible date
        ("2023-11-16 18:17:04.5000000,5", 3, "columns"),  # missing column
        ("2023-11-16 18:17:04.5000000,5,5,5", 3, "columns"),  # extra column
        ("2023-11-16 18:17:04.5000000,abc,5", 3, "ContextTokens"),  # non-numeric
        ("2023-11-16 18:17:04.5000000,12.5,5", 3, "ContextTokens"),  # not an integer
        ("2023-11-16 18:17:04.5000000,5,-3", 3, "GeneratedTokens"),  # negative tokens (fast path)
        ("2023-11-16 18:17:04.5000000,0,3", 3, "ContextTokens"),  # zero tokens
    ],
)
def test_azure_bad_row_at_line_3(tmp_path: Path, bad_row: str, line: int, words: str) -> None:
    path = azure_file(tmp_path, [ROWS[0], bad_row, *ROWS[2:]])
    with pytest.raises(TraceFormatError, match=words) as excinfo:
        read_azure_llm(path)
    expect_line(excinfo, path, line)


def test_azure_negative_tokens_after_blank_line_uses_physical_line(tmp_path: Path) -> None:
    # The blank line forces the row-by-row path; the line number must still count it.
    path = azure_file(tmp_path, [ROWS[0], "", ROWS[1], "2023-11-16 18:17:06.0000000,-4,2"])
    with pytest.raises(TraceFormatError, match="ContextTokens") as excinfo:
        read_azure_llm(path)
    expect_line(excinfo, path, 5)


def test_azure_blank_lines_and_unsorted_rows_are_accepted(tmp_path: Path) -> None:
    path = azure_file(tmp_path, [ROWS[2], "", ROWS[0], ROWS[1], ""])
    wl = read_azure_llm(path)
    np.testing.assert_allclose(wl.arrival_s, [0.0, 0.052, 0.37204])
    np.testing.assert_array_equal(wl.prompt_tokens, [4808, 3180, 110])


def test_azure_bad_header(tmp_path: Path) -> None:
    path = azure_file(tmp_path, ROWS, header="time,prompt,output")
    with pytest.raises(TraceFormatError, match="header") as excinfo:
        read_azure_llm(path)
    expect_line(excinfo, path, 1)


def test_azure_bad_row_deep_in_a_large_file(tmp_path: Path) -> None:
    rows = [f"2023-11-16 18:{m:02d}:{s:02d}.1234567,{1 + s},{2 + m}" for m in range(60) for s in range(60)]
    rows[2500] = rows[2500].replace(".1234567", ".12x4567")
    path = azure_file(tmp_path, rows)
    with pytest.raises(TraceFormatError) as excinfo:
        read_azure_llm(path)
    expect_line(excinfo, path, 2502)


# ------------------------------------------------------------------------------------------------ Mooncake
def mooncake_file(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "toy_trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def rec(ts: float, inp: int = 100, out: int = 10) -> str:
    return json.dumps({"timestamp": ts, "input_length": inp, "output_length": out, "hash_ids": [0, 1]})


def test_mooncake_good_file_sorted_and_in_seconds(tmp_path: Path) -> None:
    wl = read_mooncake(mooncake_file(tmp_path, [rec(0), rec(2500, 7), "", rec(1000, 9)]))
    assert wl.name == "mooncake_toy"
    np.testing.assert_allclose(wl.arrival_s, [0.0, 1.0, 2.5])
    np.testing.assert_array_equal(wl.prompt_tokens, [100, 9, 7])


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ('{"timestamp": 5, "input_length": 3,', "invalid JSON"),
        ('{"timestamp": 5, "input_length": 3}', "output_length"),
        (rec(5, 3, -1), "output_length"),
        (rec(5, 0, 3), "input_length"),
        (rec(-5), "timestamp"),
        ('{"timestamp": "soon", "input_length": 3, "output_length": 3}', "timestamp"),
        ('{"timestamp": 5, "input_length": 2.5, "output_length": 3}', "input_length"),
        ("[1, 2, 3]", "JSON object"),
    ],
)
def test_mooncake_bad_line_2(tmp_path: Path, bad: str, words: str) -> None:
    path = mooncake_file(tmp_path, [rec(0), bad, rec(10)])
    with pytest.raises(TraceFormatError, match=words) as excinfo:
        read_mooncake(path)
    expect_line(excinfo, path, 2)


# ------------------------------------------------------------------------------------------------ ServeGen
GOOD_ROWS = ["0,0,0,,0,0", "600,0.5,1.0,Gamma,1.0,2.0", "1200,0.25,1.2,Weibull,0.8,1.5"]


def servegen_dir(tmp_path: Path, rows: list[str], name: str = "chunk-3-trace.csv") -> Path:
    d = tmp_path / "toy-group"
    d.mkdir(exist_ok=True)
    (d / name).write_text("\n".join(rows) + "\n")
    return d


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ("1800,fast,1.0,Gamma,1.0,2.0", "rate"),  # non-numeric rate
        ("1800,0.5,1.0,Gamma,1.0", "6 columns"),
        ("1800,0.5,1.0,Pareto,1.0,2.0", "pattern"),
        ("1800,-0.5,1.0,Gamma,1.0,2.0", "rate"),
        ("1800,0.5,1.0,Gamma,0,2.0", "shape"),
        ("600,0.5,1.0,Gamma,1.0,2.0", "timestamp"),  # goes back in time
    ],
)
def test_servegen_bad_row_at_line_4(tmp_path: Path, bad: str, words: str) -> None:
    d = servegen_dir(tmp_path, [*GOOD_ROWS, bad])
    with pytest.raises(TraceFormatError, match=words) as excinfo:
        read_servegen(d, seed=0)
    expect_line(excinfo, d / "chunk-3-trace.csv", 4)


def test_servegen_good_toy_dir(tmp_path: Path) -> None:
    d = servegen_dir(tmp_path, GOOD_ROWS)
    wl = read_servegen(d, seed=0)
    assert wl.duration_s == 1800 and set(wl.model) == {"toy-group/client-3"}
    assert np.all((wl.arrival_s >= 600) & (wl.arrival_s < 1800))
    assert np.sum(wl.arrival_s < 1200) == 300 and np.sum(wl.arrival_s >= 1200) == 150


def test_servegen_bad_names_and_empty_dir(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no chunk"):
        read_servegen(empty, seed=0)
    odd = tmp_path / "odd.csv"
    odd.write_text(GOOD_ROWS[1] + "\n")
    with pytest.raises(ConfigError, match=r"chunk-<client_id>-trace\.csv"):
        read_servegen(odd, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        read_servegen(servegen_dir(tmp_path, GOOD_ROWS), seed=-1)
    with pytest.raises(ConfigError, match="rate_scale"):
        read_servegen(servegen_dir(tmp_path, GOOD_ROWS), seed=0, rate_scale=0)
