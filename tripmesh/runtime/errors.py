"""The error vocabulary both sides share, and how it maps onto gRPC status codes.

Each component has one root exception (ParticipantError, CoordinatorError)
deriving from TripmeshError. The servers map them to status codes in one
place (`tripmesh.runtime.rpc`), so domain code never imports grpc.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ErrorKind(enum.Enum):
    INVALID = "invalid"  # INVALID_ARGUMENT
    NOT_FOUND = "not_found"  # NOT_FOUND
    CONFLICT = "conflict"  # ALREADY_EXISTS
    PRECONDITION = "precondition"  # FAILED_PRECONDITION
    EXHAUSTED = "exhausted"  # RESOURCE_EXHAUSTED
    UNAVAILABLE = "unavailable"  # UNAVAILABLE


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: `field` is its path in the request (e.g. ``hotel.nights``)."""

    field: str
    description: str


def describe(violations: tuple[FieldViolation, ...] | list[FieldViolation]) -> str:
    """The message that names every bad field: ``flight.seats: must be positive; car: ...``."""
    return "; ".join(f"{v.field}: {v.description}" for v in violations)


class TripmeshError(Exception):
    """Root of every error tripmesh raises on purpose."""

    kind: ErrorKind = ErrorKind.PRECONDITION

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind | None = None,
        violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind
        self.violations = violations

    @classmethod
    def invalid(cls, *violations: FieldViolation) -> TripmeshError:
        """An INVALID_ARGUMENT error of this class whose message names every bad field."""
        return cls(describe(violations), kind=ErrorKind.INVALID, violations=violations)


def invalid(*violations: FieldViolation) -> TripmeshError:
    """An INVALID_ARGUMENT error of the shared root (for code outside any one component)."""
    return TripmeshError.invalid(*violations)
