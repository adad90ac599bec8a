"""Traces shipped inside the package (with their licenses), so default runs need no external data."""

from __future__ import annotations

from pathlib import Path

from core.errors import ConfigError

DATA_DIR = Path(__file__).resolve().parent / "data"

# name -> path under data/ (a file, or a directory for ServeGen groups)
EMBEDDED = {
    "azure_code": "azure_llm_2023/AzureLLMInferenceTrace_code.csv",
    "servegen_deepseek_r1": "servegen_deepseek_r1",
}


def embedded_path(name: str) -> Path:
    """Absolute path of an embedded trace: ``"azure_code"`` (Azure LLM 2023 code CSV) or
    ``"servegen_deepseek_r1"`` (directory of ServeGen client CSVs)."""
    try:
        return DATA_DIR / EMBEDDED[name]
    except KeyError:
        raise ConfigError(f"embedded trace: unknown {name!r}; known: {sorted(EMBEDDED)}") from None
