"""A real PostgreSQL server for tests: in a temporary folder of its own, always stopped.

The folder comes from `tripmesh.runtime.postgres.base_folder()` (mode 0755 under
/tmp), not pytest's `tmp_path`: as root the server runs as `nobody`, who cannot
enter /tmp/pytest-of-root (mode 0700).
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import socket
from collections.abc import Iterator

from tripmesh.runtime.postgres import PostgresServer, base_folder

_databases = itertools.count()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of asking."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A started server; on the way out, whatever happened, it is stopped (killed if it
    will not stop) and its folder removed."""
    base = base_folder()
    server = PostgresServer(base / "data")
    try:
        server.init()
        server.start(free_port())
        yield server
    finally:
        try:
            server.stop()
        finally:
            server.kill()  # nothing if it stopped
            shutil.rmtree(base, ignore_errors=True)


def fresh_database(server: PostgresServer) -> str:
    """A new empty database on `server`; its DSN."""
    name = f"test_{next(_databases)}"
    server.create_database(name)
    return server.dsn(name)
