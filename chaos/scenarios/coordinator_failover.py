"""coordinator-failover: SIGKILL of one of two coordinators sharing a trip log on PostgreSQL.

The same kill as coordinator-crash, at the same moment for the same seed, but a
second coordinator keeps serving, and the dead one stays down for at least
three leases (longer than coordinator-crash's outage in short runs): long
enough that the survivor, not the restarted replica, must finish its trips. Clients hold one
channel over both (round robin over the healthy ones), so new bookings go on
at once; the dead replica's trips in flight wait for their leases to lapse
(`--lease 2` here; renewed every third of it) and the survivor's sweep
(`--sweep-every 1`) takes them over and finishes them, fenced so that the
dead one could never write them again. The report sets the seconds with no
completion, the unit-seconds 2PC kept held and the time the survivor took to
take the trips over beside coordinator-crash's.
"""

from __future__ import annotations

import random

from chaos.nemesis import Fault
from chaos.scenarios import Scenario, coordinator_crash

REPLICA = "coordinator-2"
LEASE = 2.0  # seconds: the replicas' --lease here


def schedule(rng: random.Random, duration: float) -> list[Fault]:
    (crash,) = coordinator_crash.schedule(rng, duration)
    return [Fault(crash.start, max(crash.duration, 3 * LEASE), "kill", REPLICA)]


SCENARIO = Scenario(
    "coordinator-failover",
    "one of two coordinators over PostgreSQL is SIGKILLed under load; the other takes over",
    schedule,
    store="postgres",
    coordinators=2,
    coordinator_args=("--lease", f"{LEASE:g}", "--sweep-every", "1"),
)

if __name__ == "__main__":
    import sys

    from chaos.run import main

    raise SystemExit(main([SCENARIO.name, *sys.argv[1:]]))
