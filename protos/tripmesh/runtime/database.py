"""One SQLite file behind one thread, with group commit.

Every call runs a function against the connection inside a transaction, on a
dedicated thread, so the asyncio event loop never blocks on SQLite. Calls that
arrive while a transaction is being written are committed together in the next
one: one fsync serves many requests (group commit), which is what makes durable
writes (``synchronous=FULL``) affordable. Each call runs in its own savepoint,
so a call that raises leaves no trace and does not spoil its batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]

log = logging.getLogger(__name__)

_MAX_BATCH = 512
_STOP = object()


def connect(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """Open `path` with the settings every tripmesh database uses."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is synced at every commit, so an acknowledged write
        # survives a power cut, not only a process crash.
        conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.row_factory = sqlite3.Row
    return conn


class Database:
    """A SQLite database owned by one writer thread.

    `schema` is executed once at start (it must be idempotent: CREATE ... IF NOT EXISTS).
    """

    def __init__(self, path: Path | str, schema: str = "") -> None:
        self.path = Path(path)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._conn = connect(self.path)
        if schema:
            self._conn.executescript(schema)
        self._thread = threading.Thread(
            target=self._run, name=f"sqlite:{self.path.name}", daemon=True
        )
        self._thread.start()

    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job(conn)` in a committed transaction and return its result."""
        return await asyncio.wrap_future(self.submit(job))

    def run_sync(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Blocking form of `run`, for start-up code and command-line tools."""
        return self.submit(job).result()

    def submit(self, job: Callable[[sqlite3.Connection], T]) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((job, future))
        return future

    def close(self) -> None:
        """Finish what is queued, then close the connection."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._commit_batch(batch)
        self._conn.close()

    def _commit_batch(self, batch: list[tuple[Job, Future[Any]]]) -> None:
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job, future in batch:
                if not future.set_running_or_notify_cancel():
                    continue
                conn.execute("SAVEPOINT job")
                try:
                    result = job(conn)
                except Exception as exc:  # noqa: BLE001 - the job's own failure: undo only its writes
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((future, None, exc))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((future, result, None))
            conn.execute("COMMIT")
        except Exception as exc:  # the batch could not be committed: nobody succeeded
            log.exception("sqlite batch failed on %s", self.path)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for _, future in batch:
                # A future still PENDING here never started; RUNNING ones are ours.
                if future.running() or future.set_running_or_notify_cancel():
                    future.set_exception(exc)
            return
        # Results are released only after COMMIT returned: nothing is
        # acknowledged before it is durable.
        for future, result, error in outcomes:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
