"""The mesh launcher's one root exception; each of its modules raises its own kind of it."""

from __future__ import annotations


class MeshError(Exception):
    """The mesh (its layout, supervisord, Toxiproxy) could not be brought to the state asked for."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
