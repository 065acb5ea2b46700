"""Run one participant service: `python -m services.server flight|hotel|car`.

Configuration (flags override the environment):

| variable | default | meaning |
|---|---|---|
| TRIPMESH_LISTEN | 127.0.0.1:15051 (flight), :15052 (hotel), :15053 (car) | where to listen |
| TRIPMESH_METRICS_LISTEN | 127.0.0.1:9101 (flight), :9102 (hotel), :9103 (car) | Prometheus /metrics (empty: off) |
| TRIPMESH_DATA_DIR | .data | the books are DATA_DIR/<kind>.db (unless TRIPMESH_STORE) |
| TRIPMESH_STORE | (none: SQLite) | the books on a PostgreSQL server instead: postgresql://user@host:port/database |
| TRIPMESH_DECISIONS | 127.0.0.1:16054 (flight), :16055 (hotel), :16056 (car) | where to ask the coordinator for 2PC decisions (its <kind>-to-coordinator proxy) |
| TRIPMESH_BROKER | nats://127.0.0.1:16058 (flight), :16059 (hotel), :16060 (car) | the broker (NATS JetStream) for the choreographed saga's events (its <kind>-to-broker proxy); empty: no part in it |
| TRIPMESH_CATALOG | (built-in) | a catalog JSON file to seed from instead |
| TRIPMESH_SEED_DAYS | 60 | how many dates are put on sale, from today |
| TRIPMESH_RESOLVE_AFTER | 5 | seconds a prepared 2PC hold waits before we ask about it |
| TRIPMESH_3PC_WAIT_TIMEOUT | 10 | seconds a 3PC yes vote waits for PreCommit before aborting on its own |
| TRIPMESH_3PC_PRECOMMIT_TIMEOUT | 10 | seconds a pre-committed 3PC hold waits before committing on its own |
| TRIPMESH_TLS_DIR | (none: plaintext) | mTLS with the CA and certificates in this folder: callers must present a certificate the CA signed, the protocol steps only the coordinator's (tripmesh.runtime.tls) |
| TRIPMESH_FAILPOINTS | (none) | see tripmesh.runtime.failpoints |
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import start_http_server

from services import car, flight, hotel
from services.catalog import CatalogKind, load_catalog_file
from services.participant.choreography import Choreographer
from services.participant.metrics import ParticipantMetrics
from services.participant.resolver import InDoubtResolver
from services.participant.servicer import ParticipantServicer
from services.participant.store import ParticipantStore
from services.participant.store.postgres import PostgresParticipantStore
from services.participant.store.sqlite import SqliteParticipantStore
from services.participant.timeouts import ThreePhaseTimer
from tripmesh.mesh import layout as layouts
from tripmesh.runtime import auth, failpoints, logs, rpc, tls
from tripmesh.runtime.database import StorageUnavailable
from tripmesh.runtime.pgdatabase import check_dsn
from tripmesh.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    coordinator_pb2_grpc,
    participant_pb2,
    participant_pb2_grpc,
)

log = logging.getLogger(__name__)

KINDS: dict[str, CatalogKind] = {"flight": flight.KIND, "hotel": hotel.KIND, "car": car.KIND}


@dataclass(frozen=True)
class ServiceConfig:
    kind: str
    listen: str
    metrics_listen: str
    data_dir: Path
    decisions: str
    catalog: Path | None
    seed_days: int
    resolve_after: float
    resolve_interval: float
    three_phase_wait: float
    three_phase_pre_committed: float
    grace: float
    #: The CA and certificates (tripmesh.runtime.tls); None: plaintext.
    tls_dir: Path | None = None
    #: nats://host:port of the broker, through this service's own proxy.
    broker: str = ""
    #: The books on PostgreSQL (a connection string); empty: SQLite in the data folder.
    store: str = ""

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> ServiceConfig:
        env = os.environ
        parser = argparse.ArgumentParser(prog="python -m services.server")
        parser.add_argument("kind", choices=sorted(KINDS))
        parser.add_argument("--listen", default=env.get("TRIPMESH_LISTEN"))
        parser.add_argument("--metrics-listen", default=env.get("TRIPMESH_METRICS_LISTEN"))
        parser.add_argument("--data-dir", default=env.get("TRIPMESH_DATA_DIR", ".data"))
        parser.add_argument(
            "--decisions",
            default=env.get("TRIPMESH_DECISIONS"),
            help="where to ask for 2PC/3PC decisions: host:port, or several coordinators'"
            " (comma-separated IPs: round robin over the healthy ones)",
        )
        parser.add_argument(
            "--broker",
            default=env.get("TRIPMESH_BROKER"),
            help="nats://host:port of the broker for the choreographed saga's events"
            " (empty: no part in it)",
        )
        parser.add_argument(
            "--store",
            default=env.get("TRIPMESH_STORE", ""),
            help="the books: empty for SQLite in the data folder (default), or a PostgreSQL"
            " URL, postgresql://user@host:port/database",
        )
        parser.add_argument("--catalog", default=env.get("TRIPMESH_CATALOG"))
        parser.add_argument("--seed-days", type=int, default=int(env.get("TRIPMESH_SEED_DAYS", 60)))
        parser.add_argument(
            "--resolve-after", type=float, default=float(env.get("TRIPMESH_RESOLVE_AFTER", 5))
        )
        parser.add_argument(
            "--3pc-wait-timeout",
            dest="three_pc_wait_timeout",
            type=float,
            default=float(env.get("TRIPMESH_3PC_WAIT_TIMEOUT", 10)),
        )
        parser.add_argument(
            "--3pc-precommit-timeout",
            dest="three_pc_precommit_timeout",
            type=float,
            default=float(env.get("TRIPMESH_3PC_PRECOMMIT_TIMEOUT", 10)),
        )
        parser.add_argument(
            "--tls-dir",
            default=env.get("TRIPMESH_TLS_DIR", ""),
            help="mTLS, with the CA and certificates in this folder",
        )
        args = parser.parse_args(argv)
        if min(args.three_pc_wait_timeout, args.three_pc_precommit_timeout) <= 0:
            parser.error("--3pc-wait-timeout and --3pc-precommit-timeout must be positive")
        # Defaults: the mesh's declared layout (tripmesh/mesh/processes.json).
        declared = layouts.load(environ={})
        listen = args.listen or declared.address(args.kind)
        metrics_listen = (
            declared.address(layouts.admin_name(args.kind))
            if args.metrics_listen is None
            else args.metrics_listen
        )
        broker = declared.broker_url(args.kind) if args.broker is None else args.broker
        try:
            layouts.check_listen(listen, "--listen")
            layouts.check_listen(metrics_listen, "--metrics-listen")
            if broker:
                layouts.check_broker_url(broker, "--broker")
            if args.store:
                check_dsn(args.store, "--store")
        except layouts.LayoutError as exc:
            parser.error(exc.message)
        except ValueError as exc:
            parser.error(str(exc))
        try:
            if args.decisions:
                rpc.target(args.decisions)  # one host:port, or several coordinators' IPs
        except ValueError as exc:
            parser.error(f"--decisions: {exc}")
        return cls(
            kind=args.kind,
            listen=listen,
            metrics_listen=metrics_listen,
            data_dir=Path(args.data_dir),
            decisions=args.decisions
            or declared.address(layouts.proxy_name(args.kind, layouts.COORDINATOR)),
            catalog=Path(args.catalog) if args.catalog else None,
            seed_days=args.seed_days,
            resolve_after=args.resolve_after,
            resolve_interval=max(0.5, args.resolve_after / 2),
            three_phase_wait=args.three_pc_wait_timeout,
            three_phase_pre_committed=args.three_pc_precommit_timeout,
            grace=5.0,
            tls_dir=Path(args.tls_dir) if args.tls_dir else None,
            broker=broker,
            store=args.store,
        )


def _search_service(kind: str, store: ParticipantStore) -> rpc.Service:
    servicers = {
        "flight": (catalog_pb2_grpc.add_FlightServiceServicer_to_server, flight.FlightSearch),
        "hotel": (catalog_pb2_grpc.add_HotelServiceServicer_to_server, hotel.HotelSearch),
        "car": (catalog_pb2_grpc.add_CarServiceServicer_to_server, car.CarSearch),
    }
    add, servicer = servicers[kind]
    name = {"flight": "FlightService", "hotel": "HotelService", "car": "CarService"}[kind]
    return rpc.Service(
        add, servicer(store), catalog_pb2.DESCRIPTOR.services_by_name[name].full_name
    )


def open_store(config: ServiceConfig) -> ParticipantStore:
    """Open (and on first use, seed) this service's books: on PostgreSQL at `store`, else
    in SQLite in the data folder."""
    kind = KINDS[config.kind]
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store: ParticipantStore
    if config.store:
        try:
            store = PostgresParticipantStore(config.store, kind=config.kind)
        except StorageUnavailable as exc:
            # Loud and short: supervisord restarts us, and the log says what is missing.
            log.critical("the books (--store) cannot be opened: %s", exc)
            raise SystemExit(f"{config.kind}: --store: {exc}") from None
    else:
        store = SqliteParticipantStore(config.data_dir / f"{config.kind}.db", kind=config.kind)
    resources, start, days = kind.seed, dt.datetime.now(dt.UTC).date(), config.seed_days
    if config.catalog is not None:
        resources, file_start, file_days = load_catalog_file(config.catalog)
        start, days = file_start or start, file_days or days
    if store.seed(resources, start, days):
        log.info("seeded %d %ss for %d days from %s", len(resources), config.kind, days, start)
    return store


# The participant's writes, which only the coordinator may ask for (reads stay open).
PROTOCOL_STEPS = (
    "Prepare",
    "Commit",
    "Abort",
    "CanCommit",
    "PreCommit",
    "DoCommit",
    "Reserve",
    "Cancel",
    "Confirm",
    "Steps",
)


async def serve(config: ServiceConfig) -> None:
    store = open_store(config)
    metrics = ParticipantMetrics(config.kind, store.units)
    metrics.choreography.watch_outbox(store.outbox)
    if config.metrics_listen:
        host, _, port = config.metrics_listen.rpartition(":")
        start_http_server(int(port), addr=host, registry=metrics.registry)
    participant = rpc.Service(
        participant_pb2_grpc.add_ParticipantServicer_to_server,
        ParticipantServicer(store, KINDS[config.kind].unit, metrics),
        participant_pb2.DESCRIPTOR.services_by_name["Participant"].full_name,
    )
    identity = None if config.tls_dir is None else tls.Identity.load(config.tls_dir, config.kind)
    mesh = auth.mesh_credentials(config.data_dir)
    guards = []
    if mesh is None:
        log.warning(
            "no %s in %s: the protocol steps are open to anyone", auth.SECRETS, config.data_dir
        )
    else:
        if identity is not None:  # and only the coordinator's certificate
            mesh = mesh.requiring_peers([tls.COORDINATOR])
        guards = [auth.Guard({f"/{participant.full_name}/{m}": mesh for m in PROTOCOL_STEPS})]
    running = await rpc.start_server(
        config.listen,
        [participant, _search_service(config.kind, store)],
        guards=guards,
        credentials=None
        if identity is None
        else identity.server_credentials(require_client_certificate=True),
    )
    decisions_channel = rpc.channel(
        config.decisions, credentials=None if identity is None else identity.channel_credentials()
    )
    token = auth.read_mesh_token(config.data_dir)
    resolver = InDoubtResolver(
        store,
        coordinator_pb2_grpc.DecisionsStub(decisions_channel),
        credentials=auth.bearer(token) if token else (),
        after=config.resolve_after,
        interval=config.resolve_interval,
        metrics=metrics,
    )
    resolving = asyncio.create_task(resolver.run_forever(), name="in-doubt resolver")
    timer = ThreePhaseTimer(
        store,
        waiting_for=config.three_phase_wait,
        pre_committed_for=config.three_phase_pre_committed,
        metrics=metrics,
    )
    timing = asyncio.create_task(timer.run_forever(), name="3PC time-outs")
    # The choreographed saga: our part, driven by the broker's events, not by a coordinator.
    reacting = asyncio.create_task(
        Choreographer(config.kind, store, config.broker, metrics.choreography).run()
        if config.broker
        else asyncio.Event().wait(),
        name="choreography",
    )
    failure = rpc.StorageFailure()
    store.on_failure(failure)
    await running.set_serving(True)
    log.info(
        "%s service serving on port %d, its books in %s", config.kind, running.port, store.location
    )
    failed = False
    try:
        failed = await rpc.serve_until_signalled(running, grace=config.grace, failure=failure)
    finally:
        for task in (resolving, timing, reacting):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await decisions_channel.close()
        store.close()
    if failed:
        raise SystemExit(rpc.EXIT_STORAGE_FAILED)


def main(argv: list[str] | None = None) -> None:
    config = ServiceConfig.from_args(argv)
    logs.configure(config.kind)
    failpoints.arm_from_env()
    rpc.run(serve(config))


if __name__ == "__main__":
    main()
