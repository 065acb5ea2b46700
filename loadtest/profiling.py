"""py-spy on a running process: a flame graph to look at, and a summary with numbers.

`record` attaches py-spy (non-blocking: the process is never paused) twice
over the same seconds, once for an SVG flame graph and once for raw collapsed
stacks, which `summarize` turns into: per thread, the share of the time it was
on a CPU or holding the GIL (py-spy drops idle samples), and the functions with
the most samples, inclusive (with what they call) and self (on top of the
stack), as a percent of the time recorded.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

RATE = 100  # samples a second
_LINE = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    """The py-spy binary beside this Python, or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path) -> list[subprocess.Popen[bytes]]:
    """Start recording `pid` for `seconds` into OUT.svg and OUT.txt; wait on what is returned."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    common = [binary, "record", "--pid", str(pid), "--duration", str(round(seconds))]
    common += ["--rate", str(RATE), "--nonblocking", "--threads"]
    return [
        subprocess.Popen(
            [*common, "--format", fmt, "-o", str(out.with_suffix(suffix))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fmt, suffix in (("flamegraph", ".svg"), ("raw", ".txt"))
    ]


def _function(frame: str) -> str:
    """`_commit_batch (tripmesh/runtime/database.py:120)` -> `_commit_batch (database.py)`."""
    name, _, where = frame.partition(" (")
    where = _LINE.sub(")", "(" + where)
    return f"{name} ({Path(where.strip('()')).name})" if where else name


def summarize(raw: Path, seconds: float, top: int = 12) -> dict[str, Any]:
    """Per thread: busy percent, and the top functions by inclusive and self samples."""
    possible = seconds * RATE
    threads: dict[str, dict[str, Counter[str]]] = defaultdict(
        lambda: {"inclusive": Counter(), "self": Counter(), "samples": Counter()}
    )
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread") else "?"
        calls = [_function(f) for f in frames[1:]]
        entry = threads[thread]
        entry["samples"]["all"] += count
        for function in set(calls):
            entry["inclusive"][function] += count
        if calls:
            entry["self"][calls[-1]] += count

    def percent(n: int) -> float:
        return round(100 * n / possible, 1)

    return {
        name: {
            "busy_percent": percent(entry["samples"]["all"]),
            "inclusive_percent": {f: percent(n) for f, n in entry["inclusive"].most_common(top)},
            "self_percent": {f: percent(n) for f, n in entry["self"].most_common(top)},
        }
        for name, entry in sorted(threads.items(), key=lambda kv: -kv[1]["samples"]["all"])
    }
