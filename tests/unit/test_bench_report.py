"""The bench's targets on a run that measured only some protocols and concurrencies."""

from __future__ import annotations

from typing import Any

from loadtest import report


def _point(c: int, rate: float, p99: float = 50.0) -> dict[str, Any]:
    return {"concurrency": c, "per_second": rate, "p50_ms": p99 / 2, "p99_ms": p99}


def test_targets_name_only_what_was_measured() -> None:
    points = {"echo": [_point(64, 2800)], "choreography": [_point(64, 200)]}
    results = {"points": points, "efficiency": report.efficiency(points, {"saga": 4})}
    names = [t["target"] for t in report.targets(results)]
    # No saga or 2PC floor, no efficiency (its trips are events, not RPCs), no c=256 share.
    assert names == []
    points["saga"] = [_point(16, 250, p99=90.0), _point(64, 350), _point(256, 300)]
    results = {"points": points, "efficiency": report.efficiency(points, {"saga": 4})}
    found = {t["target"]: t["met"] for t in report.targets(results)}
    assert found == {
        "saga efficiency >= 0.5 (c=64)": True,
        "saga >= 400 trips/s (c=64)": False,
        "saga p99 < 40 ms (c=16)": False,
        "saga c=256 >= 80% of peak": True,
    }
