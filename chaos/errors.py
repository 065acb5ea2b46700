"""The chaos lab's one root exception; each module raises its own kind of it."""

from __future__ import annotations


class ChaosError(Exception):
    """Something in the lab's machinery (mesh, supervisor, Toxiproxy, layout) went wrong."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self._retryable = retryable

    @property
    def retryable(self) -> bool:
        """True when the same call may succeed later (a server was unreachable)."""
        return self._retryable
