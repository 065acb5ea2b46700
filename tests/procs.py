"""Real processes for integration tests: services and a coordinator on free loopback ports.

No mocks: each server is a subprocess running the same entry point as
production, with its own SQLite files in a temporary folder, stopped with real
signals. Waiting is on the gRPC health protocol, never on sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.books import Books, trip_request
from tripmesh import PARTICIPANTS
from tripmesh.mesh.layout import free_port
from tripmesh.runtime import auth
from tripmesh.v1 import coordinator_pb2 as cpb

ROOT = Path(__file__).resolve().parents[1]


def wait_serving(
    address: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until `address` answers SERVING on the standard health protocol."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process for {address} exited with {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"{address} not SERVING after {timeout}s")


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    address: str
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self, extra_env: dict[str, str] | None = None, wait: bool = True) -> Proc:
        env = {**os.environ, **self.env, **(extra_env or {})}
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(self.argv, env=env, cwd=ROOT, stdout=log, stderr=log)
        log.close()
        if wait:
            wait_serving(self.address, proc=self.popen)
        return self

    def restart(self, extra_env: dict[str, str] | None = None) -> Proc:
        """Stop gracefully, then start with `extra_env` (e.g. failpoints) and wait until serving."""
        self.stop()
        return self.start(extra_env=extra_env)

    def signal(self, signum: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(signum)

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@dataclass
class Cluster:
    """Three participants and a coordinator, talking directly on loopback."""

    data_dir: Path
    catalog: Path | None = None
    coordinator_env: dict[str, str] = field(default_factory=dict)
    service_env: dict[str, str] = field(default_factory=dict)
    #: Extra coordinator flags; later flags win (e.g. ["--compensation-give-up", "2"]).
    coordinator_args: list[str] = field(default_factory=list)
    services: dict[str, Proc] = field(default_factory=dict)
    coordinator: Proc | None = None

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.admin_address = f"127.0.0.1:{free_port()}"
        #: The coordinator's planes: clients (coordinator.address), operators, the mesh.
        self.operator_address = f"127.0.0.1:{free_port()}"
        self.decisions_address = f"127.0.0.1:{free_port()}"
        coordinator_address = f"127.0.0.1:{free_port()}"
        for kind in PARTICIPANTS:
            address = f"127.0.0.1:{free_port()}"
            argv = [
                sys.executable,
                "-m",
                "services.server",
                kind,
                "--listen",
                address,
                "--data-dir",
                str(self.data_dir),
                "--decisions",
                self.decisions_address,
                "--resolve-after",
                "1",
                "--metrics-listen",
                f"127.0.0.1:{free_port()}",
                # No broker here: the choreographed saga is off (the mesh tests run it).
                "--broker",
                "",
            ]
            if self.catalog is not None:
                argv += ["--catalog", str(self.catalog / f"{kind}.json")]
            self.services[kind] = Proc(
                kind, argv, dict(self.service_env), address, self.data_dir / f"{kind}.log"
            )
        argv = [
            sys.executable,
            "-m",
            "coordinator.server",
            "--listen",
            coordinator_address,
            "--operator-listen",
            self.operator_address,
            "--decisions-listen",
            self.decisions_address,
            "--data-dir",
            str(self.data_dir),
            "--flight",
            self.services["flight"].address,
            "--hotel",
            self.services["hotel"].address,
            "--car",
            self.services["car"].address,
            "--rpc-timeout",
            "1",
            "--step-give-up",
            "2",
            "--compensation-give-up",
            "20",
            "--admin-listen",
            self.admin_address,
            "--broker",
            "",
            *self.coordinator_args,
        ]
        self.coordinator = Proc(
            "coordinator",
            argv,
            dict(self.coordinator_env),
            coordinator_address,
            self.data_dir / "coordinator.log",
        )

    def start(self) -> Cluster:
        """Start every process; if one does not come up, stop the others before raising."""
        try:
            for proc in self.services.values():
                proc.start(wait=False)
            for proc in self.services.values():
                wait_serving(proc.address, proc=proc.popen)
            assert self.coordinator is not None
            self.coordinator.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        procs = [self.coordinator, *self.services.values()]
        for proc in procs:
            if proc is not None:
                proc.stop()


def with_secrets(cluster: Cluster, operator: str = "ada") -> tuple[str, str]:
    """Restart `cluster` with the secrets `make up` creates; (operator token, mesh token)."""
    cluster.stop()
    auth.ensure_secrets(cluster.data_dir, operator=operator)
    cluster.start()
    folder = cluster.data_dir / auth.SECRETS
    return (
        (folder / auth.OPERATOR_TOKEN).read_text().strip(),
        (folder / auth.MESH_TOKEN).read_text().strip(),
    )


def long_folder(base: Path, length: int) -> Path:
    """A folder under `base` whose absolute path is `length` characters long."""
    base = base.resolve()
    need = length - len(str(base)) - 1
    assert need > 10, "tmp_path is already too long for this test"
    parts, left = [], need
    while left > 0:
        part = min(left, 60)
        if left - part == 1:  # a separator needs room for at least one character after it
            part -= 1
        parts.append("p" * part)
        left -= part + 1
    folder = base.joinpath(*parts)
    return folder


def stuck_saga(cluster: Cluster, books: Books, key: str = "stuck") -> cpb.Trip:
    """A saga that NEEDS_ATTENTION: its car is sold out and the hotel crashes on the Cancel
    of its compensation (the hotel stays down; the flight stays confirmed)."""
    hotel = cluster.services["hotel"]
    hotel.restart(extra_env={"TRIPMESH_FAILPOINTS": "participant.before_cancel=crash"})
    trip = books.coordinator.BookTrip(
        trip_request(key, cpb.PROTOCOL_SAGA, flight="FX", hotel="H", car="C-SOLD-OUT"),
        timeout=10,
    ).trip
    assert hotel.wait_exit() == -signal.SIGKILL
    return books.wait_trip(trip.trip_id, lambda t: t.status == cpb.TRIP_STATUS_NEEDS_ATTENTION)
