"""Page tokens: opaque to clients, a row number to us, and checked like any other input.

`position_from_token` is the server's side; `paged` the client's (every item of a List).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from tripmesh.runtime.errors import FieldViolation, invalid

_MAX_DIGITS = 18  # fits SQLite's 64-bit INTEGER


def position_from_token(token: str, field: str = "page_token") -> int:
    """The row number a token stands for (0 for the first page); INVALID_ARGUMENT otherwise."""
    if not token:
        return 0
    if not (token.isascii() and token.isdigit() and len(token) <= _MAX_DIGITS):
        raise invalid(FieldViolation(field, "is not a token this server issued"))
    return int(token)


def paged(fetch: Callable[[str], Any], field: str) -> Iterator[Any]:
    """Every item of a paginated List call: `fetch(token)` returns a page with `field`."""
    token = ""
    while True:
        page = fetch(token)
        yield from getattr(page, field)
        token = page.next_page_token
        if not token:
            return
