"""The rules every server applies to the fields it is sent, in one place.

The coordinator and the participants check ids, free text and dates the same
way, so that nothing one refuses can reach the other by another road. A bad
value is quoted in the error by a short prefix only (`quote`): an error
message never grows with the input, and never carries a megabyte back to the
client in its metadata.
"""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp

from tripmesh.runtime.errors import FieldViolation

#: The longest id (idempotency key, customer, trip, reservation, resource) anyone may send.
MAX_ID = 128
#: The longest free text (an operator's reason).
MAX_TEXT = 500
_QUOTED = 24  # characters of a bad value an error message shows


def quote(value: str) -> str:
    """`value` for an error message: its repr, cut to a short prefix when it is long."""
    if len(value) <= _QUOTED:
        return repr(value)
    return f"{value[:_QUOTED]!r}... ({len(value):,} characters)"


def check_text(
    value: str,
    field: str,
    problems: list[FieldViolation],
    *,
    most: int = MAX_ID,
    required: bool = True,
) -> None:
    """An id or a line of text: present (when required), at most `most` characters,
    printable, and not only blanks."""
    if not value:
        if required:
            problems.append(FieldViolation(field, "is required"))
    elif len(value) > most:
        problems.append(FieldViolation(field, f"is {len(value):,} characters; at most {most}"))
    elif not value.isprintable():
        problems.append(FieldViolation(field, "must be printable text"))
    elif not value.strip():
        problems.append(FieldViolation(field, "must not be blank"))


def parse_day(
    value: str, field: str, problems: list[FieldViolation], *, days: int = 1
) -> dt.date | None:
    """A YYYY-MM-DD date that starts `days` days still inside the calendar; else a violation.

    Python's `date.fromisoformat` also takes 20301010 and 2030-W01-1; a date is
    accepted only in the one form it is written back in.
    """
    if not value:
        problems.append(FieldViolation(field, "is required (YYYY-MM-DD)"))
        return None
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        day = None
    if day is None or day.isoformat() != value:
        problems.append(FieldViolation(field, f"{quote(value)} is not a date (YYYY-MM-DD)"))
        return None
    if (dt.date.max - day).days < max(days, 1):  # integers: a huge count cannot overflow
        problems.append(FieldViolation(field, f"{days} days from {value} run past the calendar"))
        return None
    return day


def check_count(value: int, field: str, most: int, problems: list[FieldViolation]) -> None:
    """A count of nights, days or units: 1 to `most`."""
    if not 1 <= value <= most:
        problems.append(FieldViolation(field, f"must be 1 to {most}, got {value}"))


def seconds_of(stamp: Timestamp, field: str, problems: list[FieldViolation]) -> float | None:
    """A google.protobuf.Timestamp as seconds since the epoch; a violation when it is out of
    the range the type allows (years 1 to 9999) or its nanos are not 0 to 999,999,999."""
    try:
        return float(stamp.ToNanoseconds()) / 1e9
    except ValueError:
        problems.append(
            FieldViolation(field, f"is not a valid time ({stamp.seconds}s, {stamp.nanos}ns)")
        )
        return None
