"""Text from elsewhere (the guest, the host, the site file) made safe to show on a terminal."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str, keep_newlines: bool = True) -> str:
    """Escape control characters (ANSI escapes, carriage returns, bidi overrides) as \\xNN, so
    a guest or host cannot redraw the admin's terminal; newlines stay unless told otherwise."""
    if not keep_newlines:
        text = text.replace("\n", "\\n")
    return _CONTROL.sub(
        lambda m: (
            f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}"
        ),
        text,
    )
