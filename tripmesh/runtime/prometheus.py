"""What every process's Prometheus registry holds besides its own metrics, and a labelled
metric's children for the per-call paths.

The process's CPU, memory and file descriptors (`process_*`), the Python
runtime (`python_info`, `python_gc_*`), the garbage collector's pauses and frozen
start-up (`tripmesh_gc_*`, `tripmesh.runtime.heap`), and no `*_created` series: a counter's
creation time is noise on every dashboard and doubles the series count.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import (
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import CollectorRegistry

from tripmesh.runtime.heap import GC_PAUSES

M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """A labelled metric's children, each looked up once.

    `metric.labels(...)` takes a lock and converts and hashes the label values on
    every call; `children(...)` is a dict look-up after the first. The label
    values are the code's own (steps, statuses, protocols), so the dict stays small.
    """

    __slots__ = ("_found", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._found: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._found.get(values)
        if child is None:
            child = self._found[values] = self._metric.labels(*values)
        return child


def new_registry() -> CollectorRegistry:
    """A registry with the process and runtime collectors; `_created` series off."""
    disable_created_metrics()
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(GC_PAUSES)
    return registry
