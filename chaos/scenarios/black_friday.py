"""black-friday: peak load with every fault above mixed at random (seeded), then heal and audit."""

from __future__ import annotations

import random
from pathlib import Path

from chaos.nemesis import Fault
from chaos.scenarios import (
    ALL_EDGES,
    COORDINATOR_EDGES,
    Scenario,
    failpoints,
    windows,
)
from chaos.scenarios.flaky_network import LOSS_MODEL
from chaos.scenarios.geo_latency import ROUND_TRIP_MS
from tripmesh import PARTICIPANTS


def schedule(rng: random.Random, duration: float) -> list[Fault]:
    faults = [
        Fault(
            0.0,
            duration * 0.8,
            "latency",
            f"coordinator-to-{kind}",
            {"latency": ms // 4, "jitter": ms // 20},
        )
        for kind, ms in ROUND_TRIP_MS.items()
    ]
    for start, length in windows(rng, duration, every=(0.5, 2.5), length=(0.2, 2.5)):
        roll = rng.random()
        if roll < 0.35:
            faults.append(
                Fault(
                    start,
                    min(length, 1.0),
                    rng.choice(("reset_peer", "timeout")),
                    rng.choice(ALL_EDGES),
                    {"timeout": 0},
                )
            )
        elif roll < 0.55:
            faults.append(Fault(start, length, "disable", rng.choice(COORDINATOR_EDGES)))
        elif roll < 0.75:
            faults.append(Fault(start, length, "kill", rng.choice(PARTICIPANTS)))
        elif roll < 0.85:
            faults.append(Fault(start, min(length, 1.5), "pause", rng.choice(PARTICIPANTS)))
        elif roll < 0.95:
            faults.append(
                Fault(start, length, "bandwidth", rng.choice(COORDINATOR_EDGES), {"rate": 16})
            )
        else:
            faults.append(Fault(start, length, "slow_close", rng.choice(ALL_EDGES), {"delay": 500}))
    crash_at = round(duration * rng.uniform(0.3, 0.6), 3)
    faults.append(Fault(crash_at, round(max(2.0, duration * 0.05), 3), "kill", "coordinator"))
    return sorted(faults, key=lambda f: f.start)


def environment(protocol: str, marker_dir: Path) -> dict[str, dict[str, str]]:
    return failpoints.environment(protocol, marker_dir)


SCENARIO = Scenario(
    "black-friday",
    "peak load with latency, resets, blackholes, partitions, kills, pauses and failpoints mixed",
    schedule,
    environment=environment,
    restart_after=1.0,
    loss_model=LOSS_MODEL,
)

if __name__ == "__main__":
    import sys

    from chaos.run import main

    raise SystemExit(main([SCENARIO.name, *sys.argv[1:]]))
