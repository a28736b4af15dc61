"""One request's text, token by token (like vLLM's incremental detokenizer).

    detok = IncrementalDetokenizer(tokenizer, stop=["\\n\\n"])
    new_text, stopped = detok.step(output_ids, final=False)   # after each sampled token

Tokens are decoded with a prefix / read offset pair, so a token's text is what it adds to
its left context (byte-level BPE splits characters across tokens); text that ends in an
incomplete character ("\\ufffd") waits for the next token. Stop strings are cut at the
earliest match and are never part of the text; until the request ends, the last
`len(longest stop) - 1` characters are held back, since a stop string may still be forming.
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    """The text of one request so far (`text`) and how much of it was streamed."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok, self.stop = tokenizer, list(stop)
        self.hold = max((len(s) - 1 for s in self.stop), default=0)
        self.text = ""
        self.prefix = self.read = 0  # token offsets: decoded context, decoded up to
        self.emitted = 0  # characters of `text` already handed out

    def step(self, ids: list[int], final: bool = False) -> tuple[str, bool]:
        """Take in the new tokens at the end of `ids` (every output token so far); return the
        text that may be streamed now and whether a stop string ended the request. `final`:
        the request ends anyway (a stop token, max_tokens): nothing is held back."""
        before = len(self.text)
        self._decode(ids, final)
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:  # cut at the earliest stop string
            self.text = self.text[: min(hits)]
        hold = 0 if final or hits else self.hold
        safe = max(len(self.text) - hold, self.emitted)
        out, self.emitted = self.text[self.emitted : safe], safe
        return out, bool(hits)

    def _decode(self, ids: list[int], final: bool) -> None:
        """Incremental decoding (prefix/read offsets), holding back incomplete characters."""
        prefix = self.tok.decode(ids[self.prefix : self.read], skip_special_tokens=True)
        new = self.tok.decode(ids[self.prefix :], skip_special_tokens=True)
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            self.text += new[len(prefix) :]
            self.prefix, self.read = self.read, len(ids)
