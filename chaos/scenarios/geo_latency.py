"""geo-latency: the story's regions, as latency with jitter on every coordinator edge.

Flight in New York answers in 200 ms, hotel in Amsterdam in 180 ms, car in
Singapore in 300 ms. Half of each is added in each direction, so a round
trip costs what the story says, with 10% jitter.
"""

from __future__ import annotations

import random

from chaos.nemesis import Fault
from chaos.scenarios import Scenario

ROUND_TRIP_MS = {"flight": 200, "hotel": 180, "car": 300}


def schedule(rng: random.Random, duration: float) -> list[Fault]:
    faults = []
    for kind, ms in ROUND_TRIP_MS.items():
        attributes = {"latency": ms // 2, "jitter": ms // 20}
        faults.append(Fault(0.0, duration, "latency", f"coordinator-to-{kind}", attributes))
        faults.append(Fault(0.0, duration, "latency", f"{kind}-to-coordinator", attributes))
    return faults


SCENARIO = Scenario(
    "geo-latency",
    "the story's per-region latencies (flight 200 ms, hotel 180 ms, car 300 ms round trip)",
    schedule,
    notes=(
        "Latency is added half in each direction, with jitter of 5% of the round trip each way.",
    ),
)

if __name__ == "__main__":
    import sys

    from chaos.run import main

    raise SystemExit(main([SCENARIO.name, *sys.argv[1:]]))
