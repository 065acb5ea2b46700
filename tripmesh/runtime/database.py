"""One SQLite file: one writer thread with group commit, and readers beside it.

Writes (`run`) go to a dedicated thread, so the asyncio event loop never blocks
on SQLite. Calls that arrive while a transaction is being written are committed
together in the next one: one fsync serves many requests (group commit), which
is what makes durable writes (``synchronous=FULL``) affordable. Each call runs
in its own savepoint, so a call that raises leaves no trace and does not spoil
its batch.

Reads (`read`) never wait for a write batch or its fsync: they run on their own
connections in a small pool of reader threads, each in one read transaction (a
consistent snapshot; WAL lets readers run beside the writer). A read issued
after a write returned sees that write.

Faults are loud and have a meaning:

- A storage failure (disk full, I/O error, database locked past its timeout)
  fails the calls it touched with `StorageUnavailable` (UNAVAILABLE: nothing of
  theirs was written; the same call may succeed later). The writer goes on,
  and service resumes by itself when the storage does.
- If the writer thread itself dies, for any reason, every pending and later
  write fails at once with `StorageUnavailable`, and the callbacks given to
  `on_writer_death` run: the servers turn health NOT_SERVING and exit non-zero,
  so that their supervisor restarts them and recovery runs.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from tripmesh.runtime.errors import ErrorKind, TripmeshError

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]
Reply = Future[Any] | asyncio.Future[Any]
Outcome = tuple[Reply, Any, BaseException | None]

log = logging.getLogger(__name__)

_MAX_BATCH = 512
_READERS = 2
_STOP = object()


class StorageUnavailable(TripmeshError):
    """The database could not do the call; nothing of it was written. Retry it later."""

    kind = ErrorKind.UNAVAILABLE


def connect(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """Open `path` with the settings every tripmesh database uses."""
    if readonly:
        uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
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


def storage_error(exc: sqlite3.Error, path: Path) -> StorageUnavailable | None:
    """The meaning of a SQLite error: a storage failure, or None for the caller's own bug.

    Constraint violations (IntegrityError), SQL mistakes (ProgrammingError) and
    misuse stay what they are; whatever the storage itself reports (full, I/O
    error, locked, corrupt, read-only) means the call was not done.
    """
    if isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError):
        return None
    if isinstance(exc, sqlite3.OperationalError) and "no such" in str(exc):
        return None  # a missing table or column: a bug, not the storage
    return StorageUnavailable(
        f"storage unavailable ({path.name}: {exc}); nothing was written, retry the call"
    )


def sql_values(members: Iterable[enum.Enum]) -> str:
    """An enum's values as a SQL list for a CHECK (... IN (...)): the schema follows the code."""
    return ", ".join(f"'{member.value}'" for member in members)


def migrate(schema: str, version: int, *, table: str, what: str) -> Job:
    """A job that creates `schema` in a new database, or checks an old one is of `version`.

    A database written under another version is refused rather than misread;
    `table` is one the schema creates, `what` names the database in the message.
    """

    def job(conn: sqlite3.Connection) -> None:
        (found,) = conn.execute("PRAGMA user_version").fetchone()
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone()
        if exists is not None and found != version:
            raise RuntimeError(
                f"{what} was written by another version of tripmesh (schema {found},"
                f" this one reads {version}); `make reset` starts afresh"
            )
        for statement in filter(str.strip, schema.split(";")):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")

    return job


class Database:
    """A SQLite database owned by one writer thread, with reader threads beside it.

    `schema` is executed once at start (it must be idempotent: CREATE ... IF NOT EXISTS).
    """

    def __init__(self, path: Path | str, schema: str = "") -> None:
        self.path = Path(path)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._conn = connect(self.path)
        if schema:
            self._conn.executescript(schema)
        self._dead: StorageUnavailable | None = None
        self._death_cause: BaseException | None = None
        self._in_batch: list[tuple[Job, Reply]] = []
        self._death_callbacks: list[Callable[[BaseException], None]] = []
        self._local = threading.local()
        self._readers = ThreadPoolExecutor(
            _READERS, thread_name_prefix=f"sqlite-read:{self.path.name}"
        )
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"sqlite:{self.path.name}", daemon=True
        )
        self._thread.start()

    # -- writes ----------------------------------------------------------------
    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job(conn)` in a committed transaction and return its result."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._enqueue(job, future)
        return await future

    def run_sync(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Blocking form of `run`, for start-up code and command-line tools."""
        return self.submit(job).result()

    def submit(self, job: Callable[[sqlite3.Connection], T]) -> Future[T]:
        future: Future[T] = Future()
        self._enqueue(job, future)
        return future

    def _enqueue(self, job: Job, reply: Reply) -> None:
        """Queue a job for the writer; fail at once if the writer is dead."""
        if self._dead is not None:
            raise self._dead
        self._queue.put((job, reply))
        if self._dead is not None:  # the writer died meanwhile: nobody else will answer it
            self._fail_queued()

    def on_writer_death(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(cause)` (on the writer thread) if the writer ever dies; at once
        if it has died already."""
        self._death_callbacks.append(callback)
        if self._dead is not None and self._death_cause is not None:
            callback(self._death_cause)

    @property
    def writer_alive(self) -> bool:
        return self._dead is None

    # -- reads -----------------------------------------------------------------
    async def read(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job(conn)` in one read transaction on a reader thread; never waits for writes."""
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._read, job)

    def read_sync(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Blocking form of `read` (for threads that are not an event loop)."""
        return self._readers.submit(self._read, job).result()

    def _read(self, job: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        try:
            if conn is None:
                conn = self._local.conn = connect(self.path, readonly=True)
                with self._reader_lock:
                    self._reader_conns.append(conn)
            conn.execute("BEGIN")  # one snapshot for the whole job
            try:
                return job(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise (storage_error(exc, self.path) or exc) from exc

    # -- lifecycle -------------------------------------------------------------
    def close(self) -> None:
        """Finish what is queued, then close the connections."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._readers.shutdown(wait=True)
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    # -- the writer thread -----------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve_batches()
        except BaseException as exc:  # noqa: BLE001 - any death of the writer must be loud
            self._die(exc)
            return
        self._conn.close()

    def _serve_batches(self) -> None:
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
            self._in_batch = batch
            self._commit_batch(batch)
            self._in_batch = []

    def _commit_batch(self, batch: list[tuple[Job, Reply]]) -> None:
        outcomes: list[Outcome] = []
        conn = self._conn
        # A job alone in its batch needs no savepoint: if it fails, the transaction is
        # rolled back whole.
        alone = len(batch) == 1
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job, reply in batch:
                if not _start(reply):
                    continue  # its caller gave up before it began
                if not alone:
                    conn.execute("SAVEPOINT job")
                try:
                    result = job(conn)
                except Exception as exc:  # noqa: BLE001 - the job's own failure: undo only its writes
                    if alone:
                        conn.execute("ROLLBACK")
                    else:
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                    if isinstance(exc, sqlite3.Error):
                        exc = storage_error(exc, self.path) or exc
                    outcomes.append((reply, None, exc))
                else:
                    if not alone:
                        conn.execute("RELEASE job")
                    outcomes.append((reply, result, None))
            if conn.in_transaction:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:  # the batch could not be committed: nobody succeeded
            log.error("sqlite batch failed on %s: %s", self.path, exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")  # if this fails too, the writer dies (loudly)
            failure = storage_error(exc, self.path) or exc
            outcomes = [(reply, None, failure) for _, reply in batch]
        # Results are released only after COMMIT returned: nothing is
        # acknowledged before it is durable.
        _deliver(outcomes)

    def _die(self, cause: BaseException) -> None:
        log.critical(
            "the writer of %s died (%r): failing every call; the process must restart",
            self.path,
            cause,
        )
        self._death_cause = cause
        self._dead = StorageUnavailable(
            f"storage unavailable: the writer of {self.path.name} stopped ({cause!r});"
            " this server is restarting, retry the call"
        )
        # Told first, so that by the time a caller hears UNAVAILABLE its server is on
        # its way to NOT_SERVING.
        for callback in self._death_callbacks:
            try:
                callback(cause)
            except Exception:
                log.exception("writer-death callback failed")
        stranded = [reply for _, reply in self._in_batch if not reply.done()]
        _deliver([(reply, None, self._dead) for reply in stranded])
        self._fail_queued()
        try:
            self._conn.close()
        except sqlite3.Error:
            pass

    def _fail_queued(self) -> None:
        """Fail everything still queued (the writer is dead; nobody else will take it)."""
        assert self._dead is not None
        failed: list[Outcome] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                failed.append((item[1], None, self._dead))
        _deliver(failed)


def _start(reply: Reply) -> bool:
    """Mark a job's reply as started; False if its caller cancelled it already."""
    if isinstance(reply, Future):
        return reply.running() or reply.set_running_or_notify_cancel()
    return not reply.cancelled()


def _deliver(outcomes: list[Outcome]) -> None:
    """Hand each result to its caller: one wake-up per event loop for the whole batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
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


def _settle(outcomes: list[Outcome]) -> None:
    for reply, result, error in outcomes:
        if reply.done():  # an awaiting caller was cancelled meanwhile
            continue
        if error is None:
            reply.set_result(result)
        else:
            reply.set_exception(error)
