"""The server's pure parts, in process: incremental detokenization with stop strings, template, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from live.engines.cpu_api import ApiError, ResumeState, chat_prompt, parse_request_id, parse_resume, parse_sampling
from live.engines.text_stream import TextStream


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))


def stream_all(tokenizer: Tokenizer, text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stop)
    deltas = []
    for token in tokenizer.encode(text).ids:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    deltas.append(stream.flush())
    return deltas, stream


def test_multibyte_characters_split_across_tokens_are_never_half_emitted(tokenizer: Tokenizer) -> None:
    text = "héllo ✓ wörld ∑ 🚀 done"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text.encode()) // 2  # the trained vocab lacks these: bytes come one token each
    deltas, stream = stream_all(tokenizer, text, [])
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert not stream.stopped


def test_stop_string_split_across_tokens_truncates_before_it(tokenizer: Tokenizer) -> None:
    text = "hello world, hello tierlab"
    deltas, stream = stream_all(tokenizer, text, ["xyz", "o w"])
    assert stream.stopped
    assert "".join(deltas) == "hell"
    # the stop string's first characters were held back, never sent
    assert all("o" not in d for d in deltas)


def test_stop_string_that_never_occurs_releases_everything(tokenizer: Tokenizer) -> None:
    deltas, stream = stream_all(tokenizer, "hello llama", ["lamb"])
    assert "".join(deltas) == "hello llama" and not stream.stopped


def test_chat_template() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
    ]
    assert chat_prompt(messages) == "<|system|>: be brief\n<|user|>: hi there\n<|assistant|>:"
    for bad in ([], "hi", [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 3}], ["x"]):
        with pytest.raises(ApiError) as err:
            chat_prompt(bad)
        assert err.value.status == 400


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": "x"}, "seed"),
        ({"stop": ["a", 3]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_invalid_sampling_parameters(body: dict, param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_sampling(body, ("max_tokens",))
    assert err.value.status == 400
    assert err.value.param == param
    assert set(err.value.body()["error"]) == {"message", "type", "param", "code"}


def test_sampling_defaults_and_aliases() -> None:
    params = parse_sampling(
        {"max_completion_tokens": 7, "stop": "x", "stream": True, "n": 1}, ("max_completion_tokens",)
    )
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (7, 1.0, 1.0, None)
    assert params.stop == ["x"] and params.stream and not params.include_usage


@pytest.mark.parametrize("stop", [[], ["o w"], ["llama", "xyz"], ["✓ w"]])
def test_a_stream_resumed_at_any_token_continues_exactly(tokenizer: Tokenizer, stop: list[str]) -> None:
    """Split after every token k: the source's deltas, then a fresh stream seeded with (ids[:k], emitted)."""
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    ids = tokenizer.encode("hello world, héllo ✓ wörld, hello llama done").ids
    whole, _ = stream_all(tokenizer, tokenizer.decode(ids), stop)
    expected = "".join(whole)
    for k in range(len(ids) + 1):
        source = TextStream(decode, stop)
        sent = []
        for token in ids[:k]:
            sent.append(source.push(token))
            if source.stopped:
                break
        if source.stopped:  # the sequence would have finished here: nothing to migrate
            assert "".join(sent) == expected
            continue
        assert source.emitted_chars == len("".join(sent))
        resumed = TextStream(decode, stop, ids=ids[:k], emitted_chars=source.emitted_chars)
        rest = []
        for token in ids[k:]:
            rest.append(resumed.push(token))
            if resumed.stopped:
                break
        rest.append(resumed.flush())
        assert "".join(sent) + "".join(rest) == expected, k


def test_resume_field_is_validated_naming_the_field(tokenizer: Tokenizer) -> None:
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def parse(raw: object) -> ResumeState | None:
        return parse_resume({"tierlab_resume": raw}, vocab_size=300, context_tokens=64, decode=decode)

    hello = tokenizer.encode("hello").ids
    good = parse({"prompt_ids": [0, 5], "token_ids": hello, "emitted_chars": 5})
    assert good == ResumeState([0, 5], hello, 5)
    assert parse_resume({}, 300, 64, decode) is None
    assert parse({"prompt_ids": [3], "token_ids": [], "emitted_chars": 0}) == ResumeState([3], [], 0)
    assert parse({"prompt_ids": [3], "token_ids": [], "emitted_chars": 0, "seed": 7}) == ResumeState([3], [], 0, 7)
    cases = [
        ("x", "tierlab_resume"),
        ({"prompt_ids": [1], "token_ids": [], "emitted_chars": 0, "top_k": 1}, "tierlab_resume"),
        ({"prompt_ids": [1], "token_ids": [], "emitted_chars": 0, "seed": "1"}, "tierlab_resume.seed"),
        ({"token_ids": [], "emitted_chars": 0}, "tierlab_resume.prompt_ids"),
        ({"prompt_ids": [], "token_ids": [], "emitted_chars": 0}, "tierlab_resume.prompt_ids"),
        ({"prompt_ids": [1, 300], "token_ids": [], "emitted_chars": 0}, "tierlab_resume.prompt_ids"),
        ({"prompt_ids": [1], "token_ids": [-1], "emitted_chars": 0}, "tierlab_resume.token_ids"),
        ({"prompt_ids": [1], "token_ids": "12", "emitted_chars": 0}, "tierlab_resume.token_ids"),
        ({"prompt_ids": [1] * 40, "token_ids": [2] * 24, "emitted_chars": 0}, "tierlab_resume.token_ids"),
        ({"prompt_ids": [1] * 64, "token_ids": [], "emitted_chars": 0}, "tierlab_resume.prompt_ids"),
        ({"prompt_ids": [1], "token_ids": hello, "emitted_chars": 6}, "tierlab_resume.emitted_chars"),
        ({"prompt_ids": [1], "token_ids": hello, "emitted_chars": -1}, "tierlab_resume.emitted_chars"),
        ({"prompt_ids": [1], "token_ids": hello, "emitted_chars": 1.0}, "tierlab_resume.emitted_chars"),
        ({"prompt_ids": [1], "token_ids": hello}, "tierlab_resume.emitted_chars"),
    ]
    for raw, param in cases:
        with pytest.raises(ApiError) as err:
            parse(raw)
        assert err.value.status == 400 and err.value.param == param, (raw, err.value.message)
        assert param in err.value.message or param == "tierlab_resume"


def test_a_caller_chosen_response_id_is_validated() -> None:
    assert parse_request_id({}) is None
    assert parse_request_id({"tierlab_id": "tl-7-ab12:x.y_z"}) == "tl-7-ab12:x.y_z"
    for bad in ("", "a b", "x" * 129, 5, ["a"], "é"):
        with pytest.raises(ApiError) as err:
            parse_request_id({"tierlab_id": bad})
        assert err.value.param == "tierlab_id" and err.value.status == 400
