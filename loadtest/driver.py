"""A closed-loop asyncio load driver, and what each process spent while it ran.

`closed_loop` keeps `concurrency` calls outstanding for `warmup + duration`
seconds and measures only the calls that finish inside the measured window:
completions per second, latency percentiles, failures by kind. The caller's
`call` returns None for a success or a short failure label.

`CpuMeter` reads user+system CPU time of the mesh's processes (and of this
driver) from /proc before and after, and the whole machine's, so every result
says who was busy, including anything else running on the machine ("others").
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tripmesh.runtime import rpc

TICKS = os.sysconf("SC_CLK_TCK")
# Latencies are read from this, never from loop.time(): uvloop's loop clock
# has millisecond resolution and is read once per loop iteration.
clock = time.perf_counter


@dataclass
class Result:
    """One closed-loop run: completions in the measured window and their latencies."""

    concurrency: int
    seconds: float
    ok: int
    failures: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, successes only
    cpu: dict[str, float] = field(default_factory=dict)  # percent of one core
    attempts: int = 1  # runs it took to get one without other processes' load

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """Latency at quantile `q` (0..1) in milliseconds (nearest rank); NaN without data."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))
        return ordered[index] * 1000

    def summary(self) -> dict[str, object]:
        return {
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
            "per_second": round(self.rate, 1),
            "p50_ms": round(self.percentile(0.50), 2),
            "p99_ms": round(self.percentile(0.99), 2),
            "failures": dict(self.failures),
            "cpu_percent": {k: round(v, 1) for k, v in self.cpu.items()},
            "attempts": self.attempts,
        }


async def closed_loop(
    call: Callable[[int], Awaitable[str | None]],
    concurrency: int,
    *,
    duration: float,
    warmup: float,
    cpu: CpuMeter | None = None,
) -> Result:
    """Run `call(i)` from `concurrency` workers; measure the window after `warmup`."""
    start = clock()
    window_start, window_end = start + warmup, start + warmup + duration
    result = Result(concurrency, duration, 0)
    numbers = iter(range(1 << 62))

    async def worker() -> None:
        while (begun := clock()) < window_end:
            outcome = await call(next(numbers))
            finished = clock()
            if window_start <= finished <= window_end:
                if outcome is None:
                    result.ok += 1
                    result.latencies.append(finished - begun)
                else:
                    result.failures[outcome] += 1

    async def meter() -> None:
        await asyncio.sleep(warmup)
        before = cpu.read() if cpu else None
        await asyncio.sleep(duration)
        if cpu and before is not None:
            result.cpu = cpu.percent_since(before, duration)

    await asyncio.gather(meter(), *(worker() for _ in range(concurrency)))
    return result


async def run_count(
    call: Callable[[int], Awaitable[str | None]], concurrency: int, total: int
) -> Result:
    """Run exactly `total` calls from `concurrency` workers; every call is measured."""
    numbers = iter(range(total))
    result = Result(concurrency, 0.0, 0)
    started = clock()

    async def worker() -> None:
        for i in numbers:
            begun = clock()
            outcome = await call(i)
            if outcome is None:
                result.ok += 1
                result.latencies.append(clock() - begun)
            else:
                result.failures[outcome] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = clock() - started
    return result


class CpuMeter:
    """CPU seconds (user + system, every thread) of named processes, from /proc."""

    def __init__(
        self, pids: Mapping[str, int], *, with_children: frozenset[str] = frozenset()
    ) -> None:
        """`with_children`: names whose children's CPU counts as theirs (PostgreSQL's
        backends), those alive when read."""
        self.pids = {**pids, "driver": os.getpid()}
        self.with_children = with_children

    def read(self) -> dict[str, float]:
        seconds = {}
        stats = _stats() if self.with_children else {}
        for name, pid in self.pids.items():
            own = [pid, *(c for c, (parent, _) in stats.items() if parent == pid)]
            used = [_cpu_seconds(p) for p in (own if name in self.with_children else [pid])]
            if used[0] is None:
                continue
            seconds[name] = sum(u for u in used if u is not None)
        # The whole machine: anything else that ran (another test suite) shows as "others".
        jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        seconds["_machine"] = (sum(jiffies) - jiffies[3] - jiffies[4]) / TICKS
        seconds["_wall"] = time.monotonic()
        return seconds

    def percent_since(self, before: Mapping[str, float], duration: float) -> dict[str, float]:
        after = self.read()
        wall = after["_wall"] - before["_wall"] or duration
        used = {
            name: 100 * (after[name] - before[name]) / wall
            for name in after
            if not name.startswith("_") and name in before
        }
        machine = 100 * (after["_machine"] - before["_machine"]) / wall
        used["others"] = max(0.0, machine - sum(used.values()))
        return used


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of `pid` (every thread), None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return None
    # After the command: state is field 3, utime field 14 and stime field 15.
    return (int(fields[11]) + int(fields[12])) / TICKS


def _stats() -> dict[int, tuple[int, str]]:
    """Every process's (parent pid, state), from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        found[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return found


def channels(address: str, count: int) -> list[grpc.aio.Channel]:
    """`count` channels to `address` (or to several coordinators, comma-separated: each
    channel round robin over them), each with its own connections (a local subchannel
    pool)."""
    options = [("grpc.use_local_subchannel_pool", 1), *rpc.channel_options(address)]
    return [grpc.aio.insecure_channel(rpc.target(address), options=options) for _ in range(count)]


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")
