"""A distributed load run's trips: the workers' tallies merged are the tally of them all."""

from __future__ import annotations

import random
from pathlib import Path

from loadtest.tally import TripTally, merge_tallies


def test_the_workers_tallies_merged_equal_one_tally_of_every_trip(tmp_path: Path) -> None:
    rng = random.Random(5)
    trips = [
        (rng.choice(["saga hot confirmed", "2pc doomed aborted", "saga spread not booked"]),
         rng.expovariate(1 / 80), rng.random() < 0.1)
        for _ in range(500)
    ]  # fmt: skip
    whole, workers = TripTally(None), [TripTally(None) for _ in range(3)]
    for i, trip in enumerate(trips):
        whole.add(*trip)
        workers[i % 3].add(*trip)
    paths = []
    for i, worker in enumerate(workers):
        worker.save(tmp_path / f"tally-{i}.json")
        paths.append(tmp_path / f"tally-{i}.json")
    merged = merge_tallies(paths).summary()
    assert merged == whole.summary()
    assert merged["trips"] == 500 and 0 < merged["failed"] < 500
    # One worker alone is not the whole.
    assert merge_tallies(paths[:1]).summary() != whole.summary()
