"""The shared runtime: failpoint parsing and group commit."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from tripmesh.runtime import failpoints
from tripmesh.runtime.database import Database


def test_failpoints_parse_and_refuse_unknown_names() -> None:
    armed = failpoints.arm_from_env(
        {"TRIPMESH_FAILPOINTS": "2pc.after_decision=crash, participant.after_vote_yes=crash@3"}
    )
    assert armed == {"2pc.after_decision": 1, "participant.after_vote_yes": 3}
    with pytest.raises(ValueError, match="unknown failpoint"):
        failpoints.arm_from_env({"TRIPMESH_FAILPOINTS": "2pc.after_decisoin=crash"})
    with pytest.raises(ValueError, match="only 'crash'"):
        failpoints.arm_from_env({"TRIPMESH_FAILPOINTS": "2pc.after_decision=sleep"})
    assert failpoints.arm_from_env({}) == {}


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

    results = asyncio.run(go())
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], sqlite3.IntegrityError)
    rows = db.run_sync(lambda c: [r[0] for r in c.execute("SELECT x FROM t ORDER BY x")])
    assert rows == [1, 2]  # the 100 of the failed job was rolled back with it
    db.close()
    # Durable: a new connection sees the committed rows.
    again = Database(tmp_path / "t.db")
    assert again.run_sync(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0]) == 2
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
