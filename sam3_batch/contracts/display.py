"""User data (file names, URIs, failure reasons) made safe to print on a terminal."""

from __future__ import annotations

import re
import unicodedata

from sam3_batch.contracts.redact import valid_text

# CSI/OSC/other escape sequences first (so their parameters go too), then any other control character.
_ESCAPE_SEQUENCE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])|\x9b[0-?]*[ -/]*[@-~]")


def printable(text: str) -> str:
    """``text`` without terminal escape sequences or control/format characters, and valid UTF-8.

    Print the result as plain text (never as rich markup): square brackets stay literal.
    """
    text = valid_text(text)
    text = _ESCAPE_SEQUENCE.sub("", text)
    return "".join(ch if _is_safe(ch) else "?" for ch in text)


def _is_safe(ch: str) -> bool:
    if ch in " \t":
        return True
    return unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Zl", "Zp")
