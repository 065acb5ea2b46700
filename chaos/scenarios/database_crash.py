"""database-crash: SIGKILL of the PostgreSQL server holding every book and the trip log.

The server (postmaster and every backend, as a power cut would) dies a third
of the way in and is restarted after a delay; it recovers from its WAL. While
it is down every call that needs a database fails with UNAVAILABLE (nothing
was written, retry), the pools reconnect once it is back, and the
coordinator's recovery finishes what was in flight. Nothing acknowledged may
be lost: a commit that returned is in the WAL (`synchronous_commit=on`).
"""

from __future__ import annotations

import random

from chaos.nemesis import Fault
from chaos.scenarios import Scenario
from tripmesh.mesh.layout import POSTGRES


def schedule(rng: random.Random, duration: float) -> list[Fault]:
    start = round(duration * rng.uniform(0.25, 0.4), 3)
    down_for = round(max(2.0, duration * 0.15), 3)
    return [Fault(start, down_for, "kill", POSTGRES)]


SCENARIO = Scenario(
    "database-crash",
    "the PostgreSQL server with every database is SIGKILLed under load and restarted",
    schedule,
    store="postgres",
)

if __name__ == "__main__":
    import sys

    from chaos.run import main

    raise SystemExit(main([SCENARIO.name, *sys.argv[1:]]))
