"""The trips of a load run, tallied: by `PROTOCOL KIND OUTCOME`, with latency histograms.

Apart from the locustfile (which patches the world for gevent when imported)
so that `loadtest.run` can merge and judge a distributed run's tallies.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

from tripmesh.runtime.names import TRIP_STATUS_NAMES as STATUS
from tripmesh.v1 import coordinator_pb2 as pb


class TripTally:
    """Trips by `PROTOCOL KIND OUTCOME`: a count, failures, and a latency histogram.

    Memory is bounded by the number of names (a few dozen), not by the trips:
    latencies go into fixed buckets (1 ms wide to 100 ms, then 10 ms to 60 s).
    """

    def __init__(self, out: Path | None) -> None:
        """`out`: the folder its history.jsonl goes to (None: no history kept)."""
        self.rows: dict[str, list[int]] = {}
        self.failed: collections.Counter[str] = collections.Counter()
        self.started = time.time()
        self.out = out
        self.history = (self.out / "history.jsonl").open("a", buffering=1) if self.out else None

    @staticmethod
    def bucket(ms: float) -> int:
        return int(ms) if ms < 100 else min(100 + int((ms - 100) // 10), 6_100)

    @staticmethod
    def bucket_ms(index: int) -> float:
        return float(index + 1) if index < 100 else 100.0 + 10 * (index - 99)

    def add(self, name: str, ms: float, failed: bool) -> None:
        row = self.rows.setdefault(name, [0] * 6_101)
        row[self.bucket(ms)] += 1
        if failed:
            self.failed[name] += 1

    def record(self, user: int, planned: Any, trip: pb.Trip) -> None:
        """A trip the coordinator answered, as the chaos checker reads a history."""
        if self.history is None:
            return
        op = {
            "process": user,
            "type": "ok",
            "f": "book",
            "key": planned.request.idempotency_key,
            "protocol": planned.protocol,
            "time": round(time.time() - self.started, 3),
            "trip_id": trip.trip_id,
            "status": STATUS.get(trip.status, "?"),
        }
        self.history.write(json.dumps(op, sort_keys=True) + "\n")

    def save(self, path: Path) -> None:
        """The counts (not the history) as JSON, for `merge_tallies`."""
        rows = {
            name: {str(i): n for i, n in enumerate(row) if n} for name, row in self.rows.items()
        }
        path.write_text(json.dumps({"rows": rows, "failed": dict(self.failed)}) + "\n")

    def percentile(self, row: list[int], share: float) -> float:
        wanted, seen = share * sum(row), 0
        for index, count in enumerate(row):
            seen += count
            if seen >= wanted and count:
                return self.bucket_ms(index)
        return 0.0

    def summary(self) -> dict[str, Any]:
        rows = {
            name: {
                "trips": sum(row),
                "failed": self.failed[name],
                "p50_ms": self.percentile(row, 0.5),
                "p99_ms": self.percentile(row, 0.99),
            }
            for name, row in sorted(self.rows.items())
        }
        trips = sum(r["trips"] for r in rows.values())
        failed = sum(r["failed"] for r in rows.values())
        return {
            "trips": trips,
            "failed": failed,
            "failure_ratio": round(failed / trips, 4) if trips else 0.0,
            "rows": rows,
        }


def merge_tallies(paths: list[Path]) -> TripTally:
    """One tally of the workers' (their OUT/tally-<pid>.json files, `TripTally.save`)."""
    merged = TripTally(out=None)
    for path in paths:
        data = json.loads(path.read_text())
        for name, counts in data["rows"].items():
            row = merged.rows.setdefault(name, [0] * 6_101)
            for index, count in counts.items():
                row[int(index)] += count
        merged.failed.update(data["failed"])
    return merged


def judge(summary: dict[str, Any], limit: float) -> dict[str, Any]:
    """`summary` (TripTally.summary) printed as a table, and passed or failed by `limit`."""
    summary["max_failure_ratio"] = limit
    summary["passed"] = summary["failure_ratio"] <= limit
    print(
        f"\n{'trips (first attempt to settled outcome)':52} {'trips':>7} {'failed':>7}"
        f" {'p50 ms':>7} {'p99 ms':>7}"
    )
    for name, row in summary["rows"].items():
        print(
            f"{name:52} {row['trips']:7} {row['failed']:7} {row['p50_ms']:7.0f}"
            f" {row['p99_ms']:7.0f}"
        )
    print(
        f"{'all trips':52} {summary['trips']:7} {summary['failed']:7}   failure ratio"
        f" {summary['failure_ratio']:.4f} (at most {limit}): "
        + ("passed" if summary["passed"] else "FAILED")
    )
    return summary
