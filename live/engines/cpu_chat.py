"""Chat prompts of the CPU engine: the checkpoint's own chat template when it has one, else the built-in one.

With a checkpoint template the rendered text is tokenized without added special tokens, as transformers'
`apply_chat_template(tokenize=True)` does (the template writes its own BOS, once); the built-in template's
text is encoded like a completion prompt (BOS in front). A template that raises for a request's messages is
that request's 400 error, naming the template; the engine goes on serving.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from live.chat_template import ChatTemplate, ChatTemplateError, encode_chat, load_chat_template
from live.engines.cpu_api import BUILT_IN_TEMPLATE, ApiError, chat_prompt, check_messages


class ChatPrompts:
    """Turns a chat request's messages into prompt token ids with the template in use."""

    def __init__(self, template: ChatTemplate | None) -> None:
        self.template = template

    @classmethod
    def for_checkpoint(cls, model_dir: str | os.PathLike[str]) -> ChatPrompts:
        """The checkpoint's template (None: the built-in); a template that does not compile raises here."""
        return cls(load_chat_template(model_dir))

    def describe(self) -> dict[str, Any]:
        """The template in use, for `/v1/models`: its source, file and sha256 (or the built-in's format)."""
        if self.template is None:
            return {"source": "built-in", "format": BUILT_IN_TEMPLATE}
        return self.template.describe()

    async def prompt_ids(self, engine: Any, messages: object) -> list[int]:
        """Prompt ids for `messages` (validated); waits for the tokenizer, which loads with the model."""
        if self.template is None:
            return list(await asyncio.to_thread(engine.encode, chat_prompt(messages)))
        checked = check_messages(messages)
        try:
            text = self.template.render(checked, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise ApiError(400, str(exc), "messages", "chat_template_error") from None
        await asyncio.to_thread(engine.ready.wait)
        if engine.tokenizer is None:
            raise ApiError(503, f"the model is not available: {engine.error}", None, "model_unavailable",
                           "server_error")
        ids = encode_chat(engine.tokenizer, text)
        if not ids:
            raise ApiError(400, f"the chat template of {self.template.where} rendered an empty prompt", "messages",
                           "chat_template_error")
        return ids
