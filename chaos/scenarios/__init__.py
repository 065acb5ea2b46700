"""The chaos scenarios: one module each, all registered here.

A scenario is data: a name, a seeded fault schedule (`schedule(rng, duration)`,
pure, so the same seed gives the same faults), optionally the failpoints to arm
in each process, and a sentence on how it models packet loss. Run one with
`make chaos SCENARIO=<name> PROTOCOL=2pc|saga`, or as a plain script:
`python chaos/scenarios/coordinator_crash.py --protocol 2pc`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chaos.nemesis import Fault
from tripmesh import PARTICIPANTS

Schedule = Callable[[random.Random, float], list[Fault]]
Environment = Callable[[str, Path], dict[str, dict[str, str]]]

COORDINATOR_EDGES = tuple(f"coordinator-to-{k}" for k in PARTICIPANTS)
DECISION_EDGES = tuple(f"{k}-to-coordinator" for k in PARTICIPANTS)
CLIENT_EDGE = "client-to-coordinator"
ALL_EDGES = (CLIENT_EDGE, *COORDINATOR_EDGES, *DECISION_EDGES)
NO_LOSS = "No packet loss was modelled in this scenario."


def _no_environment(protocol: str, marker_dir: Path) -> dict[str, dict[str, str]]:
    return {}


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    schedule: Schedule
    environment: Environment = _no_environment
    #: Restart a process that died on its own (failpoints) after this many seconds.
    restart_after: float | None = None
    loss_model: str = NO_LOSS
    notes: tuple[str, ...] = field(default=())
    #: The mesh it runs on: where the books and trip log are, how many coordinators, and
    #: flags added to each coordinator's.
    store: str = "sqlite"
    coordinators: int = 1
    coordinator_args: tuple[str, ...] = ()


def registry() -> dict[str, Scenario]:
    """Every scenario by name, in the order the issue lists them."""
    from chaos.scenarios import (
        baseline,
        black_friday,
        broker_faults,
        coordinator_crash,
        coordinator_failover,
        database_crash,
        failpoints,
        flaky_network,
        geo_latency,
        participant_crash_loop,
        partition_during_commit,
    )

    modules = (
        baseline,
        geo_latency,
        partition_during_commit,
        coordinator_crash,
        participant_crash_loop,
        flaky_network,
        failpoints,
        black_friday,
        broker_faults,
        coordinator_failover,
        database_crash,
    )
    return {m.SCENARIO.name: m.SCENARIO for m in modules}


def windows(
    rng: random.Random, duration: float, *, every: tuple[float, float], length: tuple[float, float]
) -> list[tuple[float, float]]:
    """Seeded (start, length) fault windows over the first 80% of the run (the rest settles)."""
    found, t = [], rng.uniform(*every) / 2
    while t < duration * 0.8:
        span = rng.uniform(*length)
        found.append((round(t, 3), round(span, 3)))
        t += span + rng.uniform(*every)
    return found
