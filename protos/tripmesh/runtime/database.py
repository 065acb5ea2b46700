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
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((job, future))
        return await future

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

    def _commit_batch(self, batch: list[tuple[Job, Reply]]) -> None:
        outcomes: list[tuple[Reply, Any, BaseException | None]] = []
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job, reply in batch:
                if not _start(reply):
                    continue  # its caller gave up before it began
                conn.execute("SAVEPOINT job")
                try:
                    result = job(conn)
                except Exception as exc:  # noqa: BLE001 - the job's own failure: undo only its writes
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((reply, None, exc))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((reply, result, None))
            conn.execute("COMMIT")
        except Exception as exc:  # the batch could not be committed: nobody succeeded
            log.exception("sqlite batch failed on %s", self.path)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(reply, None, exc) for _, reply in batch]
        # Results are released only after COMMIT returned: nothing is
        # acknowledged before it is durable.
        _deliver(outcomes)


Reply = Future[Any] | asyncio.Future[Any]


def _start(reply: Reply) -> bool:
    """Mark a job's reply as started; False if its caller cancelled it already."""
    if isinstance(reply, Future):
        return reply.running() or reply.set_running_or_notify_cancel()
    return not reply.cancelled()


def _deliver(outcomes: list[tuple[Reply, Any, BaseException | None]]) -> None:
    """Hand each result to its caller: one wake-up per event loop for the whole batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Reply, Any, BaseException | None]]] = {}
    for outcome in outcomes:
        reply = outcome[0]
        if isinstance(reply, Future):
            _settle([outcome])
        else:
            by_loop.setdefault(reply.get_loop(), []).append(outcome)
    for loop, settled in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, settled)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle(outcomes: list[tuple[Reply, Any, BaseException | None]]) -> None:
    for reply, result, error in outcomes:
        if reply.done():  # an awaiting caller was cancelled meanwhile
            continue
        if error is None:
            reply.set_result(result)
        else:
            reply.set_exception(error)
