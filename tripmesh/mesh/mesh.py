"""One mesh: a data folder, its port layout, and the supervisord that runs it.

`Mesh.up` starts Toxiproxy (with every proxy derived from processes.json),
the broker (nats-server with JetStream, its file storage in DATA_DIR/broker),
the three services and then the coordinator under supervisord, and returns
only when each of them reports SERVING: the services and the coordinator
through the standard gRPC health protocol (the coordinator also through the
client-to-coordinator proxy, the way bookings come in), Toxiproxy through its
HTTP API with every proxy present, the broker through its monitoring
endpoint's JetStream health check. `Mesh.down` asks supervisord to stop them
all (SIGTERM, in reverse start order) and checks that none outlived it.

`make up STORE=postgres COORDINATORS=2` (a layout loaded so) also runs a
PostgreSQL server under supervisord, as the unprivileged `nobody` when we are
root, its data in DATA_DIR/postgres (initialised on the first `up`), with a
database per service and one the coordinators share (created before the
services start); and coordinator-2 (and -3) beside the coordinator, each
with its own ports and proxies, the services asking any of them for decisions.

The ports a mesh was started with are kept in DATA_DIR/layout.json, so that
anything that knows only the data folder can find it again; so is whether it
speaks TLS (`Layout.tls`: `make up TLS=1`), its certificates being in the
data folder too (tripmesh.runtime.tls).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tripmesh import PARTICIPANTS
from tripmesh.mesh import layout as layouts
from tripmesh.mesh.errors import MeshError
from tripmesh.mesh.layout import (
    BROKER,
    COORDINATOR,
    COORDINATORS_DATABASE,
    POSTGRES,
    TOXIPROXY,
    Layout,
)
from tripmesh.mesh.supervise import Program, Supervisor, render_config
from tripmesh.mesh.toxiproxy import Toxiproxy, ToxiproxyError
from tripmesh.runtime import auth, tls
from tripmesh.runtime.postgres import PostgresError, PostgresServer

ROOT = Path(__file__).resolve().parents[2]


def stop_on_sigterm() -> None:
    """Make SIGTERM end this process the way Ctrl-C does, through every `finally`: a tool
    that started a mesh of its own (a chaos run, the bench, a load run) then stops it when
    it is killed (a CI job's time-out, `kill`), instead of leaving its servers running.
    Call it from the main thread of a command-line entry point."""

    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def order(layout: Layout) -> list[str]:
    """The processes of a mesh in start order (stopped in reverse): Toxiproxy, the
    PostgreSQL server (STORE=postgres), the broker, the services, every coordinator."""
    first = [TOXIPROXY, *([POSTGRES] if layout.store == "postgres" else []), BROKER]
    return [*first, *PARTICIPANTS, *layout.coordinator_names]


DEAD = {"EXITED", "FATAL", "BACKOFF", "STOPPED", "UNKNOWN"}
SERVING = "SERVING"


def find_server(binary: str, variable: str, target: str) -> Path:
    """A server binary that is not ours: $VARIABLE, .bin/BINARY, or BINARY on PATH."""
    candidates = [os.environ.get(variable), str(ROOT / ".bin" / binary), shutil.which(binary)]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise MeshError(f"no {binary} found (.bin/{binary} or on PATH); `make {target}` installs it")


def find_toxiproxy() -> Path:
    """The Toxiproxy server: $TRIPMESH_TOXIPROXY_SERVER, .bin/, or PATH."""
    return find_server("toxiproxy-server", "TRIPMESH_TOXIPROXY_SERVER", "toxiproxy")


def find_nats_server() -> Path:
    """The broker, NATS: $TRIPMESH_NATS_SERVER, .bin/, or PATH."""
    return find_server("nats-server", "TRIPMESH_NATS_SERVER", "broker")


def broker_health(host: str, port: int, timeout: float = 1.0) -> str:
    """SERVING when the broker's monitoring says it and JetStream are healthy, else why not."""
    url = f"http://{host}:{port}/healthz?js-enabled-only=true"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            status = json.loads(reply.read()).get("status")
    except urllib.error.HTTPError as exc:
        return f"NOT_SERVING ({exc.code})"
    except (OSError, ValueError):
        return "UNREACHABLE"
    return SERVING if status == "ok" else f"NOT_SERVING ({status})"


def grpc_health(
    address: str, timeout: float = 1.0, credentials: grpc.ChannelCredentials | None = None
) -> str:
    """SERVING, NOT_SERVING, or the gRPC status code that came back instead."""
    with tls.dial(address, credentials) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError as exc:
            return exc.code().name if isinstance(exc, grpc.Call) else "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def postgres_health(server: PostgresServer, timeout: float = 1.0) -> str:
    """SERVING when the PostgreSQL server accepts a connection, else why not."""
    try:
        psycopg.connect(server.dsn(), connect_timeout=max(1, round(timeout))).close()
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()
        return f"UNREACHABLE ({first[0] if first else type(exc).__name__})"
    return SERVING


class Mesh:
    """One mesh: a data folder, its port layout, and the supervisord that runs it."""

    def __init__(
        self,
        data_dir: Path,
        layout: Layout | None = None,
        *,
        environment: Mapping[str, Mapping[str, str]] | None = None,
        extra_args: Mapping[str, Sequence[str]] | None = None,
        restart: bool = True,
    ) -> None:
        """`layout` is used when the mesh is started; by default the declared one.

        `environment` and `extra_args` add variables and flags per process name
        (a chaos scenario arms failpoints or shortens timeouts this way).
        `restart`: supervisord restarts a process that exits unasked (as under
        `make up`); the chaos lab says False and restarts processes itself.
        """
        self.restart = restart
        self.environment = environment or {}
        self.extra_args = extra_args or {}
        self.data_dir = data_dir.resolve()
        self.supervisor = Supervisor(self.data_dir)
        self.layout_file = self.data_dir / layouts.STORED
        stored = self.stored_layout()
        # A running mesh keeps the ports it was started with, whatever is asked now.
        if stored is not None and (layout is None or self.supervisor.running()):
            self.layout = stored
        else:
            self.layout = layout or layouts.load()

    def stored_layout(self) -> Layout | None:
        """The layout the mesh in this folder was last started with, if any."""
        return layouts.stored(self.data_dir)

    @property
    def client_credentials(self) -> grpc.ChannelCredentials | None:
        """What a client presents to this mesh: its `client` certificate under TLS, else None."""
        return tls.client_credentials(self.data_dir) if self.layout.tls else None

    def _tls_args(self) -> list[str]:
        return ["--tls-dir", str(tls.folder_of(self.data_dir))] if self.layout.tls else []

    @property
    def toxiproxy(self) -> Toxiproxy:
        return Toxiproxy(self.layout.host, self.layout.ports[TOXIPROXY], timeout=2.0)

    @property
    def postgres(self) -> PostgresServer:
        """The PostgreSQL server of a STORE=postgres mesh (its data in DATA_DIR/postgres)."""
        try:
            server = PostgresServer(self.data_dir / POSTGRES)
        except PostgresError as exc:  # not installed: says what to install
            raise MeshError(str(exc)) from None
        server.port = self.layout.ports[POSTGRES]
        return server

    def programs(self) -> list[Program]:
        data, py = str(self.data_dir), sys.executable
        toxiproxy_argv = [
            str(find_toxiproxy()),
            "-host",
            self.layout.host,
            "-port",
            str(self.layout.ports[TOXIPROXY]),
            "-config",
            str(self.data_dir / "toxiproxy.json"),
        ]
        programs = [
            Program(
                TOXIPROXY,
                toxiproxy_argv,
                10,
                environment={"LOG_LEVEL": "info"},
                restart=self.restart,
            ),
            Program(
                BROKER,
                [str(find_nats_server()), *self.layout.broker_argv(self.data_dir)],
                15,
                restart=self.restart,
            ),
        ]
        with_postgres = self.layout.store == "postgres"
        if with_postgres:
            server = self.postgres
            programs.append(
                Program(
                    POSTGRES,
                    server.argv(self.layout.ports[POSTGRES]),
                    12,
                    restart=self.restart,
                    user=server.user,
                    stop_signal="INT",  # fast shutdown: sessions ended, data checkpointed
                )
            )
        programs += [
            Program(
                k,
                [
                    py,
                    "-m",
                    "services.server",
                    *self.layout.service_argv(k),
                    "--data-dir",
                    data,
                    *self._tls_args(),
                    *self.extra_args.get(k, ()),
                ],
                20,
                # On PostgreSQL, started once their databases exist.
                autostart=not with_postgres,
                environment=self.environment.get(k),
                restart=self.restart,
                own_log=True,
            )
            for k in PARTICIPANTS
        ]
        # Started once the services answer, so their catalog loads at once; stopped first.
        # A replica gets what is asked for the coordinator unless asked for by its name.
        for name in self.layout.coordinator_names:
            argv = [
                py,
                "-m",
                "coordinator.server",
                *self.layout.coordinator_argv(name),
                "--data-dir",
                data,
                *self._tls_args(),
                *self.extra_args.get(name, self.extra_args.get(COORDINATOR, ())),
            ]
            programs.append(
                Program(
                    name,
                    argv,
                    30,
                    autostart=False,
                    environment=self.environment.get(name, self.environment.get(COORDINATOR)),
                    restart=self.restart,
                    own_log=True,
                )
            )
        return programs

    def running(self) -> bool:
        return self.supervisor.running()

    @property
    def order(self) -> list[str]:
        """This mesh's processes in start order."""
        return order(self.layout)

    def up(self, *, timeout: float = 60.0) -> bool:
        """Start whatever is not running and wait until all of it is SERVING.

        Returns False when everything was already up and serving.
        """
        deadline = time.monotonic() + timeout
        if self.running():
            stopped = [n for n, p in self.supervisor.processes().items() if p.state != "RUNNING"]
            for name in (n for n in self.order if n in stopped):
                self.supervisor.start(name)
            self._wait_serving(self.order, deadline)
            return bool(stopped)
        self._check_ports_free()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The operator's and the mesh's tokens (owner-only; kept across restarts).
        auth.ensure_secrets(self.data_dir, operator=os.environ.get("USER") or "operator")
        if self.layout.tls:
            tls.ensure_certificates(self.data_dir, self.layout.host)
        (self.data_dir / "toxiproxy.json").write_text(
            json.dumps(self.layout.toxiproxy_config(), indent=2) + "\n"
        )
        self.layout_file.write_text(json.dumps(self.layout.to_json(), indent=2) + "\n")
        if self.layout.store == "postgres" and not self.postgres.initialised:
            try:
                self.postgres.init()
            except (PostgresError, OSError) as exc:  # initdb failed, or `nobody` cannot reach
                raise MeshError(str(exc)) from exc
        self.supervisor.launch(render_config(self.data_dir, self.programs(), workdir=ROOT))
        try:
            if self.layout.store == "postgres":
                self._wait_serving([TOXIPROXY, POSTGRES, BROKER], deadline)
                for database in (*PARTICIPANTS, COORDINATORS_DATABASE):
                    self.postgres.create_database(database)
                for name in PARTICIPANTS:
                    self.supervisor.start(name)
            self._wait_serving([TOXIPROXY, BROKER, *PARTICIPANTS], deadline)
            for name in self.layout.coordinator_names:
                self.supervisor.start(name)
            self._wait_serving(self.layout.coordinator_names, deadline)
        except BaseException:  # MeshError, SupervisorError, or the tool being stopped
            # A half-started mesh is worse than none: stop it, keep its logs.
            self.supervisor.shutdown(timeout=60)
            raise
        return True

    def down(self, *, timeout: float = 90.0) -> bool:
        """Stop every process gracefully; False if nothing was running."""
        if not self.running():
            return False
        leftovers = self.supervisor.shutdown(timeout=timeout)
        if leftovers:
            raise MeshError(f"still running after shutdown: {', '.join(leftovers)}")
        return True

    def health(self, name: str) -> str:
        """SERVING when `name` answers as it should, else what is wrong."""
        if name == TOXIPROXY:
            try:
                found = self.toxiproxy.proxies()
            except ToxiproxyError:
                return "UNREACHABLE"
            missing = [p.name for p in self.layout.proxies if p.name not in found]
            return f"missing proxies {missing}" if missing else SERVING
        if name == BROKER:
            return broker_health(self.layout.host, self.layout.ports[layouts.admin_name(BROKER)])
        if name == POSTGRES:
            return postgres_health(self.postgres)
        credentials = self.client_credentials
        direct = grpc_health(self.layout.address(name), credentials=credentials)
        if name in self.layout.coordinator_names and direct == SERVING:
            # Also the way clients come in, so `up` proves the path a booking takes.
            proxy = layouts.proxy_name(layouts.CLIENT, name)
            via_proxy = grpc_health(self.layout.address(proxy), credentials=credentials)
            return SERVING if via_proxy == SERVING else f"{via_proxy} through {proxy}"
        return direct

    def _wait_serving(self, names: list[str], deadline: float) -> None:
        pending = list(names)
        while pending:
            processes = self.supervisor.processes()
            for name in list(pending):
                state = processes[name].state
                if state in DEAD:
                    raise MeshError(f"{name} is {state}:\n{self.tail(name, 15)}")
                if state == "RUNNING" and self.health(name) == SERVING:
                    pending.remove(name)
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"{n}: {self.health(n)}\n{self.tail(n, 10)}" for n in pending)
                raise MeshError(f"not SERVING in time: {', '.join(pending)}\n{tails}")
            if pending:
                time.sleep(0.1)

    def _check_ports_free(self) -> None:
        busy = []
        for name, port in self.layout.ports.items():
            with socket.socket() as probe:
                # As the servers do: a port in TIME_WAIT is free for them.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((self.layout.host, port))
                except OSError:
                    busy.append(f"{port} ({name})")
        if busy:
            raise MeshError(
                f"ports already in use: {', '.join(busy)}. Another mesh? `make down`"
                " (or `python -m tripmesh.mesh down --data-dir DIR` for its folder), or move this one"
                " with TRIPMESH_PORT_OFFSET."
            )

    def log_path(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def console_path(self, name: str) -> Path:
        """What a program printed outside its own log (a crash's traceback), if anything."""
        return self.data_dir / "logs" / f"{name}.console.log"

    def tail(self, name: str, lines: int) -> str:
        """The last `lines` lines of a program's log, and of its console output if any."""
        path = self.log_path(name)
        if not path.exists():
            return f"  (no log at {path})"
        text = "\n".join(
            "  " + line for line in path.read_text(errors="replace").splitlines()[-lines:]
        )
        console = self.console_path(name)
        printed = console.read_text(errors="replace").splitlines() if console.exists() else []
        if printed:
            text += f"\n  -- printed outside the log ({console.name}):\n" + "\n".join(
                "  " + line for line in printed[-lines:]
            )
        return text

    def wipe(self) -> None:
        """Delete the databases, the broker's streams and the logs (only when stopped); the
        next `up` reseeds."""
        if self.running():
            raise MeshError("stop the mesh before wiping its data")
        for pattern in ("*.db", "*.db-wal", "*.db-shm", "*.db-journal"):
            for path in self.data_dir.glob(pattern):
                path.unlink()
        shutil.rmtree(self.data_dir / BROKER, ignore_errors=True)
        shutil.rmtree(self.data_dir / POSTGRES, ignore_errors=True)
        shutil.rmtree(self.data_dir / "logs", ignore_errors=True)

    def pids(self) -> dict[str, int]:
        """The pid of supervisord and of every program it runs."""
        found = {name: p.pid for name, p in self.supervisor.processes().items()}
        return {"supervisord": self.supervisor.pid(), **found}
