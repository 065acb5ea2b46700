"""Live progress of a headless load run on the console: elapsed time, trips by outcome.

Locust prints nothing until its summary (`--only-summary`); this follows the
run's history (history.jsonl, written by the locustfile as trips complete)
from a thread and shows one line, redrawn four times a second with `rich`, on
stderr, and only when stderr is a terminal, so logs and pipes stay clean.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Self

from rich.console import Console
from rich.live import Live

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smh]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def seconds(run_time: str) -> float | None:
    """Locust's --run-time (`90s`, `5m`, `1h30m`, `120`) in seconds; None if it is not one."""
    text = run_time.strip().lower()
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


class Tally:
    """Completions read from a growing history file, a line at a time as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts: Counter[str] = Counter()
        self._offset = 0
        self._partial = b""

    def read(self) -> Counter[str]:
        """Count what was appended since the last read; a line not yet complete waits."""
        try:
            with self.path.open("rb") as source:
                source.seek(self._offset)
                data = source.read()
        except FileNotFoundError:
            return self.counts
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            try:
                op = json.loads(line)
            except ValueError:
                continue
            kind = op.get("type")
            if kind in ("ok", "fail", "info"):
                self.counts[kind] += 1
                if kind == "ok":
                    self.counts[f"ok {op.get('status', '')}"] += 1
        return self.counts


def line(elapsed: float, duration: float | None, counts: Counter[str]) -> str:
    """`  12.0/60 s | trips 1,204/s 100.3 | ok 1,204 (aborted 9, confirmed 1,195), fail 0, info 0`."""
    statuses = ", ".join(
        f"{k.removeprefix('ok ')} {n:,}" for k, n in sorted(counts.items()) if k.startswith("ok ")
    )
    done = counts["ok"] + counts["fail"] + counts["info"]
    rate = done / elapsed if elapsed > 0 else 0.0
    ok = f"ok {counts['ok']:,}" + (f" ({statuses})" if statuses else "")
    clock = f"{elapsed:5.1f}/{duration:.0f} s" if duration else f"{elapsed:5.1f} s"
    return f"{clock} | trips {done:,}, {rate:,.1f}/s | {ok}, fail {counts['fail']:,}, info {counts['info']:,}"


class Progress:
    """Shows `line` live while a run lasts: `with Progress(history, duration): ...`."""

    def __init__(self, history: Path, duration: float | None, title: str = "load") -> None:
        self.tally = Tally(history)
        self.duration = duration
        self.title = title
        self.console = Console(stderr=True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        if self.console.is_terminal:
            self._thread = threading.Thread(target=self._show, name="load-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _show(self) -> None:
        started = time.monotonic()

        def now() -> str:
            counts = self.tally.read()
            return f"{self.title} | " + line(time.monotonic() - started, self.duration, counts)

        with Live(now(), console=self.console, refresh_per_second=4, transient=True) as live:
            while not self._stop.wait(0.25):
                live.update(now())
