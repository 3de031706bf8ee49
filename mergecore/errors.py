"""The one exception type users see.

Every problem caused by bad input (recipe, parameters, model files, output path) is raised as a
`MergeError` whose message is a single line that says what is wrong and, where possible, what to
do. The CLI prints that line and exits with status 2; the app shows it in the job's status.
"""

from __future__ import annotations

import reprlib


class MergeError(Exception):
    """A user-facing error with a one-line explanation."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class Cancelled(MergeError):
    """Raised inside long work when its cancel token is set."""

    def __init__(self, message: str = "cancelled"):
        super().__init__(message)



_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


def clip(text: object, limit: int = 120) -> str:
    """`str(text)` cut to `limit` characters: for a user's string (a key, a path, a name) that is
    shown as is, where `short` would add quotes."""
    s = " ".join(str(text)[: limit + 1].split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def short(value: object, limit: int = 120) -> str:
    """A bounded repr of `value` for error messages: a value from a user's file may be huge (an
    alias can expand to billions of items), and an error must stay one short line. Never walks
    more than a few levels and items of the value."""
    text = " ".join(_REPR.repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
