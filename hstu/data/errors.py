"""One-line errors for bad input data.

Every problem with a raw or processed file raises :class:`DataError`, whose message
names the file and, where known, the line and the field:

    ratings.dat:17: field rating: expected an integer, got 'x'
"""

from __future__ import annotations


class DataError(ValueError):
    """A bad input file: one line naming the file, the line (1-based) and/or the field."""

    def __init__(
        self, path: str, message: str, line: int | None = None, field: str | None = None
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field {field}:" if field else ""
        super().__init__(f"{where}:{what} {message}".replace("\n", " "))


__all__ = ["DataError"]
