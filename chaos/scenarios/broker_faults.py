"""broker-faults: the choreographed saga's broker killed, a service cut off it, a consumer slowed.

The broker (NATS JetStream, file storage) is SIGKILLed a fifth of the way in
and restarted after a delay; later the hotel's link to it is cut (disabled)
and then the car's is slowed (latency both ways). Events a service committed
meanwhile wait in its outbox; events the broker held wait for their consumer;
an event delivered and not acknowledged comes again. The orchestrated
protocols do not use the broker: their runs show that it costs them nothing.
"""

from __future__ import annotations

import random

from chaos.nemesis import Fault
from chaos.scenarios import Scenario


def schedule(rng: random.Random, duration: float) -> list[Fault]:
    kill_at = round(duration * rng.uniform(0.15, 0.25), 3)
    down_for = round(max(2.0, duration * 0.1), 3)
    cut_at = round(duration * rng.uniform(0.4, 0.5), 3)
    slow_at = round(duration * rng.uniform(0.6, 0.7), 3)
    window = round(max(1.5, duration * 0.1), 3)
    return [
        Fault(kill_at, down_for, "kill", "broker"),
        Fault(cut_at, window, "disable", "hotel-to-broker"),
        Fault(slow_at, window, "latency", "car-to-broker", {"latency": 300, "jitter": 50}),
    ]


SCENARIO = Scenario(
    "broker-faults",
    "the broker is SIGKILLed and restarted, the hotel cut off it, the car's link to it slowed",
    schedule,
)

if __name__ == "__main__":
    import sys

    from chaos.run import main

    raise SystemExit(main([SCENARIO.name, *sys.argv[1:]]))
