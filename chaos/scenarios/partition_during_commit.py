"""partition-during-commit: the hotel is cut off while trips are in flight (the story's scenario 2).

Under steady traffic every cut lands in the middle of some trips' 2PC phase 2
and of some sagas' steps. Cuts alternate between disabling the proxy (the
connections drop) and a blackhole (`timeout` 0: connections stay open, nothing
gets through). The hotel's own edge to the coordinator is cut with it, so a
prepared hotel cannot ask for the decision either until the partition heals.
"""

from __future__ import annotations

import random

from chaos.nemesis import Fault
from chaos.scenarios import Scenario, windows


def schedule(rng: random.Random, duration: float) -> list[Fault]:
    faults = []
    for i, (start, length) in enumerate(
        windows(rng, duration, every=(2.0, 4.0), length=(1.5, 3.0))
    ):
        action, attributes = ("disable", {}) if i % 2 == 0 else ("timeout", {"timeout": 0})
        faults.append(Fault(start, length, action, "coordinator-to-hotel", attributes))
        faults.append(Fault(start, length, action, "hotel-to-coordinator", attributes))
    return faults


SCENARIO = Scenario(
    "partition-during-commit",
    "the coordinator-hotel edges are cut (disabled or blackholed) under traffic, then healed",
    schedule,
)

if __name__ == "__main__":
    import sys

    from chaos.run import main

    raise SystemExit(main([SCENARIO.name, *sys.argv[1:]]))
