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
        self.text = ""
        self._emitted = 0

    def add_token(self, token_id: int) -> str | None:
        """Append one token's text; return the stop string it completed, if any."""
        piece = self._stream.step(self._tokenizer, token_id) or ""
        if not piece or not self._stop:
            self.text += piece
            return None
        search_from = max(0, len(self.text) - self._holdback)
        self.text += piece
        hit, where = None, len(self.text)
        for s in self._stop:
            i = self.text.find(s, search_from)
            if i != -1 and i < where:
                hit, where = s, i
        if hit is not None:
            self.text = self.text[: where + (len(hit) if self._include_stop else 0)]
        return hit

    def delta(self, finished: bool) -> str:
        """New text since the last call (all of it once the request finished)."""
        upto = len(self.text) if finished else max(self._emitted, len(self.text) - self._holdback)
        out = self.text[self._emitted : upto]
        self._emitted = upto
        return out
