"""The gateway's response cache (`GatewayConfig.response_cache`, off by default): answers a repeated or similar
deterministic request without touching an engine, using `core.response_cache` (exact key + hashed n-gram
similarity, TTL, LRU capacity, one partition per tenant, never shared across tenants).

- **Lookup** after authentication, validation and the tenant's limits, before the policy sees the request. Only
  requests `core.response_cache.cache_key` accepts are looked up (temperature 0, one choice, plain text prompt).
- **A hit** is answered by the gateway: a whole OpenAI answer, or for `stream: true` the same SSE chunks the
  gateway synthesizes for engines that cannot stream (`gateway_sse.synthesize_stream`: role chunk, text, finish,
  the usage chunk if asked, `[DONE]`). It carries the header `x-tierlab-cache: exact|semantic`; its record has
  `cache` = the kind, no node or instance, and costs nothing (`cost_usd` 0: no engine time). Its usage is the
  stored answer's (for a semantic hit the prompt tokens are the stored prompt's, not this one's).
- **Stores** only completed answers with status 200 (never errors, never a stream that broke), under the tenant
  that asked. Keys hold the prompt and parameters, never the API key; nothing here is logged.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response

from core.response_cache import CacheConfig, Hit, ResponseCache, cache_key, semantic_text
from live import gateway_sse as sse
from live.gateway_api import include_usage
from live.gateway_records import RequestInfo

CACHE_HEADER = "x-tierlab-cache"
SSE_HEADERS = {"Cache-Control": "no-cache"}


@dataclass
class CacheSlot:
    """A cacheable request's place in the cache: who asked, under which scope, with which prompt."""

    tenant: str
    scope: str
    prompt: str
    text: str  # what the similarity cache embeds (`core.response_cache.semantic_text`)
    chat: bool


@dataclass(frozen=True)
class CachedAnswer:
    """What is kept of a completed answer."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class GatewayCache:
    """`core.response_cache.ResponseCache` on the gateway's clock, with OpenAI answers for its hits."""

    def __init__(self, config: CacheConfig, now: Any) -> None:
        self.config = config
        self.cache = ResponseCache(config)
        self._now = now  # () -> seconds on the gateway's clock

    def slot(self, tenant: str, path: str, body: dict[str, Any]) -> CacheSlot | None:
        """The request's slot if it is cacheable, else None."""
        key = cache_key(path, body)
        if key is None:
            return None
        params, prompt = key
        return CacheSlot(tenant, params, prompt, semantic_text(path, body) or prompt, path.endswith("chat/completions"))

    def lookup(self, slot: CacheSlot) -> Hit | None:
        return self.cache.lookup(slot.tenant, slot.scope, slot.prompt, self._now(), slot.text)

    def store(self, slot: CacheSlot, answer: CachedAnswer) -> None:
        self.cache.store(slot.tenant, slot.scope, slot.prompt, answer, self._now(), slot.text)

    def store_whole(self, slot: CacheSlot, answer: dict[str, Any]) -> None:
        """Keep a completed non-streaming answer (its first choice's text and finish reason, and its usage)."""
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        if not isinstance(text, str):
            return
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        self.store(slot, CachedAnswer(text, str(choice.get("finish_reason") or "stop"),
                                      int(usage.get("prompt_tokens", 0) or 0),
                                      int(usage.get("completion_tokens", 0) or 0)))

    def answer(self, hit: Hit, req: RequestInfo, path: str, body: dict[str, Any]) -> Response:
        """The response for a hit, whole or streamed as the request asked; fills the request's record fields."""
        stored: CachedAnswer = hit.value
        chat = path.endswith("chat/completions")
        req.cache = hit.kind
        req.in_tokens, req.out_tokens = stored.prompt_tokens, stored.completion_tokens
        req.source_tier = ""
        choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": stored.text},
                                   "logprobs": None, "finish_reason": stored.finish_reason} if chat else
                                  {"index": 0, "text": stored.text, "logprobs": None,
                                   "finish_reason": stored.finish_reason})
        whole = {"id": f"cache-{req.id}-{secrets.token_hex(4)}",
                 "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                 "model": req.model, "choices": [choice],
                 "usage": {"prompt_tokens": stored.prompt_tokens, "completion_tokens": stored.completion_tokens,
                           "total_tokens": stored.prompt_tokens + stored.completion_tokens}}
        headers = {CACHE_HEADER: hit.kind}
        if body.get("stream"):
            content = sse.synthesize_stream(whole, chat, include_usage(body))
            return Response(content, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        return Response(orjson.dumps(whole), media_type="application/json", headers=headers)


class StreamText:
    """The text of a relayed stream, gathered event by event so that a completed stream can be cached."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finish_reason = "stop"

    def add(self, choice: dict[str, Any]) -> None:
        self.parts.append(sse.choice_text(choice))
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])

    def answer(self, req: RequestInfo) -> CachedAnswer:
        return CachedAnswer("".join(self.parts), self.finish_reason, req.in_tokens or req.prompt_tokens,
                            req.out_tokens)
