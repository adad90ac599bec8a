"""Checkpoint chat templates render as transformers' `apply_chat_template` renders them (text and token ids, BOS
once), from `chat_template.jinja` or `tokenizer_config.json`; templates that raise or do not compile are errors
naming the template; and the CPU engine serves with the checkpoint's template, shows it in /v1/models, answers a
raising template with a 400 and keeps serving."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from live.chat_template import ChatTemplateError, encode_chat, load_chat_template

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>",
            "<|im_end|>", "[INST]", "[/INST]", "<unk>"]
# Meta-Llama-3-8B-Instruct's template, as published
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
# ChatML as Qwen2.5 writes it (without the tools branch): a default system prompt, no BOS
CHATML = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + "
          "'<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
          "helpful assistant.<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == "
          "'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}{{- "
          "'<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
# whitespace control (trim_blocks, lstrip_blocks), namespace, loop controls, tojson, a generation block
MULTILINE = """{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
[{{ ns.n }}] {{ message['role'] }}: {{ message['content'] | tojson }}
{% endfor %}
{% if add_generation_prompt %}
{% generation %}{{ eos_token }}assistant:{% endgeneration %}
{% endif %}
"""
# Mistral-style: roles must alternate, else raise_exception
ALTERNATING = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0)"
               " %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
               "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
TEMPLATES = {"llama3": LLAMA3, "chatml": CHATML, "multiline": MULTILINE, "alternating": ALTERNATING}
MESSAGES = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "What is a cold start?"},
            {"role": "assistant", "content": "Loading a model.", "name": None},
            {"role": "user", "content": "And \"warm\" <b>é</b>?"}]
ALTERNATE = MESSAGES[1:]


def make_tokenizer(template: str) -> Any:
    """A byte-level BPE (every string encodable) with the special tokens, a BOS-adding post-processor (as Llama's),
    wrapped as transformers' PreTrainedTokenizerFast carrying `template`."""
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token="<|eot_id|>", unk_token="<unk>", chat_template=template)


def save_tokenizer(directory: Path, template: str, storage: str) -> Any:
    """Save with transformers; `storage` "jinja" keeps its chat_template.jinja, "config" moves the template into
    tokenizer_config.json, "named" stores it as a list of named templates there."""
    tokenizer = make_tokenizer(template)
    tokenizer.save_pretrained(directory)
    jinja = directory / "chat_template.jinja"
    if storage != "jinja":
        text = jinja.read_text() if jinja.exists() else None
        jinja.unlink(missing_ok=True)
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = text or config.get("chat_template")
        if storage == "named":
            config["chat_template"] = [{"name": "default", "template": config["chat_template"]},
                                       {"name": "other", "template": "{{ raise_exception('not this one') }}"}]
        config_path.write_text(json.dumps(config))
    return transformers.AutoTokenizer.from_pretrained(directory)  # transformers reads back what it will apply


@pytest.mark.parametrize("storage", ["jinja", "config", "named"])
@pytest.mark.parametrize("name", ["llama3", "chatml", "multiline"])
def test_renders_and_tokenizes_as_apply_chat_template(tmp_path: Path, name: str, storage: str) -> None:
    hf = save_tokenizer(tmp_path, TEMPLATES[name], storage)
    ours = load_chat_template(tmp_path)
    assert ours is not None
    for prompt in (True, False):
        want = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt)
        assert ours.render(MESSAGES, add_generation_prompt=prompt) == want, (name, storage, prompt)
    text = ours.render(MESSAGES)
    ids = encode_chat(Tokenizer.from_file(str(tmp_path / "tokenizer.json")), text)
    assert ids == list(hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)["input_ids"])
    bos = hf.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids.count(bos) == (1 if name == "llama3" else 0)  # the template's own BOS, never a second one


def test_a_raising_template_names_the_template(tmp_path: Path) -> None:
    hf = save_tokenizer(tmp_path, ALTERNATING, "jinja")
    ours = load_chat_template(tmp_path)
    assert ours is not None
    assert ours.render(ALTERNATE) == hf.apply_chat_template(ALTERNATE, tokenize=False, add_generation_prompt=True)
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        hf.apply_chat_template(MESSAGES, tokenize=False)
    with pytest.raises(ChatTemplateError, match=f"the chat template of {tmp_path}/chat_template.jinja "
                                                r"\(sha256 [0-9a-f]{12}\) failed: Conversation roles must alternate"):
        ours.render(MESSAGES)
    with pytest.raises(ChatTemplateError, match=r"failed: 'dict object' has no attribute 'content'|UndefinedError"):
        ours.render([{"role": "user"}])  # an undefined name: a template error too, not a crash


def test_template_files_that_cannot_be_used_are_named(tmp_path: Path) -> None:
    assert load_chat_template(tmp_path) is None  # no tokenizer files: the engine's built-in template
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ChatTemplateError, match=rf"^{tmp_path}/chat_template.jinja: the chat template does not "
                                                "compile: line 1: "):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use",
                                                                                   "template": "x"}]}))
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        load_chat_template(tmp_path)


# --------------------------------------------------------------------------- the engine serving with it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers-written tiny Llama whose tokenizer carries the alternating (raising) template."""
    directory = tmp_path_factory.mktemp("chat-ckpt")
    hf = save_tokenizer(directory, ALTERNATING, "jinja")
    config = transformers.LlamaConfig(vocab_size=len(hf), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      bos_token_id=hf.bos_token_id, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def engine_url(checkpoint: Path) -> Iterator[str]:
    from live.engines.base import CpuEngineProcess, free_port

    proc = CpuEngineProcess(checkpoint, free_port(), model_name="chat", threads=1)
    proc.start()
    try:
        proc.wait_ready(timeout_s=60)
        yield proc.url
    finally:
        proc.close()


def test_the_engine_serves_with_the_checkpoint_template(checkpoint: Path, engine_url: str) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.LlamaForCausalLM.from_pretrained(checkpoint).eval()
    with httpx.Client(base_url=engine_url, timeout=60) as http:
        card = http.get("/v1/models").json()["data"][0]
        text = (checkpoint / "chat_template.jinja").read_text()
        assert card["chat_template"] == {"source": "checkpoint", "file": str(checkpoint / "chat_template.jinja"),
                                         "sha256": hashlib.sha256(text.encode()).hexdigest()}

        ids = hf.apply_chat_template(ALTERNATE, tokenize=True, add_generation_prompt=True)["input_ids"]
        with torch.no_grad():
            greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                    pad_token_id=0)[0, len(ids):].tolist()
        body = {"model": "chat", "messages": ALTERNATE, "max_tokens": 8, "temperature": 0}
        answer = http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        out = answer.json()
        assert out["usage"]["prompt_tokens"] == len(ids)  # the template's BOS, not a second one
        tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
        assert out["choices"][0]["message"]["content"] == tokenizer.decode(greedy, skip_special_tokens=True)

        refused = http.post("/v1/chat/completions", json=body | {"messages": MESSAGES})
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == "chat_template_error" and error["param"] == "messages"
        assert f"the chat template of {checkpoint}/chat_template.jinja" in error["message"]
        assert "Conversation roles must alternate" in error["message"]

        again = http.post("/v1/chat/completions", json=body)  # the engine goes on serving
        assert again.status_code == 200 and again.json()["choices"][0]["message"] == out["choices"][0]["message"]
        assert http.get("/health").status_code == 200
