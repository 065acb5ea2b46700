"""A PostgreSQL database as tripmesh's stores use it: a connection pool on a thread of its
own, one transaction per call, faults as StorageUnavailable.

What `tripmesh.runtime.database.Database` is to SQLite, `PostgresDatabase` is to a
PostgreSQL server; the stores (the coordinator's trip log, a participant's books)
write their own SQL and hand it here as a job, a coroutine function of a connection.

- **Its own event loop.** The pool (psycopg 3's `AsyncConnectionPool`) lives on an
  event loop on a thread of its own, as SQLite's writer lives on its thread:
  callers on any loop await a call without blocking it, and `close()` (synchronous,
  called by servers from their running loop) can finish the work in flight and
  close the pool by simply waiting. `aclose()` does the same from a coroutine.
- **One transaction per call, pipelined.** Writes run in READ COMMITTED; a read of
  more than one statement runs in one REPEATABLE READ, READ ONLY transaction (one
  snapshot, as SQLite's readers have); a read of one statement is atomic on its own.
  Readers never wait for writers (MVCC). A transaction runs in psycopg's pipeline
  mode: BEGIN and the statements are sent without waiting for each other's answers,
  so a job costs a round trip only where it reads a result, plus one for the
  COMMIT. (A cursor's `rowcount` is not known before its result is read: jobs count
  what `RETURNING` gave them instead.)
- **Calls of one key apply in the order they were issued** (a trip's writes, one
  reservation's steps): the pool would run them on separate connections, so calls
  naming the same key take turns here.
- **Faults.** A connection or server failure (`psycopg.OperationalError`, a pool
  timeout, a deadlock) raises `StorageUnavailable` (UNAVAILABLE): the transaction
  was rolled back. One case differs, and its message says so: the connection lost
  while COMMIT was in flight, when the outcome is unknown (a property of every
  client-server database; SQLite in-process has no such window). A statement the
  server refuses for the state of the connection's transaction (SQLSTATE class 25)
  closes that connection, logged; a read then runs once more on another, a write
  fails with StorageUnavailable (nothing of it committed). (The chaos lab met it when
  cancelled callers cancelled their transactions mid-pipeline; they no longer do, see
  `call`.) Constraint violations and SQL errors stay what they are (bugs). If the
  thread dies, every call fails at once and `on_failure` is told.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any, Literal, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from tripmesh.runtime import rpc
from tripmesh.runtime.database import StorageUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)
Conn = AsyncConnection[Any]
Job = Callable[[Conn], Awaitable[T]]
# write: READ COMMITTED; snapshot: several reads, one snapshot; statement: one read, on its
# own (writes never run so: a connection lost during one would leave its outcome unknown).
How = Literal["write", "snapshot", "statement"]
# What the server or the way to it reports when it cannot do a call: the connection is lost,
# the server shuts down, is full, out of resources or in recovery, no connection came in
# time (the pool's errors are OperationalErrors too), a deadlock; and a standby's refusal
# to write (after a failover). Constraint violations and SQL errors are not among them.
UNAVAILABLE = (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction)
# Serialises schema creation between processes starting at once (an arbitrary number).
_SCHEMA_LOCK = 0x7472_6970


class PostgresDatabase:
    """One database at `dsn` (a libpq connection string), for the store named `what`.

    Construction connects, runs `migrate` (a job: create or check the schema) on a
    connection of its own and fills the pool, blocking, as SQLite's `Database` does.
    `timeout`: how long a call waits for a connection before it fails with
    `StorageUnavailable`. `reconnect_timeout`: how long the pool keeps retrying one lost
    connection; its back-off doubles each time (1, 2, 4 ... s) until then, so this also
    bounds how long the store may lag behind a server that came back.

    A connection is not checked before each call (that would cost a round trip per
    call): after a server restart, each pooled connection fails its next call once with
    StorageUnavailable, nothing written, and the pool replaces it.
    """

    def __init__(
        self,
        dsn: str,
        migrate: Job[None],
        *,
        what: str,
        min_size: int = 2,
        max_size: int = 10,
        timeout: float = 5.0,
        reconnect_timeout: float = 10.0,
    ) -> None:
        self.what = what
        self._callbacks: list[Callable[[BaseException], None]] = []
        # Set if the thread died: what every call then raises, and why.
        self._dead: StorageUnavailable | None = None
        self._death_cause: BaseException | None = None
        self._waiting: set[Future[Any]] = set()  # calls not yet answered
        # Touched on the loop only: each key's calls in turn, and the calls under way.
        self._turns: dict[str, _Turn] = {}
        self._calls: set[asyncio.Task[Any]] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._loop = rpc.new_event_loop()  # uvloop: psycopg waits on it at every round trip
        self._thread = threading.Thread(target=self._serve, name=f"postgres:{what}", daemon=True)
        self._thread.start()
        try:
            self._pool = self.blocking(
                self._open(dsn, migrate, min_size, max_size, timeout, reconnect_timeout)
            )
        except BaseException:
            self._stop_loop()
            raise
        #: Background work on this database's loop (`spawn`), cancelled by `close`.
        self._background: list[Future[Any]] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The database's own event loop: what runs on it must never block."""
        return self._loop

    @property
    def on_own_thread(self) -> bool:
        return threading.current_thread() is self._thread

    async def _open(
        self,
        dsn: str,
        migrate: Job[None],
        min_size: int,
        max_size: int,
        timeout: float,
        reconnect_timeout: float,
    ) -> AsyncConnectionPool[Any]:
        pool: AsyncConnectionPool[Any] | None = None
        try:
            # The schema first, on a connection of its own: its error says what went wrong,
            # where a pool's says only that it could not fill up.
            conn = await AsyncConnection.connect(
                dsn, autocommit=True, connect_timeout=max(1, round(timeout))
            )
            async with conn:
                await migrate(conn)
            pool = AsyncConnectionPool(
                dsn,
                kwargs={"autocommit": True},  # transactions are explicit: conn.transaction()
                min_size=min_size,
                max_size=max_size,
                open=False,
                timeout=timeout,
                reconnect_timeout=reconnect_timeout,
                name=self.what,
                configure=self._configure,
            )
            await pool.open(wait=True, timeout=timeout)
        except BaseException as exc:
            if pool is not None:
                await pool.close()
            if isinstance(exc, UNAVAILABLE):
                raise unavailable(exc, committing=False) from exc
            raise
        return pool

    async def _configure(self, conn: Conn) -> None:
        """A new pooled connection: the server's warnings reach the log (a BEGIN inside a
        transaction, for one, is only a warning)."""
        conn.add_notice_handler(self._notice)

    def _notice(self, diagnostic: psycopg.errors.Diagnostic) -> None:
        if diagnostic.severity_nonlocalized in ("NOTICE", "DEBUG", "LOG", "INFO"):
            return
        log.warning(
            "%s: PostgreSQL says %s %s: %s",
            self.what,
            diagnostic.severity_nonlocalized,
            diagnostic.sqlstate,
            diagnostic.message_primary,
        )

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """`callback(cause)` runs if the thread dies (its event loop stopped by an exception:
        SystemExit or KeyboardInterrupt raised on it), as SQLite's do when its writer dies;
        at once if it has. Then no call can ever be answered: the process must restart. A
        server that is down is not such a failure: calls fail with StorageUnavailable
        meanwhile, and the pool reconnects when it is back (a restarted process would find
        the server no sooner)."""
        self._callbacks.append(callback)
        if self._death_cause is not None:
            callback(self._death_cause)

    def _serve(self) -> None:
        try:
            self._loop.run_forever()
        except BaseException as cause:  # noqa: BLE001 - any death of the thread must be loud
            self._die(cause)

    def _die(self, cause: BaseException) -> None:
        log.critical("the %s's thread died (%r): failing every call", self.what, cause)
        dead = StorageUnavailable(
            f"storage unavailable: the {self.what}'s thread stopped ({cause!r});"
            " this server is restarting, retry the call"
        )
        with self._lock:
            self._dead, self._death_cause = dead, cause
            stranded = list(self._waiting)
        for callback in self._callbacks:
            try:
                callback(cause)
            except Exception:
                log.exception("store-failure callback failed")
        for future in stranded:
            with contextlib.suppress(InvalidStateError):
                future.set_exception(dead)

    def close(self) -> None:
        """Let the calls in flight finish, close the pool, stop the thread; later calls fail
        with StorageUnavailable. Blocks, like SQLite's `Database.close`."""
        if self.on_own_thread:
            raise RuntimeError(f"close() was called on the {self.what}'s own thread")
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._dead is None:
                asyncio.run_coroutine_threadsafe(self._finish(), self._loop).result()
            else:  # its thread is gone; the loop can still run, on a thread of its own
                last = threading.Thread(
                    target=self._loop.run_until_complete, args=(self._finish(),)
                )
                last.start()
                last.join()
        finally:
            self._stop_loop()

    async def aclose(self) -> None:
        """`close()`, awaited without blocking the caller's event loop."""
        await asyncio.to_thread(self.close)

    async def _finish(self) -> None:
        for work in self._background:
            work.cancel()
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=self._pool.timeout)
        await self._pool.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    # -- running calls on the loop ---------------------------------------------------
    def spawn(self, work: Coroutine[Any, Any, Any]) -> Future[Any]:
        """Run `work` on the database's loop until it ends or the database closes."""
        running = asyncio.run_coroutine_threadsafe(work, self._loop)
        self._background.append(running)
        return running

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run `callback` on the database's loop (nothing once it is closed)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(callback)

    def submit(self, work: Coroutine[Any, Any, T]) -> Future[T]:
        with self._lock:
            if self._closed or self._dead is not None:
                work.close()
                raise self._dead or StorageUnavailable(
                    f"storage unavailable: the {self.what} is closed"
                )
            future = asyncio.run_coroutine_threadsafe(work, self._loop)
            self._waiting.add(future)
        future.add_done_callback(self._answered)
        return future

    def _answered(self, future: Future[Any]) -> None:
        with self._lock:
            self._waiting.discard(future)

    def blocking(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` on the loop and wait for it (from any thread but the loop's)."""
        return self.submit(work).result()

    async def call(
        self,
        job: Job[T],
        how: How,
        *,
        key: str | None = None,
        committed: Callable[[T], object] | None = None,
    ) -> T:
        """`job` in one transaction (see `How`), from any event loop; calls naming the same
        `key` run one at a time, in the order they were made. `committed(result)` runs on
        the database's loop once the transaction has committed, and only then (not when
        it rolled back, nor when the connection was lost while committing): state kept
        beside the database changes only with it.

        A caller cancelled (its RPC cancelled, its deadline passed) stops waiting; the call
        itself runs on to its end, as a SQLite job does on its thread. Cancelled in the
        middle of psycopg's pipeline, a connection went back to the pool still in pipeline
        mode: the next read on it was never synced, and left an implicit transaction open
        (with a snapshot) for the next call's BEGIN to join."""
        work = self.transaction(job, how, key, committed)
        return await asyncio.shield(asyncio.wrap_future(self.submit(work)))

    def call_blocking(self, job: Job[T], how: How) -> T:
        """`call`, waited for by a thread that is not on an event loop (a metrics scrape)."""
        return self.blocking(self.transaction(job, how, None))

    async def transaction(
        self,
        job: Job[T],
        how: How,
        key: str | None,
        committed: Callable[[T], object] | None = None,
    ) -> T:
        """`call`'s work, awaited on the database's own loop."""
        call = asyncio.current_task()
        assert call is not None
        self._calls.add(call)
        try:
            result = await self._run(job, how, key)
            if committed is not None:
                committed(result)
            return result
        finally:
            self._calls.discard(call)

    async def _run(self, job: Job[T], how: How, key: str | None) -> T:
        async with self._turn(key):
            # A read whose connection was found in a bad state runs once more, on another.
            attempts = 1 if how == "write" else 2
            for attempt in range(1, attempts + 1):
                committing = False
                try:
                    async with self._pool.connection() as conn:
                        try:
                            if how == "statement":
                                return await job(conn)  # autocommit: its own transaction
                            # Pipelined: statements go out without waiting for the one
                            # before; a round trip happens only when the job reads a result,
                            # and once more for what is left and the COMMIT.
                            async with conn.pipeline(), conn.transaction():
                                if how == "snapshot":
                                    # Refused (class 25) unless it is the transaction's
                                    # first statement: no snapshot is taken inside a
                                    # transaction already under way.
                                    await conn.execute(
                                        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
                                    )
                                result = await job(conn)
                                committing = True  # what raises from here on is the COMMIT
                            return result
                        except psycopg.Error as exc:
                            if not _bad_transaction_state(exc):
                                raise
                            again = attempt < attempts
                            await self._discard(conn, exc, again=again)
                            if not again:
                                # Class 25 is a refusal: nothing of the call was committed.
                                raise unavailable(exc, committing=False) from exc
                except UNAVAILABLE as exc:
                    raise unavailable(exc, committing=committing) from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _discard(self, conn: Conn, exc: psycopg.Error, *, again: bool) -> None:
        """Close a connection the server found in another transaction state than its client
        did: it must serve no other call (closed, the pool replaces it)."""
        log.warning(
            "%s: the connection to backend %s was in a bad transaction state (%s: %s; the"
            " client saw %s): closed%s",
            self.what,
            conn.info.backend_pid,
            exc.sqlstate,
            str(exc).strip(),
            conn.info.transaction_status.name,
            ", the read runs again on another" if again else "",
        )
        await conn.close()

    @contextlib.asynccontextmanager
    async def _turn(self, key: str | None) -> AsyncIterator[None]:
        """Calls of one key, one at a time, in the order they reached this loop (an asyncio
        lock queues its waiters in order; a task's first step runs in order of submission)."""
        if key is None:
            yield
            return
        turn = self._turns.setdefault(key, _Turn())
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[key]


class _Turn:
    """Whose turn it is to write under one key, and how many calls want it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


def _bad_transaction_state(exc: psycopg.Error) -> bool:
    """SQLSTATE class 25, "invalid transaction state": the server refused the statement for
    the state of the connection's transaction, not for the statement itself."""
    return (exc.sqlstate or "").startswith("25")


def check_dsn(dsn: str, flag: str) -> None:
    """Refuse (ValueError naming `flag`) what is not a PostgreSQL connection string: a URL,
    postgresql://user@host:port/database, or libpq's key=value form."""
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ValueError(
            f"{flag} {dsn!r}: not a PostgreSQL connection string ({str(exc).strip()}); give"
            " postgresql://user@host:port/database, or leave it empty for SQLite in the data"
            " folder"
        ) from None


def unavailable(exc: psycopg.Error, *, committing: bool) -> StorageUnavailable:
    """What a failure of the connection or server means to the caller."""
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if committing:
        return StorageUnavailable(
            f"storage unavailable (PostgreSQL: {why}) while committing: the call may or may"
            " not have been written; read it back or retry it"
        )
    return StorageUnavailable(
        f"storage unavailable (PostgreSQL: {why}); nothing was written, retry the call"
    )


def migrate(schema: str, version: int, *, what: str, table: str) -> Job[None]:
    """A job that creates `schema` (statements separated by ';') in a new database, or checks
    that one holding `table` was written with schema `version` of `what` (else refuses it:
    start on an empty database) and then changes nothing, taking no lock on its tables.
    Processes starting at once take turns."""

    async def job(conn: Conn) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS tripmesh_schema"
                " (what TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
            cur = await conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL, (SELECT version FROM tripmesh_schema"
                " WHERE what = %s)",
                (table, what),
            )
            row = await cur.fetchone()
            assert row is not None
            has_table, found = row
            if has_table and found != version:
                raise RuntimeError(
                    f"the {what} was written by another version of tripmesh (schema {found},"
                    f" this one reads {version}); start on an empty database"
                )
            if has_table:
                # Written already (the schema and its version commit together). Its
                # statements again would lock tables in use: CREATE INDEX IF NOT EXISTS
                # takes its table's SHARE lock before it looks, and a replica restarting
                # under traffic deadlocked with the live writers.
                return
            for statement in filter(str.strip, schema.split(";")):
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO tripmesh_schema (what, version) VALUES (%s, %s)"
                " ON CONFLICT (what) DO UPDATE SET version = EXCLUDED.version",
                (what, version),
            )

    return job


async def rows(conn: Conn, sql: str, args: Sequence[object] = ()) -> list[DictRow]:
    """Every row of `sql`, as dicts by column name."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(sql, args)
    return await cur.fetchall()
