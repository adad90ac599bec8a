"""A checkpoint's own chat template, rendered the way transformers' `apply_chat_template` renders it.

    template = load_chat_template("ckpt")        # None when the checkpoint ships no template
    text = template.render(messages)             # add_generation_prompt=True, as a chat request needs
    template.describe()                          # {"source": "checkpoint", "file": ..., "sha256": ...}

Where the template comes from (transformers' precedence): `chat_template.jinja`, else `chat_template` in
`tokenizer_config.json` (a string, or a list of named templates of which "default" is used). It is compiled by
jinja2's `ImmutableSandboxedEnvironment` (templates are untrusted code) with `trim_blocks` and
`lstrip_blocks`, the loop controls, and the names transformers gives templates: `raise_exception`,
`strftime_now`, a `tojson` that does not escape HTML, a `{% generation %}` block (rendered as its body),
`messages`, `add_generation_prompt`, `tools`/`documents` (None) and the tokenizer's named special tokens
(`bos_token`, `eos_token`, ...). Keys whose value is None are dropped from each message, as transformers does.

BOS: transformers tokenizes a rendered chat without adding special tokens, so a template that writes
`{{ bos_token }}` gets exactly one BOS and one that does not gets none; `encode_chat` does the same.
Errors name the template's file: `ChatTemplateError` (a ValueError) at load for a template that does not
compile, at render for one that raises (`raise_exception`, an undefined name, a type error).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# the named special tokens transformers passes to a template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A chat template that cannot be loaded, or that raised while rendering (the message names its file)."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it; rendered as its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja's Extension API: a class attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; transformers' (and so every published template) does not
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled checkpoint chat template, the file it came from and the special tokens it may use."""

    text: str
    where: str  # the file (and entry) it was read from, for errors and /v1/models
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    _compiled: jinja2.Template | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            compiled = _environment().from_string(self.text)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"{self.where}: the chat template does not compile: line {exc.lineno}: "
                                    f"{exc.message}") from None
        object.__setattr__(self, "_compiled", compiled)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """What `/v1/models` shows of the template in use."""
        return {"source": "checkpoint", "file": self.where, "sha256": self.sha256}

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; raises ChatTemplateError naming the template if it fails."""
        assert self._compiled is not None
        chat = [{k: v for k, v in message.items() if v is not None} for message in messages]
        try:
            return self._compiled.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except Exception as exc:  # a template is code: anything it raises is the template's failure
            kind = "" if isinstance(exc, jinja2.TemplateError) else f"{type(exc).__name__}: "
            raise ChatTemplateError(f"the chat template of {self.where} (sha256 {self.sha256[:12]}) failed: "
                                    f"{kind}{exc}") from None


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def load_chat_template(model_dir: str | os.PathLike[str]) -> ChatTemplate | None:
    """The checkpoint's own chat template, compiled; None when it has none. Errors name the file."""
    root = Path(model_dir)
    config_path = root / TOKENIZER_CONFIG_FILE
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ChatTemplateError(f"{config_path}: not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ChatTemplateError(f"{config_path}: must be a JSON object")
    special = {name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name))) is not None}
    jinja_path = root / CHAT_TEMPLATE_FILE
    if jinja_path.is_file():
        return ChatTemplate(jinja_path.read_text(encoding="utf-8"), str(jinja_path), special)
    raw = config.get("chat_template")
    if raw is None:
        return None
    if isinstance(raw, list):  # named templates: transformers uses "default" when no name is asked for
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, Mapping)}
        if not isinstance(named.get("default"), str):
            raise ChatTemplateError(f"{config_path}: chat_template lists templates {sorted(map(str, named))} but "
                                    "none named 'default'")
        return ChatTemplate(named["default"], f"{config_path} (chat_template 'default')", special)
    if not isinstance(raw, str):
        raise ChatTemplateError(f"{config_path}: chat_template must be a string or a list of named templates")
    return ChatTemplate(raw, f"{config_path} (chat_template)", special)


def encode_chat(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered chat, as transformers tokenizes it: no special tokens added (the template wrote
    the BOS it wants). `tokenizer` is a `tokenizers.Tokenizer`."""
    return list(tokenizer.encode(text, add_special_tokens=False).ids)
