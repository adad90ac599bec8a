"""Incremental detokenization with stop strings, resumable mid-sequence (for migrated sequences)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    """Incremental detokenization with stop strings.

    Re-decodes all generated ids each step (byte-level BPE may split a character across tokens;
    a trailing U+FFFD means "wait for the next byte") and holds back the last len(stop)-1 chars
    so that a stop string split across tokens is never half-emitted. The concatenated deltas equal
    the non-streamed text.

    A stream can start mid-sequence (a sequence migrated from another engine): `ids` are the tokens
    generated so far and `emitted_chars` the characters of their text already sent. The deltas then
    continue exactly where the other stream stopped: its state is a function of (ids, emitted_chars)
    alone, and the holdback guarantees that no stop string starts before `emitted_chars`.
    """

    def __init__(
        self, decode: Callable[[list[int]], str], stop: list[str], ids: Sequence[int] = (), emitted_chars: int = 0
    ) -> None:
        self.decode = decode
        self.stop = stop
        self.holdback_chars = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = [int(t) for t in ids]
        self.text = ""  # set from ids by the next push() or flush()
        if emitted_chars < 0:
            raise ValueError(f"emitted_chars must be >= 0, got {emitted_chars}")
        self.emitted_chars = emitted_chars
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; the text that is now safe to emit (sets `stopped` on a stop string)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        return self._release(final=False)

    def flush(self) -> str:
        """The rest of the text at the end of generation."""
        if self.stopped:
            return ""
        self.text = self.decode(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(s, self.emitted_chars) for s in self.stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        else:
            end = len(self.text) if final else len(self.text) - self.holdback_chars
        if end <= self.emitted_chars:
            return ""
        out = self.text[self.emitted_chars : end]
        self.emitted_chars = end
        return out


