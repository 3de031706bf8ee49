"""The one exception type users see.

Every problem caused by bad input (recipe, parameters, model files, output path) is raised as a
`MergeError` whose message is a single line that says what is wrong and, where possible, what to
do. The CLI prints that line and exits with status 2; the app shows it in the job's status.
"""

from __future__ import annotations


class MergeError(Exception):
    """A user-facing error with a one-line explanation."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class Cancelled(MergeError):
    """Raised inside long work when its cancel token is set."""

    def __init__(self, message: str = "cancelled"):
        super().__init__(message)
