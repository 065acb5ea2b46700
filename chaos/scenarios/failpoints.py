"""failpoints: every named crash point, once each, in the protocol under test.

Each process is started with its failpoints armed to fire on the N-th time
they are passed (staggered, so the crashes are spread over the run); a
failpoint that has fired leaves a marker and is not armed again after the
restart, so each fires once. The nemesis restarts a crashed process after a
second.
"""

from __future__ import annotations

import random
from pathlib import Path

from chaos.nemesis import Fault
from chaos.scenarios import Scenario
from tripmesh.runtime.names import SAGA_WITH_LOCK

# Hit counts are per process lifetime (a restart starts again from 0), staggered
# so that the crashes spread over the run and each is reached within seconds.
COORDINATOR = {
    "2pc": ("2pc.before_decision@4", "2pc.after_decision@6", "2pc.between_phase2@8"),
    "3pc": (
        "3pc.before_decision@4",
        "3pc.after_precommit_decision@6",
        "3pc.between_docommits@8",
    ),
    "saga": ("saga.after_step_rpc@6", "saga.mid_compensation@2"),
    # The choreographed saga's coordinator only publishes (TRIP_REQUESTED) and follows.
    "choreography": ("outbox.before_publish@4", "outbox.after_publish@9"),
}
# The participants' failpoints are on the paths that hold first (2PC's and 3PC's):
# a crash just after a yes vote is durable, and one just before the commit.
PARTICIPANTS = {"flight": "participant.after_vote_yes@5", "hotel": "participant.before_commit@7"}
# In the choreographed saga a service dies between its step's commit and the acknowledgement
# of the event it reacted to, or on either side of publishing its own event.
CHOREOGRAPHY_PARTICIPANTS = {
    "flight": "choreography.before_ack@5",
    "hotel": "outbox.after_publish@7",
    "car": "outbox.before_publish@3",
}


def schedule(rng: random.Random, duration: float) -> list[Fault]:
    return []


def environment(protocol: str, marker_dir: Path) -> dict[str, dict[str, str]]:
    protocols = {"mixed": ("2pc", "saga"), SAGA_WITH_LOCK: ("saga",)}.get(protocol, (protocol,))
    coordinator = [f"{fp.replace('@', '=crash@', 1)}" for p in protocols for fp in COORDINATOR[p]]
    env = {"coordinator": {"TRIPMESH_FAILPOINTS": ",".join(coordinator)}}
    if {"2pc", "3pc"} & set(protocols):
        for kind, fp in PARTICIPANTS.items():
            env[kind] = {"TRIPMESH_FAILPOINTS": fp.replace("@", "=crash@", 1)}
    if "choreography" in protocols:
        for kind, fp in CHOREOGRAPHY_PARTICIPANTS.items():
            env[kind] = {"TRIPMESH_FAILPOINTS": fp.replace("@", "=crash@", 1)}
    for process_env in env.values():
        process_env["TRIPMESH_FAILPOINT_DIR"] = str(marker_dir)
    return env


SCENARIO = Scenario(
    "failpoints",
    "each named failpoint of the protocol fires once (SIGKILL at an exact step), then restart",
    schedule,
    environment=environment,
    restart_after=0.5,
)

if __name__ == "__main__":
    import sys

    from chaos.run import main

    raise SystemExit(main([SCENARIO.name, *sys.argv[1:]]))
