"""Text read from storage, made safe to show on a terminal.

Logs, markers and manifests are written by jobs and by anyone who can write the
store. Printed as they are, their escape sequences would drive the reader's
terminal: move the cursor, rewrite earlier lines, set the window title, or hide
text. ``printable`` shows every control character as a visible escape instead;
``escaped_terminal`` makes everything the ``batchpool`` command prints to a
terminal go through it.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Iterator
from typing import TextIO

# C0 controls but tab and newline, DEL, C1 controls, and the Unicode controls that
# reorder or hide text (bidirectional overrides and isolates, line separators).
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_UNSAFE_IN_LINE = re.compile(f"[\n\t]|{_UNSAFE.pattern}")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, one_line: bool = False) -> str:
    """``text`` with every control character shown as ``\\xNN`` (``\\uNNNN``); newlines
    and tabs are kept unless ``one_line``. A carriage return before a newline goes."""
    text = text.replace("\r\n", "\n")
    return (_UNSAFE_IN_LINE if one_line else _UNSAFE).sub(_escape, text)


class EscapingStream(io.TextIOBase):
    """A text stream that passes what is written on to ``stream`` through ``printable``:
    for the terminal a command prints store text to."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(printable(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding


@contextlib.contextmanager
def escaped_terminal() -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` escape control characters while they are
    terminals; to a pipe or a file they pass text on as it is."""
    saved = sys.stdout, sys.stderr
    if sys.stdout.isatty():
        sys.stdout = EscapingStream(sys.stdout)
    if sys.stderr.isatty():
        sys.stderr = EscapingStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
