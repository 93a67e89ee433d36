"""The one exception type for mistakes a user can fix.

Every error a user can cause (bad config, missing file or column, model not found offline, ...) is raised as
:class:`KoretError` with a one-line message that names the file, key or column and says what to do. The CLI
prints that line and exits with code 2; ``--debug`` shows the traceback. Anything else is a bug in koret and
keeps its traceback.
"""

from __future__ import annotations


class KoretError(Exception):
    """A user-fixable error. ``str(err)`` is the single line shown to the user."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)
