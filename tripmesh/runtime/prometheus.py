"""What every process's Prometheus registry holds besides its own metrics.

The process's CPU, memory and file descriptors (`process_*`), the Python
runtime (`python_info`, `python_gc_*`), and no `*_created` series: a counter's
creation time is noise on every dashboard and doubles the series count.
"""

from __future__ import annotations

from prometheus_client import (
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.registry import CollectorRegistry


def new_registry() -> CollectorRegistry:
    """A registry with the process and runtime collectors; `_created` series off."""
    disable_created_metrics()
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
