"""How user-controlled text appears in messages: quoted, escaped, cut; and the one line an error becomes.

Paths, labels and values come from files other people made. Printed raw, an ANSI sequence in a file name clears
the user's terminal and a newline splits a one-line error in two; echoed whole, a value a YAML alias expanded to
a billion items costs gigabytes before it is cut. Everything here works on bounded text.
"""
from __future__ import annotations

import reprlib

MAX_SHOWN = 80  # characters of a user value shown in a message
MAX_LINE = 1000  # characters of an error line: a message that lists a user's names is cut here

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = MAX_SHOWN
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


def escape(text: str) -> str:
    """`text` with every non-printable character (control characters, ESC, newlines, bidi overrides) written
    as its Python escape, so that it stays on one line and cannot drive a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def quote(text: object) -> str:
    """A path or name quoted and escaped for a message: 'a\\nb.png'; long ones cut in the middle, with their length,
    so that a path keeps its file name (and a message does not depend on how deep the folder is)."""
    text = str(text)
    if len(text) <= MAX_SHOWN:
        return repr(text)
    head, tail = MAX_SHOWN // 4, MAX_SHOWN - MAX_SHOWN // 4
    return f"{text[:head]!r}...{text[-tail:]!r} ({len(text)} characters)"


def shown(value: object) -> str:
    """A short, escaped rendering of any value from a user's file: never the whole of a large one."""
    text = _repr.repr(value)  # bounded: reprlib stops at maxlist items and maxlevel levels
    cut = len(text) > MAX_SHOWN or "..." in text
    if len(text) > MAX_SHOWN:
        text = text[:MAX_SHOWN] + "..."
    return escape(text) + (f" ({_size(value)})" if cut and _size(value) else "")


def _size(value: object) -> str:
    if isinstance(value, str):
        return f"{len(value)} characters"
    if isinstance(value, (list, tuple, dict, set)):
        return f"{len(value)} items"
    return ""


def error_line(text: str, hint: str = "") -> str:
    """The one line a user-facing problem becomes on stderr: 'error: <what and where>[ (hint)]'."""
    if len(text) > MAX_LINE:
        text = f"{text[:MAX_LINE]}... ({len(text)} characters)"
    return escape(f"error: {text}" + (f" ({hint})" if hint else ""))
