"""participant-crash-loop: the services crash (SIGKILL) and restart, again and again, under load."""

from __future__ import annotations

import random

from chaos.nemesis import Fault
from chaos.scenarios import Scenario, windows
from tripmesh import PARTICIPANTS


def schedule(rng: random.Random, duration: float) -> list[Fault]:
    return [
        Fault(start, length, "kill", rng.choice(PARTICIPANTS))
        for start, length in windows(rng, duration, every=(1.5, 3.0), length=(0.5, 2.0))
    ]


SCENARIO = Scenario(
    "participant-crash-loop",
    "flight, hotel and car services are SIGKILLed at random and restarted",
    schedule,
)

if __name__ == "__main__":
    import sys

    from chaos.run import main

    raise SystemExit(main([SCENARIO.name, *sys.argv[1:]]))
