"""flaky-network: frequent short reset and blackhole windows on every edge.

Toxiproxy decides a toxic's `toxicity` once per connection, and a gRPC
channel is one long-lived connection, so "0.1% packet loss" cannot be a
toxicity of 0.001. It is modelled here as short, frequent fault windows
(0.2 to 1 s): each resets every connection on one edge (`reset_peer`) or
swallows everything sent on it (`timeout` 0, a blackhole).
"""

from __future__ import annotations

import random

from chaos.nemesis import Fault
from chaos.scenarios import ALL_EDGES, Scenario, windows

LOSS_MODEL = (
    "Packet loss was modelled as short, frequent fault windows (0.2-1 s), each resetting"
    " (reset_peer) or blackholing (timeout 0) every connection on one edge, because Toxiproxy"
    " decides toxicity once per connection and a gRPC channel is a single connection."
)


def schedule(rng: random.Random, duration: float) -> list[Fault]:
    faults = []
    for start, length in windows(rng, duration, every=(0.3, 1.2), length=(0.2, 1.0)):
        action = rng.choice(("reset_peer", "timeout"))
        faults.append(Fault(start, length, action, rng.choice(ALL_EDGES), {"timeout": 0}))
    return faults


SCENARIO = Scenario(
    "flaky-network",
    "frequent short reset and blackhole windows on random edges",
    schedule,
    loss_model=LOSS_MODEL,
)

if __name__ == "__main__":
    import sys

    from chaos.run import main

    raise SystemExit(main([SCENARIO.name, *sys.argv[1:]]))
