"""The garbage collector's pauses (tripmesh.runtime.heap): measured and exported, and
start-up's heap frozen out of a full collection's walk."""

from __future__ import annotations

import gc

import pytest

from tripmesh.runtime import heap
from tripmesh.runtime.prometheus import new_registry


def _pauses(registry, generation: str) -> dict[str, float]:
    """The pause histogram's samples for `generation`: bucket bounds, count and sum."""
    found: dict[str, float] = {}
    for family in registry.collect():
        if family.name != "tripmesh_gc_pause_seconds":
            continue
        for sample in family.samples:
            if sample.labels["generation"] != generation:
                continue
            key = sample.labels.get("le", sample.name.rsplit("_", 1)[-1])
            found[key] = sample.value
    return found


def test_each_collection_is_timed_by_generation() -> None:
    registry = new_registry()
    before = _pauses(registry, "2")
    young_before = _pauses(registry, "0")["count"]
    for _ in range(3):
        gc.collect()
    after = _pauses(registry, "2")
    assert after["count"] == before["count"] + 3
    assert after["sum"] > before["sum"]
    # A histogram: cumulative buckets ending in +Inf, which is the count.
    bounds = [after[str(b)] for b in heap.BUCKETS] + [after["+Inf"]]
    assert bounds == sorted(bounds)
    assert after["+Inf"] == after["count"]
    # Only full collections were asked for.
    assert _pauses(registry, "0")["count"] - young_before < 3


@pytest.fixture
def thawed():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_frozen_start_up_is_out_of_a_full_collections_walk(thawed) -> None:
    live = [[i] for i in range(50_000)]  # start-up's objects, standing in
    tracked = len(gc.get_objects(2)) + len(gc.get_objects(1)) + len(gc.get_objects(0))
    frozen = heap.freeze_start_up()
    assert frozen >= 50_000
    assert gc.get_freeze_count() == frozen
    # What a full collection walks now: not the frozen lists.
    walked = len(gc.get_objects(2)) + len(gc.get_objects(1)) + len(gc.get_objects(0))
    assert walked < tracked - 50_000
    exported = {
        family.name: family.samples[0].value
        for family in new_registry().collect()
        if family.name == "tripmesh_gc_frozen_objects"
    }
    assert exported == {"tripmesh_gc_frozen_objects": frozen}
    del live
