"""A completion prompt gets exactly the BOS transformers' tokenizer gives it: the CPU engine's prompt ids equal
`AutoTokenizer.from_pretrained(dir)(text)["input_ids"]`, and its greedy completion equals transformers' `generate` on
those ids, for transformers-written checkpoints whose tokenizer adds BOS (Llama 2 and Mistral style, a Llama 3 style
post-processor `Sequence`) and whose tokenizer adds none although config.json names a BOS (Qwen2; a Llama-architecture
model such as SmolLM)."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from tests.live_engine.conftest import serve_engine
from tests.live_engine.test_arch_transformers import VOCAB, write_checkpoint

transformers = pytest.importorskip("transformers")

SPECIALS = ["<s>", "</s>", "<|begin_of_text|>", "<|endoftext|>"]
# byte-level symbols of printable ASCII ("Ġ" is the space), as many as the test models' vocabulary holds
CHARS = list(("Ġ" + string.digits + string.ascii_letters + string.punctuation)[: VOCAB - len(SPECIALS)])
PROMPT = "Hello, a cold start loads 8 layers!"
NEW_TOKENS = 12

# case -> (architecture in test_arch_transformers.CASES, the tokenizer's BOS, how its post-processor adds it)
CASES: dict[str, tuple[str, str, str]] = {
    "llama2-template-bos": ("llama2", "<s>", "template"),
    "llama3-sequence-bos": ("llama3-rope-scaling-tied", "<|begin_of_text|>", "sequence"),
    "mistral-template-bos": ("mistral-sliding-window", "<s>", "template"),
    "qwen2-no-bos": ("qwen2-biases-tied", "<|endoftext|>", "none"),
    "llama-no-bos": ("llama2", "<|endoftext|>", "none"),  # SmolLM-like: a Llama whose tokenizer adds no BOS
}


def write_tokenizer(directory: Path, bos: str, post: str) -> Any:
    """A byte-level BPE (as Llama 3's and Qwen's) of exactly VOCAB tokens, the test models' vocabulary (printable
    ASCII, no merges), BOS added by its post-processor as `post` says ("template": Llama 2 / Mistral, "sequence":
    Llama 3's ByteLevel + template, "none": Qwen), saved by transformers' `save_pretrained` (tokenizer.json and
    tokenizer_config.json); transformers' tokenizer read back (for Qwen2 its own class, from config.json)."""
    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    template = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    if post == "template":
        tok.post_processor = template
    elif post == "sequence":
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    eos = "<|endoftext|>" if bos == "<|endoftext|>" else "</s>"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos).save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("case", sorted(CASES))
def test_completion_prompt_ids_and_greedy_text_equal_transformers(tmp_path: Path, case: str) -> None:
    arch, bos, post = CASES[case]
    model = write_checkpoint(tmp_path, arch)
    hf = write_tokenizer(tmp_path, bos, post)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["bos_token_id"] = hf.convert_tokens_to_ids(bos)  # as Hub configs name it, whether or not it is added
    config_path.write_text(json.dumps(config, indent=2))

    want_ids = list(hf(PROMPT)["input_ids"])
    assert want_ids.count(config["bos_token_id"]) == (0 if post == "none" else 1), case
    with torch.no_grad():
        # an explicit mask: generate would otherwise mask the prompt's BOS (id 0) as padding
        out = model.generate(torch.tensor([want_ids]), attention_mask=torch.ones(1, len(want_ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    want_text = hf.decode(out[0, len(want_ids):].tolist(), skip_special_tokens=True)

    with serve_engine(tmp_path, name=case, threads=1) as served:
        assert served.engine.encode(PROMPT) == want_ids, case
        body = {"model": case, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        r = httpx.post(served.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["usage"]["prompt_tokens"] == len(want_ids)
    assert answer["usage"]["completion_tokens"] == NEW_TOKENS
    assert answer["choices"][0]["text"] == want_text, case
