"""The shared runtime: failpoint parsing and group commit."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tripmesh.runtime import failpoints, logs, rpc
from tripmesh.runtime.database import Database, StorageUnavailable


def test_failpoints_parse_and_refuse_unknown_names() -> None:
    armed = failpoints.arm_from_env(
        {"TRIPMESH_FAILPOINTS": "2pc.after_decision=crash, participant.after_vote_yes=crash@3"}
    )
    assert armed == {"2pc.after_decision": 1, "participant.after_vote_yes": 3}
    with pytest.raises(ValueError, match="unknown failpoint"):
        failpoints.arm_from_env({"TRIPMESH_FAILPOINTS": "2pc.after_decisoin=crash"})
    with pytest.raises(ValueError, match="unknown action 'sleep'"):
        failpoints.arm_from_env({"TRIPMESH_FAILPOINTS": "2pc.after_decision=sleep"})
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        failpoints.arm_from_env({"TRIPMESH_FAILPOINTS": "2pc.after_decision=explode"})
    armed = failpoints.arm_from_env(
        {"TRIPMESH_FAILPOINTS": "coordinator.create_trip=raise@2,participant.take=sleep:0.5"}
    )
    assert armed == {"coordinator.create_trip": 2, "participant.take": 1}
    assert failpoints.arm_from_env({}) == {}


def test_a_raise_failpoint_fires_on_its_hit_and_only_once() -> None:
    failpoints.arm_from_env({"TRIPMESH_FAILPOINTS": "coordinator.create_trip=raise@2"})
    try:
        failpoints.hit("coordinator.create_trip")  # the first hit passes
        with pytest.raises(failpoints.FailpointFired):
            failpoints.hit("coordinator.create_trip")
        failpoints.hit("coordinator.create_trip")  # fired once: disarmed
    finally:
        failpoints.arm_from_env({})


def test_a_failing_job_leaves_no_trace_and_spares_its_batch(tmp_path: Path) -> None:
    db = Database(tmp_path / "t.db", "CREATE TABLE IF NOT EXISTS t (x INTEGER CHECK (x > 0))")

    def insert(x: int):
        return lambda c: c.execute("INSERT INTO t VALUES (?)", (x,)).rowcount

    def insert_twice_then_fail(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES (100)")
        c.execute("INSERT INTO t VALUES (-1)")  # violates the CHECK

    async def go():
        return await asyncio.gather(
            db.run(insert(1)),
            db.run(insert_twice_then_fail),
            db.run(insert(2)),
            return_exceptions=True,
        )

    async def one_at_a_time():  # each job alone in its batch
        done = []
        for job in (insert(3), insert_twice_then_fail, insert(4)):
            try:
                done.append(await db.run(job))
            except sqlite3.IntegrityError as exc:
                done.append(exc)
        return done

    results = asyncio.run(go())
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], sqlite3.IntegrityError)
    rows = db.run_sync(lambda c: [r[0] for r in c.execute("SELECT x FROM t ORDER BY x")])
    assert rows == [1, 2]  # the 100 of the failed job was rolled back with it
    alone = asyncio.run(one_at_a_time())
    assert alone[0] == 1 and alone[2] == 1 and isinstance(alone[1], sqlite3.IntegrityError)
    rows = db.run_sync(lambda c: [r[0] for r in c.execute("SELECT x FROM t ORDER BY x")])
    assert rows == [1, 2, 3, 4]
    db.close()
    # Durable: a new connection sees the committed rows.
    again = Database(tmp_path / "t.db")
    assert again.run_sync(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0]) == 4
    again.close()


def test_a_fired_failpoint_is_not_armed_again_after_restart(tmp_path: Path) -> None:
    env = {
        "TRIPMESH_FAILPOINTS": "2pc.after_decision=crash,saga.after_step_rpc=crash",
        "TRIPMESH_FAILPOINT_DIR": str(tmp_path),
    }
    assert set(failpoints.arm_from_env(env)) == {"2pc.after_decision", "saga.after_step_rpc"}
    (tmp_path / "2pc.after_decision.fired").touch()  # as `hit` leaves it before the kill
    assert set(failpoints.arm_from_env(env)) == {"saga.after_step_rpc"}
    failpoints.arm_from_env({})


def test_a_dead_writer_fails_every_pending_and_later_call_at_once(tmp_path: Path) -> None:
    db = Database(tmp_path / "t.db", "CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    causes: list[BaseException] = []
    db.on_writer_death(causes.append)
    entered, release = threading.Event(), threading.Event()

    def blocker(c: sqlite3.Connection) -> None:
        entered.set()
        release.wait(5)
        raise failpoints.FailpointFired("test")  # what no job handler may catch

    async def go() -> tuple[list[object], float, object]:
        first = asyncio.ensure_future(db.run(blocker))
        while not entered.is_set():
            await asyncio.sleep(0.001)
        queued = [asyncio.ensure_future(db.run(lambda c: 1)) for _ in range(3)]
        await asyncio.sleep(0.01)  # they wait behind the batch in progress
        started = time.monotonic()
        release.set()
        results = await asyncio.wait_for(
            asyncio.gather(first, *queued, return_exceptions=True), timeout=1.0
        )
        elapsed = time.monotonic() - started
        try:
            await db.run(lambda c: 1)
        except StorageUnavailable as exc:
            later: object = exc
        else:
            later = None
        return list(results), elapsed, later

    results, elapsed, later = asyncio.run(go())
    assert all(isinstance(r, StorageUnavailable) for r in results), results
    assert all(r.kind.name == "UNAVAILABLE" for r in results)  # type: ignore[attr-defined]
    assert elapsed < 1.0
    assert isinstance(later, StorageUnavailable)
    assert not db.writer_alive
    assert len(causes) == 1 and isinstance(causes[0], failpoints.FailpointFired)
    late: list[BaseException] = []
    db.on_writer_death(late.append)  # registered after the death: told at once
    assert late == causes
    db.close()


def test_a_storage_failure_is_unavailable_and_the_writer_goes_on(tmp_path: Path) -> None:
    db = Database(tmp_path / "t.db", "CREATE TABLE IF NOT EXISTS t (x INTEGER)")

    def full(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES (1)")
        raise sqlite3.OperationalError("database or disk is full")

    async def go() -> list[object]:
        return await asyncio.gather(
            db.run(full),
            db.run(lambda c: c.execute("INSERT INTO t VALUES (2)").rowcount),
            return_exceptions=True,
        )

    failed, written = asyncio.run(go())
    assert isinstance(failed, StorageUnavailable) and "disk is full" in failed.message
    assert written == 1
    assert db.writer_alive
    assert db.run_sync(lambda c: [r[0] for r in c.execute("SELECT x FROM t")]) == [2]
    db.close()


def test_reads_never_wait_for_a_write_batch(tmp_path: Path) -> None:
    db = Database(tmp_path / "t.db", "CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    db.run_sync(lambda c: c.execute("INSERT INTO t VALUES (1)"))
    entered, release = threading.Event(), threading.Event()

    def slow_write(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES (2)")
        entered.set()
        release.wait(5)  # the batch stays open, uncommitted, until released

    async def go() -> tuple[list[int], float, list[int]]:
        writing = asyncio.ensure_future(db.run(slow_write))
        while not entered.is_set():
            await asyncio.sleep(0.001)
        started = time.monotonic()
        during = await asyncio.wait_for(
            db.read(lambda c: [r[0] for r in c.execute("SELECT x FROM t ORDER BY x")]), 1.0
        )
        elapsed = time.monotonic() - started
        release.set()
        await writing
        after = await db.read(lambda c: [r[0] for r in c.execute("SELECT x FROM t ORDER BY x")])
        return during, elapsed, after

    during, elapsed, after = asyncio.run(go())
    assert during == [1]  # the snapshot before the open batch
    assert elapsed < 0.5
    assert after == [1, 2]  # a read after the write returned sees it
    db.close()


def test_a_process_given_a_log_file_writes_it_itself_rotated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "flight.log"
    monkeypatch.setenv(logs.LOG_FILE_VARIABLE, str(path))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("flight")
        (handler,) = root.handlers
        assert isinstance(handler, logging.handlers.RotatingFileHandler)
        assert (handler.maxBytes, handler.backupCount) == (logs.ROTATE_BYTES, logs.ROTATE_KEEP)
        logs.bind(trip_id="trip-1")
        logging.getLogger("services.participant.servicer").info("commit trip-1-flight")
        logging.getLogger("services.participant.servicer").debug("prepare trip-1-flight")
        handler.close()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    (line,) = path.read_text().splitlines()  # INFO only, as JSON, with the trip in scope
    entry = json.loads(line)
    assert (entry["process"], entry["msg"], entry["trip_id"]) == (
        "flight",
        "commit trip-1-flight",
        "trip-1",
    )


def test_the_log_rolls_over_before_a_line_would_pass_its_size_and_loses_none(
    tmp_path: Path,
) -> None:
    path = tmp_path / "coordinator.log"
    path.write_text("x" * 100 + "\n")  # a log already there: its size counts
    handler = logs.RotatingLog(str(path), max_bytes=1000, keep=2)
    handler.setFormatter(logs.JsonFormatter("coordinator"))
    logger = logging.getLogger("test.rotation")
    logger.propagate, logger.handlers[:] = False, [handler]
    logger.setLevel(logging.INFO)
    try:
        for n in range(40):
            logger.info("line %02d", n)
    finally:
        handler.close()
    files = [path, path.with_name("coordinator.log.1"), path.with_name("coordinator.log.2")]
    assert all(f.exists() for f in files)
    assert not path.with_name("coordinator.log.3").exists()  # two old files kept
    assert all(f.stat().st_size < 1000 for f in files)
    # The newest 40 lines, none split or lost, in order, across the files kept.
    lines = [line for f in reversed(files) for line in f.read_text().splitlines()]
    messages = [json.loads(line)["msg"] for line in lines if line.startswith("{")]
    assert messages == [f"line {n:02d}" for n in range(40 - len(messages), 40)]
    assert len(messages) >= 12  # three files of about six lines each


def test_several_addresses_make_one_balanced_target_with_health_checking() -> None:
    assert rpc.target("127.0.0.1:15050") == "127.0.0.1:15050"
    assert rpc.channel_options("127.0.0.1:15050") == []
    assert rpc.target("127.0.0.1:1, localhost:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    (config,) = [json.loads(v) for k, v in rpc.channel_options("127.0.0.1:1,127.0.0.1:2")]
    assert config == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
    }
    for bad in ("db.example:1,127.0.0.1:2", "127.0.0.1:x,127.0.0.1:2", " , "):
        with pytest.raises(ValueError):
            rpc.target(bad)


def test_a_metrics_child_looked_up_once_is_the_one_labels_gives() -> None:
    from prometheus_client import CollectorRegistry, Counter

    from tripmesh.runtime.prometheus import Children

    registry = CollectorRegistry()
    steps = Counter("steps", "steps", ["step", "outcome"], registry=registry)
    children = Children(steps)
    children("reserve", "confirmed").inc()
    children("reserve", "confirmed").inc()
    children("reserve", "refused").inc()
    assert children("reserve", "confirmed") is steps.labels("reserve", "confirmed")
    value = registry.get_sample_value
    assert value("steps_total", {"step": "reserve", "outcome": "confirmed"}) == 2
    assert value("steps_total", {"step": "reserve", "outcome": "refused"}) == 1
