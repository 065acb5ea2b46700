"""The live line of a headless load run: Locust's run times read, and the history followed
as the locustfile writes it, a complete line at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.progress import Tally, line, seconds


@pytest.mark.parametrize(
    ("run_time", "expected"),
    [("90s", 90.0), ("5m", 300.0), ("1h30m", 5400.0), ("120", 120.0), ("2.5m", 150.0),
     ("", None), ("soon", None), ("5 minutes", None)],
)  # fmt: skip
def test_locust_run_times_in_seconds(run_time: str, expected: float | None) -> None:
    assert seconds(run_time) == expected


def _op(kind: str, status: str = "") -> bytes:
    return (json.dumps({"type": kind, "status": status, "key": "k", "time": 1.0}) + "\n").encode()


def test_the_tally_follows_a_growing_history_and_waits_for_whole_lines(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    tally = Tally(history)
    assert sum(tally.read().values()) == 0  # not written yet
    with history.open("ab") as out:
        out.write(_op("invoke") + _op("ok", "confirmed") + _op("ok", "aborted"))
        half = _op("info")
        out.write(half[:10])  # a line being written
        out.flush()
        assert tally.read()["ok"] == 2 and tally.read()["info"] == 0
        out.write(half[10:] + _op("fail"))
    counts = tally.read()
    assert (counts["ok"], counts["info"], counts["fail"], counts["invoke"]) == (2, 1, 1, 0)
    assert (counts["ok confirmed"], counts["ok aborted"]) == (1, 1)
    text = line(2.0, 60.0, counts)
    assert text.startswith("  2.0/60 s | trips 4, 2.0/s | ok 2 (aborted 1, confirmed 1)")
    assert text.endswith("fail 1, info 1")
