"""A checkpoint written by transformers' own `save_pretrained(..., max_shard_size=...)` (several shards + index)
served end to end: the CPU engine's logits on the shards equal transformers', and `python -m experiments.serve`
with it in the catalog as `local_dir` and a moto S3 "cloud" answers the `openai` client: a cold start from the
cloud, then a warm request, with transformers' own greedy tokens."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

for _dep in ("torch", "safetensors", "tokenizers", "transformers", "uvicorn", "openai", "s3fs"):
    pytest.importorskip(_dep)
import torch  # noqa: E402

from live.checkpoint import BOS_ID, BOS_TOKEN, EOS_ID, EOS_TOKEN, build_tokenizer  # noqa: E402
from live.shards import INDEX_FILE  # noqa: E402
from tests.live_registry.services import moto_server  # noqa: E402
from tests.live_serve.serving import checkpoint_cache, serve  # noqa: E402

MODEL = "hf-sharded"
PROMPT = "tierlab loads layers"
MAX_TOKENS = 5
CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256, "bos_token_id": BOS_ID,
          "eos_token_id": EOS_ID, "tie_word_embeddings": False, "rms_norm_eps": 1e-6}


def write_hf_sharded(out: Path) -> Path:
    """A random tiny Llama written by transformers in >= 3 shards, plus a tokenizer of its vocab; cached, atomic."""
    if (out / INDEX_FILE).is_file():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(tmp, max_shard_size="200KB")
        build_tokenizer(CONFIG["vocab_size"]).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}))
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)  # another run that won the race leaves its own (identical) copy in place
    except OSError:
        if not (out / INDEX_FILE).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture(scope="module")
def hf_ckpt() -> Path:
    ckpt = write_hf_sharded(checkpoint_cache() / "hf-llama-sharded-h64-l3-v1")
    shards = set(json.loads((ckpt / INDEX_FILE).read_text())["weight_map"].values())
    assert len(shards) >= 3 and not (ckpt / "model.safetensors").exists()
    return ckpt


@pytest.fixture(scope="module")
def hf_model(hf_ckpt: Path) -> Any:
    """transformers' own model, read back from the shards by transformers."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(hf_ckpt, dtype=torch.float32).eval()


def prompt_ids() -> list[int]:
    return build_tokenizer(CONFIG["vocab_size"]).encode(PROMPT).ids  # BOS first, as the engine encodes it


def test_cpu_engine_logits_on_transformers_shards_equal_transformers(hf_ckpt: Path, hf_model: Any) -> None:
    from live.engines.cpu_server import Engine
    from live.engines.llama import LlamaModel
    from live.engines.loader_source import LoaderLayerSource
    from live.manifest import build_manifest

    ids = prompt_ids()
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0].float()
    source = Engine(hf_ckpt, MODEL, progressive=True)._layer_source()
    assert isinstance(source, LoaderLayerSource)  # the engine's own read path: tierlab's loader over the shards
    got = LlamaModel.from_dir(hf_ckpt, layer_source=source).forward(ids)
    assert source.done.wait(30) and source.error is None
    diff = (got - expected).abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff}"
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    spanning = [g.name for g in build_manifest(hf_ckpt).layout.groups() if len(g.spans()) > 1]
    assert spanning, "transformers' shards should split some layer"


@pytest.fixture(scope="module")
def s3_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server with an empty bucket; the store URL. Credentials and endpoint reach `experiments.serve`
    and its agents through the standard AWS variables (hydra overrides cannot key store_options by URL)."""
    from live.stores import open_store

    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint, pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(k, v)
        bucket = f"tierlab-{uuid.uuid4().hex[:12]}"
        open_store(f"s3://{bucket}").fs.mkdir(bucket)
        yield f"s3://{bucket}/models"


def test_transformers_sharded_checkpoint_served_cold_from_s3_then_warm(hf_ckpt: Path, hf_model: Any, s3_cloud: str,
                                                                       tmp_path: Path) -> None:
    from live.stores import open_store

    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids()]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                min_new_tokens=MAX_TOKENS, pad_token_id=EOS_ID)
    expected_text = build_tokenizer(CONFIG["vocab_size"]).decode(out[0, len(prompt_ids()):].tolist(),
                                                                 skip_special_tokens=True)
    overrides = ["~catalog", f"+catalog.{MODEL}={{local_dir:'{hf_ckpt}'}}", f"stores=['{s3_cloud}']", "nodes=1",
                 "policy.autoscaling.keep_alive_s=600"]
    with serve(tmp_path, overrides) as s:
        bucket_keys = open_store(s3_cloud).list(MODEL)
        shards = sorted(set(json.loads((hf_ckpt / INDEX_FILE).read_text())["weight_map"].values()))
        assert {f"{MODEL}/{n}" for n in [*shards, INDEX_FILE]} <= set(bucket_keys)
        client = s.client()
        assert [m.id for m in client.models.list()] == [MODEL]
        texts = []
        for _ in range(2):
            r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.usage is not None and r.usage.completion_tokens == MAX_TOKENS
            texts.append(r.choices[0].text)
        assert texts == [expected_text, expected_text]  # transformers' greedy tokens, cold and warm
        df = s.records().sort_values("request_id").reset_index(drop=True)
        assert list(df["outcome"]) == ["completed", "completed"]
        assert list(df["cold_start"]) == [True, False]
        assert df.loc[0, "source_tier"] == "cloud", df.loc[0].to_dict()
        assert df.loc[1, "ttft_s"] < df.loc[0, "ttft_s"]
        s.stop()
