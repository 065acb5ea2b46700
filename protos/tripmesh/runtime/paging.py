"""Page tokens: opaque to clients, a row number to us, and checked like any other input."""

from __future__ import annotations

from tripmesh.runtime.errors import FieldViolation, invalid

_MAX_DIGITS = 18  # fits SQLite's 64-bit INTEGER


def position_from_token(token: str, field: str = "page_token") -> int:
    """The row number a token stands for (0 for the first page); INVALID_ARGUMENT otherwise."""
    if not token:
        return 0
    if not (token.isascii() and token.isdigit() and len(token) <= _MAX_DIGITS):
        raise invalid(FieldViolation(field, "is not a token this server issued"))
    return int(token)
