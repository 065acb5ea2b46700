"""The nemesis: faults as operations on their own schedule, each with a start, a stop and a heal.

A `Fault` is plain data. Network faults are Toxiproxy toxics on one edge (a
proxy named after it) or the edge disabled; process faults are real signals:
SIGKILL (restarted by supervisord after the fault's duration) and
SIGSTOP/SIGCONT (a long pause, like a GC stall). Every blocking call (the
Toxiproxy HTTP API, supervisord's XML-RPC) runs in a thread, off the event loop
that also drives the workload.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from tripmesh.mesh.layout import POSTGRES
from tripmesh.mesh.mesh import Mesh
from tripmesh.runtime.postgres import kill_server

log = logging.getLogger(__name__)

# Toxiproxy toxic types, and the attributes a schedule gives them.
TOXICS = ("latency", "bandwidth", "slow_close", "timeout", "reset_peer", "limit_data")
PROCESS_FAULTS = ("kill", "pause")
NETWORK_FAULTS = (*TOXICS, "disable")


@dataclass(frozen=True)
class Fault:
    """Do `action` to `target` from `start` for `duration` seconds (times from the run's start)."""

    start: float
    duration: float
    action: str  # one of TOXICS, "disable", "kill", "pause"
    target: str  # a proxy (edge) name, or a process name for kill / pause
    attributes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.action not in (*NETWORK_FAULTS, *PROCESS_FAULTS):
            raise ValueError(f"unknown fault action {self.action!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Window:
    """A fault as it was actually applied: times from the run's start."""

    start: float
    end: float
    action: str
    target: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Nemesis:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.toxiproxy = mesh.toxiproxy
        self._disabled: Counter[str] = Counter()  # overlapping disables of one edge
        self._down: set[str] = set()  # processes killed by us, not yet restarted

    async def run(self, schedule: list[Fault], origin: float) -> list[Window]:
        """Apply every fault at its time and heal it after its duration."""
        return list(
            await asyncio.gather(*(self._one(i, f, origin) for i, f in enumerate(schedule)))
        )

    async def _one(self, index: int, fault: Fault, origin: float) -> Window:
        await asyncio.sleep(max(0.0, origin + fault.start - time.monotonic()))
        started = time.monotonic() - origin
        await asyncio.to_thread(self.apply, index, fault)
        await asyncio.sleep(fault.duration)
        await asyncio.to_thread(self.heal, index, fault)
        return Window(started, time.monotonic() - origin, fault.action, fault.target)

    def apply(self, index: int, fault: Fault) -> None:
        log.info("nemesis: %s %s %s", fault.action, fault.target, fault.attributes or "")
        if fault.action in TOXICS:
            for stream in ("downstream", "upstream"):
                self.toxiproxy.add_toxic(
                    fault.target,
                    fault.action,
                    name=f"{fault.action}-{index}-{stream}",
                    stream=stream,
                    attributes=fault.attributes,
                )
        elif fault.action == "disable":
            self._disabled[fault.target] += 1
            self.toxiproxy.disable(fault.target)
        elif fault.action == "kill":
            if self._signal(fault.target, signal.SIGKILL):
                self._down.add(fault.target)
        elif fault.action == "pause":
            self._signal(fault.target, signal.SIGSTOP)

    def heal(self, index: int, fault: Fault) -> None:
        if fault.action in TOXICS:
            for stream in ("downstream", "upstream"):
                self.toxiproxy.remove_toxic(fault.target, f"{fault.action}-{index}-{stream}")
        elif fault.action == "disable":
            self._disabled[fault.target] -= 1
            if self._disabled[fault.target] == 0:
                self.toxiproxy.enable(fault.target)
        elif fault.action == "kill":
            if fault.target in self._down:
                self._down.discard(fault.target)
                self.mesh.supervisor.start(fault.target)
        elif fault.action == "pause":
            self._signal(fault.target, signal.SIGCONT)

    def _signal(self, name: str, signum: int) -> bool:
        pid = self.mesh.supervisor.processes()[name].pid
        if not pid:
            return False  # already down
        if name == POSTGRES and signum == signal.SIGKILL:
            # The postmaster and every backend (each a process group of its own), as a
            # power cut would: no backend left holding the old shared memory.
            kill_server(pid)
            return True
        os.kill(pid, signum)
        return True

    async def keep_alive(self, *, restart_after: float, every: float = 0.25) -> None:
        """Restart any process that died on its own (a failpoint), after `restart_after` s."""
        while True:
            await asyncio.sleep(every)
            processes = await asyncio.to_thread(self.mesh.supervisor.processes)
            for name, info in processes.items():
                if info.state != "RUNNING" and info.state != "STARTING" and name not in self._down:
                    log.info(
                        "nemesis: %s is %s; restarting in %.1fs", name, info.state, restart_after
                    )
                    await asyncio.sleep(restart_after)
                    await asyncio.to_thread(self.mesh.supervisor.start, name)

    def heal_all(self) -> None:
        """Everything back: every proxy enabled without toxics, every process running."""
        self.toxiproxy.reset()
        self._disabled.clear()
        for info in self.mesh.supervisor.processes().values():
            if info.pid:
                os.kill(info.pid, signal.SIGCONT)
        self._down.clear()
        self.mesh.up()  # starts whatever is stopped and waits until all of it is SERVING
