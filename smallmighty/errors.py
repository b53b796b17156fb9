"""User-facing errors.

Anything a user can cause (a bad file, a bad flag, a missing model) raises `SlmError` with a message
that says what to fix. The CLI prints those messages without a traceback; everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class SlmError(Exception):
    """An error caused by the user's input, printed by the CLI as one clear line."""


class DataError(SlmError):
    """Bad input data, located by file, line and field so the user can go straight to it."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field = file, line, field
        where = ""
        if file is not None:
            where = str(file)
            if line is not None:
                where += f", line {line}"
        if field is not None:
            where += (", " if where else "") + f"field '{field}'"
        super().__init__(f"{where}: {message}" if where else message)
