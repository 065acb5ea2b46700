"""The garbage collector's pauses, kept off the request path, and measured.

CPython frees most objects by reference counting; its cycle collector also
walks, now and then, every object that can hold references. A full
(generation 2) collection walks them all: in a tripmesh server, mostly what
start-up left behind (modules, gRPC and protobuf machinery, descriptors), some
60,000 objects. Measured under load on two cores (`make bench`, saga, c=16),
each server process ran 2-3 such collections a run, each holding the GIL for
12-46 ms: every call in flight in that process waited, and the slowest 1 % of
trips were those waits (the trip's own timeline in the coordinator: p99 31-34
ms with them, 26-30 ms without; as the client sees it, saga p99 at c=16 went
from 59.8 to 56.2 ms, medians of three).

`freeze_start_up`, called once a server is up, moves everything alive then
into the collector's permanent generation (`gc.freeze`): never walked again,
still freed by reference counting, so a full collection walks only what was
made since (1-2 ms measured). The thresholds stay Python's own: raising them only
trades fewer young collections for longer ones (measured: 4-7 ms each).

`GC_PAUSES` times each collection of this process (a `gc.callbacks` hook: two
clock reads); every registry made by `tripmesh.runtime.prometheus` exports
them as `tripmesh_gc_pause_seconds` by generation, with the frozen count as
`tripmesh_gc_frozen_objects`, so a pause that comes back shows on /metrics.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# Seconds: young collections take tens of microseconds, a full one of a thawed
# server tens of milliseconds.
BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


def freeze_start_up() -> int:
    """Collect start-up's garbage, then freeze what is left; returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses(Collector):
    """Each collection's duration by generation, as a Prometheus histogram.

    The hook only adds to plain counts: it runs inside the collector, on any
    thread, where taking a lock (as a prometheus_client metric does) could
    deadlock against the thread that held it when the collection began.
    Collections never overlap (CPython runs one at a time, under the GIL), so
    the counts need no lock of their own.
    """

    def __init__(self) -> None:
        self._started = 0.0
        # Per generation: a count per bucket (the last for beyond every bucket) and the sum.
        self._counts = [[0] * (len(BUCKETS) + 1) for _ in range(3)]
        self._sums = [0.0] * 3
        gc.callbacks.append(self._hook)  # last: a collection may run at any allocation

    def _hook(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        generation = info["generation"]
        # The first bucket whose bound is at least `took`; past the last, the overflow count.
        self._counts[generation][bisect.bisect_left(BUCKETS, took)] += 1
        self._sums[generation] += took

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        pauses = HistogramMetricFamily(
            "tripmesh_gc_pause_seconds",
            "Time the garbage collector held the GIL, per collection, by generation.",
            labels=["generation"],
        )
        bounds = (*map(str, BUCKETS), "+Inf")
        for generation in range(3):
            cumulative = itertools.accumulate(self._counts[generation])
            pauses.add_metric(
                [str(generation)], list(zip(bounds, cumulative)), self._sums[generation]
            )
        yield pauses
        yield GaugeMetricFamily(
            "tripmesh_gc_frozen_objects",
            "Objects moved out of the collector's reach at start-up (gc.freeze).",
            value=gc.get_freeze_count(),
        )


# One per process: the hook is the process's, whichever registries show it.
GC_PAUSES = GcPauses()
