"""Token ids -> text as it forms: UTF-8 across token boundaries, and stop strings.

``TextDecoder`` holds back the bytes of a character split across tokens (an emoji is often
2-3 GPT-2 tokens) until it is complete. ``StopStrings`` cuts a row's text before the first
of its stop strings, matched on the decoded text (a stop string may span tokens), and holds
back any tail that could still become one, so streamed text never shows a stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from slm_export.tokenizer import get_encoding


class TextDecoder:
    """Token ids -> text, incrementally."""

    def __init__(self):
        self._enc = get_encoding()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._enc.decode_single_token_bytes(token))

    def flush(self) -> str:
        """Whatever is left (an incomplete sequence at the end becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class StopStrings:
    """One row's text with its stop strings: ``push`` -> (text safe to show, stopped)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[:min(hits)], True
        keep = max((n for s in self.stops for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])),
                   default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held tail, once the row ended without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
