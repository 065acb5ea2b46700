"""coordinator-crash: SIGKILL of the coordinator with many trips in flight (the story's scenario 1).

The coordinator dies a third of the way in and is restarted after a delay.
In 2PC, every trip prepared but not decided keeps its seats, rooms and cars
held until the restarted coordinator recovers it: the report's
blocked-inventory-seconds and time to settle measure that cost.
"""

from __future__ import annotations

import random

from chaos.nemesis import Fault
from chaos.scenarios import Scenario


def schedule(rng: random.Random, duration: float) -> list[Fault]:
    start = round(duration * rng.uniform(0.25, 0.4), 3)
    down_for = round(max(2.0, duration * 0.15), 3)
    return [Fault(start, down_for, "kill", "coordinator")]


SCENARIO = Scenario(
    "coordinator-crash",
    "the coordinator is SIGKILLed under load and restarted after a delay",
    schedule,
)

if __name__ == "__main__":
    import sys

    from chaos.run import main

    raise SystemExit(main([SCENARIO.name, *sys.argv[1:]]))
