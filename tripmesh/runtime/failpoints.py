"""Named fault points, for chaos, recovery and fault tests.

Off unless the environment variable TRIPMESH_FAILPOINTS names some, e.g.::

    TRIPMESH_FAILPOINTS="2pc.after_decision=crash,participant.after_vote_yes=crash@2"

Actions:

- `crash` sends SIGKILL to this very process (a real kill: no cleanup, no flush);
- `raise` raises `FailpointFired`, a BaseException, where the point is passed:
  on a database's writer thread it is a fault the writer cannot handle, and
  kills that thread (what the loud-fault tests inject);
- `sleep:SECONDS` blocks the thread that passes the point (inside a database
  job: holds its write batch open).

`@N` makes it fire on the N-th hit instead of the first; each fires once. The
names a process knows are listed in FAILPOINTS; an unknown name or action in
the variable is an error at start-up, so a typo cannot silently disable a test.

With TRIPMESH_FAILPOINT_DIR set, a failpoint that fires leaves a marker file
there first, and is not armed again when the process restarts with the same
environment: each fires once per run (what a chaos scenario wants).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FAILPOINTS = {
    "2pc.before_decision": "coordinator: every vote is in, the decision is not logged yet",
    "2pc.after_decision": "coordinator: the decision is logged, phase 2 has not started",
    "2pc.between_phase2": "coordinator: one participant acknowledged phase 2, others not yet",
    "3pc.before_decision": "coordinator: every 3PC vote is in, nothing stored yet",
    "3pc.after_precommit_decision": "coordinator: PRE_COMMIT is stored, no PreCommit sent",
    "3pc.between_docommits": "coordinator: one participant acknowledged DoCommit, others not",
    "saga.after_step_rpc": "coordinator: a saga step's RPC succeeded, its outcome is not logged",
    "saga.mid_compensation": "coordinator: one compensation acknowledged, others not yet",
    "coordinator.create_trip": "coordinator: a new trip is being written (inside the write batch)",
    "participant.after_vote_yes": "participant: a 2PC or 3PC yes vote is durable, not answered",
    "participant.before_commit": "participant: a Commit or DoCommit arrived, nothing applied",
    "participant.before_cancel": "participant: a Cancel (compensation) arrived, nothing applied yet",
    "participant.take": "participant: a Prepare or Reserve is being written (inside the batch)",
    "choreography.before_ack": "a service's step and its event are committed; the event it"
    " reacted to is not acknowledged yet",
    "outbox.before_publish": "an event is committed in the outbox, not published yet",
    "outbox.after_publish": "an event is published, not yet marked published in the outbox",
}


class FailpointFired(BaseException):
    """Raised by a failpoint armed with `raise`: a fault nothing is meant to catch."""


@dataclass
class _Armed:
    action: str  # crash, raise, sleep
    hits_left: int
    seconds: float = 0.0


_lock = threading.Lock()
_armed: dict[str, _Armed] = {}
_marker_dir: Path | None = None


def _parse(name: str, action: str, count: str) -> _Armed:
    kind, _, argument = action.partition(":")
    hits = int(count or 1)
    if kind in ("crash", "raise") and not argument:
        return _Armed(kind, hits)
    if kind == "sleep":
        try:
            return _Armed(kind, hits, float(argument))
        except ValueError:
            pass
    raise ValueError(
        f"TRIPMESH_FAILPOINTS: {name}: unknown action {action!r} (crash, raise or sleep:SECONDS)"
    )


def arm_from_env(environ: dict[str, str] | None = None) -> dict[str, int]:
    """Read TRIPMESH_FAILPOINTS; return what is armed (name -> hits left)."""
    env = environ if environ is not None else os.environ
    spec = env.get("TRIPMESH_FAILPOINTS", "")
    marker_dir = Path(env["TRIPMESH_FAILPOINT_DIR"]) if env.get("TRIPMESH_FAILPOINT_DIR") else None
    armed: dict[str, _Armed] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        action, _, count = action.partition("@")
        if name not in FAILPOINTS:
            raise ValueError(f"TRIPMESH_FAILPOINTS: unknown failpoint {name!r}")
        if marker_dir is None or not (marker_dir / f"{name}.fired").exists():
            armed[name] = _parse(name, action, count)
    global _marker_dir
    _marker_dir = marker_dir
    with _lock:
        _armed.clear()
        _armed.update(armed)
    if armed:
        log.warning("failpoints armed: %s", {n: a.action for n, a in armed.items()})
    return {name: a.hits_left for name, a in armed.items()}


def hit(name: str) -> None:
    """Pass the failpoint `name`: act if it is armed and due."""
    if not _armed:
        return
    with _lock:
        armed = _armed.get(name)
        if armed is None:
            return
        if armed.hits_left > 1:
            armed.hits_left -= 1
            return
        del _armed[name]
    log.critical("failpoint %s: %s", name, armed.action)
    if _marker_dir is not None:
        _marker_dir.mkdir(parents=True, exist_ok=True)
        (_marker_dir / f"{name}.fired").touch()
    if armed.action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    elif armed.action == "raise":
        raise FailpointFired(name)
    else:
        time.sleep(armed.seconds)
