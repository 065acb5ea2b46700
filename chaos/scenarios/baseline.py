"""baseline: no faults at all; what each protocol does on a quiet day."""

from __future__ import annotations

import random

from chaos.nemesis import Fault
from chaos.scenarios import Scenario


def schedule(rng: random.Random, duration: float) -> list[Fault]:
    return []


SCENARIO = Scenario("baseline", "no faults", schedule)

if __name__ == "__main__":
    import sys

    from chaos.run import main

    raise SystemExit(main([SCENARIO.name, *sys.argv[1:]]))
