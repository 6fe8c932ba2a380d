"""Incremental detokenisation with stop strings.

``tokenizers``' ``DecodeStream`` emits text only once the bytes seen form whole UTF-8
characters, and keeps byte-level BPE and SentencePiece spacing right because it decodes each
token in the context of the ones before it (seeded with the prompt's last tokens).
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

PROMPT_CONTEXT_TOKENS = 6


class Detokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(
            ids=prompt_token_ids[-PROMPT_CONTEXT_TOKENS:], skip_special_tokens=skip_special_tokens
        )
        self._stop = stop
        self._include_stop = include_stop_str_in_output
        # Streaming holds back the text that could still be the start of a stop string.
        self._holdback = max((len(s) for s in stop), default=1) - 1
        # The text so far is "".join(self._pieces) + self._tail: pieces only ever get appended
        # (amortised O(1) per token, never a copy of the text so far); the tail is the last
        # ``holdback`` characters, where a stop string may still begin. ``_emitted`` pieces
        # have gone out as deltas.
        self._pieces: list[str] = []
        self._tail = ""
        self._emitted = 0

    @property
    def text(self) -> str:
        """The whole text so far (joined on demand: O(length), so read it once, at the end)."""
        return "".join(self._pieces) + self._tail

    def add_token(self, token_id: int) -> str | None:
        """Append one token's text; return the stop string it completed, if any."""
        piece = self._stream.step(self._tokenizer, token_id) or ""
        if not piece:
            return None
        # Only the tail and the new piece can hold a stop string that ends in this piece.
        window = self._tail + piece
        hit = None
        if self._stop:
            where = len(window)
            for s in self._stop:
                i = window.find(s)
                if i != -1 and i < where:
                    hit, where = s, i
            if hit is not None:
                window = window[: where + (len(hit) if self._include_stop else 0)]
        keep = min(self._holdback, len(window)) if hit is None else 0
        if len(window) > keep:
            self._pieces.append(window[: len(window) - keep])
        self._tail = window[len(window) - keep :]
        return hit

    def delta(self, finished: bool) -> str:
        """New text since the last call (all of it once the request finished)."""
        new = self._pieces[self._emitted :]
        self._emitted = len(self._pieces)
        if finished and self._tail:
            self._pieces.append(self._tail)
            new.append(self._tail)
            self._tail = ""
            self._emitted = len(self._pieces)
        return new[0] if len(new) == 1 else "".join(new)
