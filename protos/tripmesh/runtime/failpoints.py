"""Named crash points, for chaos and recovery tests.

Off unless the environment variable TRIPMESH_FAILPOINTS names some, e.g.::

    TRIPMESH_FAILPOINTS="2pc.after_decision=crash,participant.after_vote_yes=crash@2"

`crash` sends SIGKILL to this very process (a real kill: no cleanup, no
flush), `@N` makes it fire on the N-th hit instead of the first. The names a
process knows are listed in FAILPOINTS; an unknown name in the variable is an
error at start-up, so a typo cannot silently disable a test.

With TRIPMESH_FAILPOINT_DIR set, a failpoint that fires leaves a marker file
there first, and is not armed again when the process restarts with the same
environment: each fires once per run (what a chaos scenario wants).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

log = logging.getLogger(__name__)

FAILPOINTS = {
    "2pc.before_decision": "coordinator: every vote is in, the decision is not logged yet",
    "2pc.after_decision": "coordinator: the decision is logged, phase 2 has not started",
    "2pc.between_phase2": "coordinator: one participant acknowledged phase 2, others not yet",
    "saga.after_step_rpc": "coordinator: a saga step's RPC succeeded, its outcome is not logged",
    "saga.mid_compensation": "coordinator: one compensation acknowledged, others not yet",
    "participant.after_vote_yes": "participant: a yes vote is durable, the reply not sent",
    "participant.before_commit": "participant: a Commit arrived, nothing applied yet",
    "participant.before_cancel": "participant: a Cancel (compensation) arrived, nothing applied yet",
}

_lock = threading.Lock()
_armed: dict[str, int] = {}
_marker_dir: Path | None = None


def arm_from_env(environ: dict[str, str] | None = None) -> dict[str, int]:
    """Read TRIPMESH_FAILPOINTS; return what is armed (name -> hits left)."""
    env = environ if environ is not None else os.environ
    spec = env.get("TRIPMESH_FAILPOINTS", "")
    marker_dir = Path(env["TRIPMESH_FAILPOINT_DIR"]) if env.get("TRIPMESH_FAILPOINT_DIR") else None
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        action, _, count = action.partition("@")
        if name not in FAILPOINTS:
            raise ValueError(f"TRIPMESH_FAILPOINTS: unknown failpoint {name!r}")
        if action != "crash":
            raise ValueError(f"TRIPMESH_FAILPOINTS: {name}: only 'crash' is supported")
        if marker_dir is None or not (marker_dir / f"{name}.fired").exists():
            armed[name] = int(count or 1)
    global _marker_dir
    _marker_dir = marker_dir
    with _lock:
        _armed.clear()
        _armed.update(armed)
    if armed:
        log.warning("failpoints armed: %s", armed)
    return armed


def hit(name: str) -> None:
    """Pass the failpoint `name`: kill this process if it is armed and due."""
    if not _armed:
        return
    with _lock:
        left = _armed.get(name)
        if left is None:
            return
        if left > 1:
            _armed[name] = left - 1
            return
        del _armed[name]
    log.critical("failpoint %s: SIGKILL", name)
    if _marker_dir is not None:
        _marker_dir.mkdir(parents=True, exist_ok=True)
        (_marker_dir / f"{name}.fired").touch()
    os.kill(os.getpid(), signal.SIGKILL)
