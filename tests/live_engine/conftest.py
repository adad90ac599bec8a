"""Fixtures for the CPU engine tests: tiny random Llama checkpoints in the real Hugging Face layout.

The generator lives here (not in live/) so these tests depend on nothing but the engine itself.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

LIVE_DEPS = ("torch", "safetensors", "tokenizers", "starlette", "uvicorn", "httpx", "openai")
MISSING_DEPS = [name for name in LIVE_DEPS if importlib.util.find_spec(name) is None]
if MISSING_DEPS:
    # the live extra (pip install -e ".[live]") is absent: skip this folder instead of failing collection
    collect_ignore_glob = ["test_*.py"]

    def pytest_report_header() -> str:
        return f"tests/live_engine skipped: missing {', '.join(MISSING_DEPS)} (pip install -e '.[live]')"
else:
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Serverless inference loads a model when the first request arrives.",
    "Weights move from object storage to NVMe, to host memory, to the GPU.",
    "A cold start is the time until the first token reaches the user.",
    "Progressive loading computes layer one while layer two is still in flight.",
    "hello world, hello tierlab, hello llama",
]
BOS, EOS = "<s>", "</s>"


def train_tokenizer(path: Path, vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE (like Llama 3's) trained on a few sentences; ids 0 and 1 are <s> and </s>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES * 4, trainer)
    tokenizer.save(str(path))
    return tokenizer


def make_checkpoint(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 256,
    rope_theta: float = 10000.0,
    dtype: torch.dtype | None = None,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Write config.json, tokenizer.json and model.safetensors of a random Llama into out_dir."""
    dtype = dtype or torch.float32
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(out_dir / "tokenizer.json")
    vocab_size = tokenizer.get_vocab_size()
    bos_id, eos_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    head_dim = hidden_size // num_attention_heads
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm() -> torch.Tensor:
        return 1.0 + randn(hidden_size, std=0.1)

    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": randn(vocab_size, hidden_size, std=1.0)}
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": randn(num_attention_heads * head_dim, hidden_size, std=0.2),
            p + "self_attn.k_proj.weight": randn(num_key_value_heads * head_dim, hidden_size, std=0.2),
            p + "self_attn.v_proj.weight": randn(num_key_value_heads * head_dim, hidden_size, std=0.2),
            p + "self_attn.o_proj.weight": randn(hidden_size, num_attention_heads * head_dim, std=0.1),
            p + "post_attention_layernorm.weight": norm(),
            p + "mlp.gate_proj.weight": randn(intermediate_size, hidden_size, std=0.15),
            p + "mlp.up_proj.weight": randn(intermediate_size, hidden_size, std=0.15),
            p + "mlp.down_proj.weight": randn(hidden_size, intermediate_size, std=0.1),
        }
    tensors["model.norm.weight"] = norm()
    if tie_word_embeddings:
        # eos's logit is 0 while ~300 others are spread around 0: greedy decoding never ends early,
        # so the tests know how many tokens to expect
        tensors["model.embed_tokens.weight"][eos_id] = 0.0
    else:
        lm_head = randn(vocab_size, hidden_size, std=0.3)
        lm_head[eos_id] = 0.0
        tensors["lm_head.weight"] = lm_head
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "hidden_act": "silu",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """float32, separate lm_head, 3 layers, grouped-query attention (4 query heads over 2 kv heads)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_bf16_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bf16 on disk, tied embeddings, 2 layers, plain multi-head attention."""
    return make_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny-llama-bf16",
        num_hidden_layers=2,
        num_key_value_heads=4,
        dtype=torch.bfloat16,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        seed=1,
    )


@dataclass
class ServedEngine:
    """A `cpu_server` app with its `Engine`, served by uvicorn in a thread of this process on loopback."""

    engine: Any  # live.engines.cpu_engine.Engine
    url: str


@contextlib.contextmanager
def serve_engine(
    model_dir: Path, name: str = "tiny-llama", wait_ready: bool = True, engine_cls: Any = None, **engine_kwargs: Any
) -> Iterator[ServedEngine]:
    """Run the real HTTP app over a real `Engine` on a free 127.0.0.1 port until the block ends (listening on
    entry, and ready unless `wait_ready` is False)."""
    import httpx
    import uvicorn

    from live.engines.base import free_port
    from live.engines.cpu_server import Engine, create_app

    engine = (engine_cls or Engine)(model_dir, name, **engine_kwargs)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # bounded: up to 60 s for the port to answer
            assert time.monotonic() < deadline and thread.is_alive(), "in-process engine did not start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/ping", timeout=1).status_code in (200, 503):
                    break
            time.sleep(0.02)
        if wait_ready:
            assert engine.ready.wait(60) and engine.state == "ready", engine.error
        yield ServedEngine(engine, url)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def fake_toka(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in `toka` executable of test_tokasaurus.py (launcher + worker, no GPU), as a script file."""
    from tests.live_engine.test_tokasaurus import FAKE_TOKA

    path = tmp_path_factory.mktemp("bin") / "toka"
    path.write_text(f"#!{sys.executable}\n{FAKE_TOKA}")
    path.chmod(0o755)
    return path
