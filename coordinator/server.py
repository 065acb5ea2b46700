"""Run the coordinator: `python -m coordinator.server`.

Configuration (flags override the environment):

| variable | default | meaning |
|---|---|---|
| TRIPMESH_LISTEN | 127.0.0.1:15050 | the client plane: Coordinator (with health and reflection) |
| TRIPMESH_OPERATOR_LISTEN | 127.0.0.1:15058 | the operator plane: Operator, operators' tokens only (empty: off) |
| TRIPMESH_DECISIONS_LISTEN | 127.0.0.1:15059 | the mesh plane: Decisions, for the participants' queries (mesh token) |
| TRIPMESH_ADMIN_LISTEN | 127.0.0.1:9100 | the admin HTTP port: /metrics, the operator page, /api (empty: off) |
| TRIPMESH_DATA_DIR | .data | the trip store is DATA_DIR/coordinator.db (unless TRIPMESH_STORE) |
| TRIPMESH_STORE | (none: SQLite) | a PostgreSQL URL (postgresql://user@host:port/db): the trip log there, one several coordinators can share |
| TRIPMESH_REPLICA | host:client port | this coordinator's name in the shared log's leases |
| TRIPMESH_SWEEP_EVERY | 5 | seconds between sweeps that resume unfinished trips no driver holds (and, on a shared log, take over expired leases) |
| TRIPMESH_LEASE | 5 | seconds a trip's lease lasts unrenewed: how soon another coordinator takes over the trips of one that died or stalled |
| TRIPMESH_FLIGHT / _HOTEL / _CAR | 127.0.0.1:16051 / 16052 / 16053 | participants (their Toxiproxy proxies) |
| TRIPMESH_DEFAULT_PROTOCOL | saga | 2pc, 3pc or saga, for requests that do not say |
| TRIPMESH_SAGA_PIVOT | (none) | flight, hotel or car: the saga's pivot step (steps before it compensatable, after it retriable); none: every step compensatable |
| TRIPMESH_RPC_TIMEOUT | 2.0 | deadline of each participant call, seconds |
| TRIPMESH_STEP_GIVE_UP | 5 | seconds a vote or saga step is retried before aborting |
| TRIPMESH_COMPENSATION_GIVE_UP | 60 | seconds a compensation is retried before NEEDS_ATTENTION |
| TRIPMESH_KEY_RETENTION_HOURS | 72 | how long idempotency keys are kept |
| TRIPMESH_TLS_DIR | (none: plaintext) | TLS on every plane and to the participants, with the CA and certificates in this folder (tripmesh.runtime.tls) |
| TRIPMESH_BROKER | nats://127.0.0.1:16057 | the broker (NATS JetStream) for the choreographed saga's events (its coordinator-to-broker proxy) |
| TRIPMESH_CHOREOGRAPHY_STUCK_AFTER | 30 | seconds with no event before a choreographed trip is NEEDS_ATTENTION (CHOREOGRAPHY_STUCK) |
| TRIPMESH_TOXIPROXY_API | (none) | host:port of Toxiproxy's API: the operator page shows each edge's state, and tells a cut edge from a dead service |
| TRIPMESH_FAILPOINTS | (none) | see tripmesh.runtime.failpoints |
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.admin import AdminServer
from coordinator.catalog import Catalog
from coordinator.choreography import Choreography, EventFollower
from coordinator.clients import Participants, RetryPolicy
from coordinator.domain import LegKind, Protocol
from coordinator.engine import Policies, TripEngine
from coordinator.metrics import CoordinatorMetrics
from coordinator.operations import OperatorActions
from coordinator.saga import Saga, trip_saga
from coordinator.service import TripService
from coordinator.servicer import CoordinatorServicer, DecisionsServicer, OperatorServicer
from coordinator.store import TripStore
from coordinator.store.postgres import PostgresTripStore
from coordinator.store.sqlite import SqliteTripStore
from coordinator.threepc import ThreePhaseCommit
from coordinator.twopc import TwoPhaseCommit
from tripmesh import PARTICIPANTS
from tripmesh.mesh import layout as layouts
from tripmesh.runtime import auth, failpoints, logs, rpc, tls
from tripmesh.runtime.database import StorageUnavailable
from tripmesh.runtime.pgdatabase import check_dsn
from tripmesh.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoordinatorConfig:
    listen: str
    operator_listen: str
    decisions_listen: str
    admin_listen: str
    data_dir: Path
    participants: dict[LegKind, str]
    default_protocol: Protocol
    saga_pivot: LegKind | None
    rpc_timeout: float
    policies: Policies
    key_retention: float
    #: The CA and certificates (tripmesh.runtime.tls); None: plaintext.
    tls_dir: Path | None = None
    #: host:port of Toxiproxy's API: the operator page shows the edges' state ("": unknown).
    toxiproxy_api: str = ""
    #: nats://host:port of the broker, through the coordinator's own proxy.
    broker: str = ""
    #: Seconds with no event before a choreographed trip needs attention.
    choreography_stuck_after: float = 30.0
    #: Where the trip log is: "" for SQLite in the data folder (the default), or a
    #: PostgreSQL connection string (postgresql://user@host:port/db) for a shared one.
    store: str = ""
    #: This coordinator's name in the shared log's leases ("" : host and client port).
    replica: str = ""
    #: Seconds a trip's lease lasts unrenewed: how soon a live coordinator takes over the
    #: trips of one that died or stalled (a shared PostgreSQL log only).
    lease: float = 5.0
    max_wait: float = 30.0
    sweep_every: float = 5.0
    #: Steps calls on the way at once to each participant; the steps asked for
    #: meanwhile leave together when one returns (coordinator/clients.StepBatcher).
    #: 0: each step its own RPC.
    step_batches: int = 2
    grace: float = 5.0

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> CoordinatorConfig:
        env = os.environ
        # Defaults: the mesh's declared layout (tripmesh/mesh/processes.json).
        declared = layouts.load(environ={})
        p = argparse.ArgumentParser(prog="python -m coordinator.server")
        p.add_argument(
            "--listen", default=env.get("TRIPMESH_LISTEN", declared.address(layouts.COORDINATOR))
        )
        p.add_argument(
            "--operator-listen",
            default=env.get("TRIPMESH_OPERATOR_LISTEN", declared.operator_address),
            help="host:port of the operator plane (Operator); empty: no operator plane",
        )
        p.add_argument(
            "--decisions-listen",
            default=env.get(
                "TRIPMESH_DECISIONS_LISTEN",
                declared.address(layouts.plane_name(layouts.COORDINATOR, layouts.DECISIONS_PLANE)),
            ),
            help="host:port where the participants ask for 2PC/3PC decisions (Decisions)",
        )
        p.add_argument(
            "--admin-listen",
            default=env.get(
                "TRIPMESH_ADMIN_LISTEN", declared.address(layouts.admin_name(layouts.COORDINATOR))
            ),
        )
        p.add_argument("--data-dir", default=env.get("TRIPMESH_DATA_DIR", ".data"))
        for kind in PARTICIPANTS:
            p.add_argument(
                f"--{kind}",
                default=env.get(
                    f"TRIPMESH_{kind.upper()}",
                    declared.address(layouts.proxy_name(layouts.COORDINATOR, kind)),
                ),
            )
        p.add_argument(
            "--broker",
            default=env.get("TRIPMESH_BROKER", declared.broker_url(layouts.COORDINATOR)),
            help="nats://host:port of the broker for the choreographed saga's events (empty: none)",
        )
        p.add_argument(
            "--choreography-stuck-after",
            type=float,
            default=float(env.get("TRIPMESH_CHOREOGRAPHY_STUCK_AFTER", 30)),
            help="seconds with no event before a choreographed trip needs attention",
        )
        p.add_argument(
            "--store",
            default=env.get("TRIPMESH_STORE", ""),
            help="the trip log: empty for SQLite in the data folder (default), or a PostgreSQL"
            " URL, postgresql://user@host:port/database",
        )
        p.add_argument(
            "--replica",
            default=env.get("TRIPMESH_REPLICA", ""),
            help="this coordinator's name in a shared log's leases (default: host:port)",
        )
        p.add_argument(
            "--lease",
            type=float,
            default=float(env.get("TRIPMESH_LEASE", 5)),
            help="seconds a trip's lease lasts unrenewed (a shared PostgreSQL log)",
        )
        p.add_argument(
            "--sweep-every",
            type=float,
            default=float(env.get("TRIPMESH_SWEEP_EVERY", 5)),
            help="seconds between sweeps that resume unfinished trips nobody drives",
        )
        p.add_argument(
            "--default-protocol",
            choices=[x.value for x in Protocol],
            default=env.get("TRIPMESH_DEFAULT_PROTOCOL", "saga"),
        )
        p.add_argument(
            "--saga-pivot",
            choices=["none", *(k.value for k in LegKind)],
            default=env.get("TRIPMESH_SAGA_PIVOT", "none") or "none",
            help="the saga's pivot step; steps after it are retried, never compensated",
        )
        p.add_argument(
            "--rpc-timeout", type=float, default=float(env.get("TRIPMESH_RPC_TIMEOUT", 2.0))
        )
        p.add_argument(
            "--step-batches",
            type=int,
            default=int(env.get("TRIPMESH_STEP_BATCHES", 2)),
            help="Steps calls on the way at once to each participant; the steps asked for "
            "meanwhile travel together in the next (0: each step its own RPC; default 2)",
        )
        p.add_argument(
            "--step-give-up", type=float, default=float(env.get("TRIPMESH_STEP_GIVE_UP", 5))
        )
        p.add_argument(
            "--compensation-give-up",
            type=float,
            default=float(env.get("TRIPMESH_COMPENSATION_GIVE_UP", 60)),
        )
        p.add_argument(
            "--key-retention-hours",
            type=float,
            default=float(env.get("TRIPMESH_KEY_RETENTION_HOURS", 72)),
        )
        p.add_argument(
            "--tls-dir",
            default=env.get("TRIPMESH_TLS_DIR", ""),
            help="TLS on every plane and to the participants, certificates from this folder",
        )
        p.add_argument(
            "--toxiproxy-api",
            default=env.get("TRIPMESH_TOXIPROXY_API", ""),
            help="host:port of Toxiproxy's API, for the operator page's edges (default: none)",
        )
        a = p.parse_args(argv)
        try:
            for flag in ("listen", "operator_listen", "decisions_listen", "admin_listen"):
                layouts.check_listen(getattr(a, flag), "--" + flag.replace("_", "-"))
            if a.toxiproxy_api and not a.toxiproxy_api.rpartition(":")[2].isdigit():
                raise layouts.LayoutError(f"--toxiproxy-api {a.toxiproxy_api!r}: not host:port")
            if not a.decisions_listen:
                raise layouts.LayoutError("--decisions-listen: the participants need it")
            if a.broker:
                layouts.check_broker_url(a.broker, "--broker")
            if a.choreography_stuck_after <= 0:
                raise layouts.LayoutError("--choreography-stuck-after: must be positive")
            if a.lease <= 0:
                raise layouts.LayoutError("--lease: must be positive")
            if a.sweep_every <= 0:
                raise layouts.LayoutError("--sweep-every: must be positive")
            if a.step_batches < 0:
                raise layouts.LayoutError("--step-batches: must not be negative")
            if a.store:
                check_dsn(a.store, "--store")
        except layouts.LayoutError as exc:
            p.error(exc.message)
        except ValueError as exc:
            p.error(str(exc))
        return cls(
            listen=a.listen,
            operator_listen=a.operator_listen,
            decisions_listen=a.decisions_listen,
            admin_listen=a.admin_listen,
            data_dir=Path(a.data_dir),
            participants={kind: getattr(a, kind.value) for kind in LegKind},
            default_protocol=Protocol(a.default_protocol),
            saga_pivot=None if a.saga_pivot == "none" else LegKind(a.saga_pivot),
            rpc_timeout=a.rpc_timeout,
            step_batches=a.step_batches,
            policies=Policies(
                step=RetryPolicy(give_up_after=a.step_give_up),
                compensation=RetryPolicy(give_up_after=a.compensation_give_up),
                phase2=RetryPolicy(give_up_after=None),
                phase2_attention_after=a.compensation_give_up,
            ),
            key_retention=a.key_retention_hours * 3600,
            tls_dir=Path(a.tls_dir) if a.tls_dir else None,
            toxiproxy_api=a.toxiproxy_api,
            broker=a.broker,
            choreography_stuck_after=a.choreography_stuck_after,
            store=a.store,
            replica=a.replica or f"{socket.gethostname()}:{a.listen.rpartition(':')[2]}",
            lease=a.lease,
            sweep_every=a.sweep_every,
        )


def _guard(
    credentials: auth.Credentials | None, service: str, *, peers: tuple[str, ...] = ()
) -> list[auth.Guard]:
    """The guard that lets only holders of `credentials` call `service`."""
    if credentials is None:
        log.warning("no %s: %s is open to anyone who reaches its plane", auth.SECRETS, service)
        return []
    if peers:
        credentials = credentials.requiring_peers(peers)
    return [auth.Guard({service: credentials})]


async def open_store(config: CoordinatorConfig) -> TripStore:
    """The trip log the configuration names: PostgreSQL at `store`, else SQLite."""
    if config.store:
        try:
            return await PostgresTripStore.open(
                config.store, replica=config.replica, lease=config.lease
            )
        except StorageUnavailable as exc:
            # Loud and short: supervisord restarts us, and the log says what is missing.
            log.critical("the trip log (--store) cannot be opened: %s", exc)
            raise SystemExit(f"coordinator: --store: {exc}") from None
    return SqliteTripStore(config.data_dir / "coordinator.db")


async def serve(config: CoordinatorConfig) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = await open_store(config)
    metrics = CoordinatorMetrics()
    metrics.choreography.watch_outbox(store.outbox)
    mesh_token = auth.read_mesh_token(config.data_dir)
    identity = (
        None if config.tls_dir is None else tls.Identity.load(config.tls_dir, tls.COORDINATOR)
    )
    to_participants = None if identity is None else identity.channel_credentials()
    participants = Participants.connect(
        config.participants,
        timeout=config.rpc_timeout,
        metrics=metrics,
        token=mesh_token,
        credentials=to_participants,
        batches_in_flight=config.step_batches,
    )
    catalog = Catalog(participants)
    engines: dict[Protocol, TripEngine] = {
        engine.protocol: engine
        for engine in (
            TwoPhaseCommit(store, participants, config.policies, metrics),
            Saga(store, participants, config.policies, metrics, steps=trip_saga(config.saga_pivot)),
            ThreePhaseCommit(store, participants, config.policies, metrics),
        )
    }
    # The choreographed saga, when there is a broker: the services drive it, we follow.
    follower = None
    if config.broker:
        follower = EventFollower(
            store, config.broker, stuck_after=config.choreography_stuck_after, metrics=metrics
        )
        engines[Protocol.CHOREOGRAPHY] = Choreography(
            store, participants, config.policies, metrics
        ).bind(follower)
    service = TripService(store, engines, catalog, metrics=metrics)
    actions = OperatorActions(service, participants)
    operators = auth.operator_credentials(config.data_dir)
    admin = None
    if config.admin_listen:
        admin = AdminServer(
            config.admin_listen,
            store,
            metrics,
            config.participants,
            credentials=to_participants,
            actions=actions,
            operators=operators,
            toxiproxy_api=config.toxiproxy_api,
        )
        log.info("admin (metrics, operator page) on http://%s/", config.admin_listen)
    names = coordinator_pb2.DESCRIPTOR.services_by_name

    def tls_with(require_client_certificate: bool) -> grpc.ServerCredentials | None:
        if identity is None:
            return None
        return identity.server_credentials(require_client_certificate=require_client_certificate)

    # Three planes, three listeners: a client can reach only Coordinator.
    planes = [
        await rpc.start_server(
            config.listen,
            [
                rpc.Service(
                    coordinator_pb2_grpc.add_CoordinatorServicer_to_server,
                    CoordinatorServicer(
                        service, default_protocol=config.default_protocol, max_wait=config.max_wait
                    ),
                    names["Coordinator"].full_name,
                )
            ],
            credentials=tls_with(False),
        ),
        await rpc.start_server(
            config.decisions_listen,
            [
                rpc.Service(
                    coordinator_pb2_grpc.add_DecisionsServicer_to_server,
                    DecisionsServicer(service),
                    names["Decisions"].full_name,
                )
            ],
            guards=_guard(
                auth.mesh_credentials(config.data_dir),
                names["Decisions"].full_name,
                peers=PARTICIPANTS if identity is not None else (),
            ),
            credentials=tls_with(True),
        ),
    ]
    if config.operator_listen:
        planes.append(
            await rpc.start_server(
                config.operator_listen,
                [
                    rpc.Service(
                        coordinator_pb2_grpc.add_OperatorServicer_to_server,
                        OperatorServicer(actions, max_wait=config.max_wait),
                        names["Operator"].full_name,
                    )
                ],
                guards=_guard(operators, names["Operator"].full_name),
                credentials=tls_with(False),
            )
        )
    # Decisions must be answerable while we recover: prepared participants are asking.
    await catalog.load()
    following = asyncio.create_task(
        follower.run(store.outbox) if follower is not None else asyncio.Event().wait(),
        name="choreography follower",
    )
    recovery = asyncio.create_task(service.recover_unfinished(), name="recovery")
    housekeeping = asyncio.create_task(
        service.run_housekeeping(
            sweep_every=config.sweep_every, key_retention=config.key_retention
        ),
        name="housekeeping",
    )
    failure = rpc.StorageFailure()
    store.on_failure(failure)
    for plane in planes:
        await plane.set_serving(True)
    log.info(
        "coordinator serving: clients on port %d, decisions on %d, operators on %s",
        planes[0].port,
        planes[1].port,
        planes[2].port if len(planes) > 2 else "(off)",
    )
    failed = False
    try:
        failed = await rpc.serve_until_signalled(planes, grace=config.grace, failure=failure)
    finally:
        for task in (recovery, housekeeping, following):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await service.stop()
        await participants.close()
        if admin is not None:
            admin.close()
        store.close()
    if failed:
        raise SystemExit(rpc.EXIT_STORAGE_FAILED)


def main(argv: list[str] | None = None) -> None:
    config = CoordinatorConfig.from_args(argv)
    logs.configure("coordinator")
    failpoints.arm_from_env()
    rpc.run(serve(config))


if __name__ == "__main__":
    main()
