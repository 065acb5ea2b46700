"""Where everything listens: the mesh's processes, the proxies derived from them, their ports.

`processes.json` beside this file is the one declaration: each process with
its gRPC port, its admin HTTP port, its other gRPC planes and the processes it
dials. Every dialled edge gets a Toxiproxy proxy named after it
(`coordinator-to-hotel`), and clients get `client-to-coordinator`. A plane is
a listener of its own, named `<process>-<plane>`: the coordinator serves its
clients on `coordinator`, operators on `coordinator-operator` and the
participants' decision queries on `coordinator-decisions` (which their
`<kind>-to-coordinator` proxies lead to), so that no client can reach what
only operators or the mesh may call. A `Layout` is that declaration with the
ports actually used, which can be moved all at once (`--port-offset`, or
TRIPMESH_PORT_OFFSET) or one by one (TRIPMESH_PORT_<NAME>, e.g.
TRIPMESH_PORT_COORDINATOR_TO_HOTEL=16052), so that a test can run a whole mesh
beside a running `make up`.

A mesh runs a selection of the declaration (`load(store=..., coordinators=...)`):
the PostgreSQL server only with store "postgres", and as many coordinators as
asked (coordinator, coordinator-2, ...; their edges mirror the first one's);
the ports and proxies of what it does not run are left out.

No port may lie inside the kernel's ephemeral range
(/proc/sys/net/ipv4/ip_local_port_range): while a process is down, an
outgoing connection (Toxiproxy dialling it, for one) could be given its port,
and the restarted process would fail to bind. Such a port is refused.
"""

from __future__ import annotations

import json
import os
import random
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tripmesh import PARTICIPANTS
from tripmesh.mesh.errors import MeshError
from tripmesh.runtime.postgres import SUPERUSER

DECLARATION = Path(__file__).with_name("processes.json")
COORDINATOR = "coordinator"
OPERATOR_PLANE = "operator"
DECISIONS_PLANE = "decisions"
TOXIPROXY = "toxiproxy"
#: NATS with JetStream: the choreographed saga's events (its admin port is NATS monitoring).
BROKER = "broker"
#: The PostgreSQL server of `make up STORE=postgres`: a database per service, one shared by
#: the coordinators.
POSTGRES = "postgres"
CLIENT = "client"
STORES = ("sqlite", "postgres")
#: The most coordinators processes.json declares (coordinator, coordinator-2, coordinator-3).
MAX_COORDINATORS = 3
#: The coordinators' database on the PostgreSQL server (each service's is named after it).
COORDINATORS_DATABASE = "coordinators"


class LayoutError(MeshError):
    """The declaration or a port override does not make sense."""


@dataclass(frozen=True)
class ProxySpec:
    """One edge: Toxiproxy listens on `listen` and forwards to process `upstream`."""

    name: str
    upstream: str


@dataclass(frozen=True)
class Layout:
    """The ports of one mesh: processes, proxies and the Toxiproxy API, by name."""

    host: str
    #: Every port by name: "coordinator", "flight", ..., proxy names, "toxiproxy" (the API).
    ports: Mapping[str, int]
    proxies: tuple[ProxySpec, ...]
    #: Every gRPC hop speaks TLS (tripmesh.runtime.tls; certificates in the data folder).
    tls: bool = False
    #: Where the books and the trip log are: "sqlite" (a file each) or "postgres".
    store: str = "sqlite"
    #: How many coordinators serve (coordinator, coordinator-2, ...), sharing the trip log.
    coordinators: int = 1

    @property
    def coordinator_names(self) -> list[str]:
        return [replica_name(i) for i in range(self.coordinators)]

    def _select(self, store: str, coordinators: int) -> Layout:
        """This layout for a mesh keeping its books and trip log in `store`, with
        `coordinators` coordinators: only the processes (and proxies, and ports) it runs."""
        if store not in STORES:
            raise LayoutError(f"STORE={store!r}: expected one of {', '.join(STORES)}")
        declared_replicas = sum(
            1
            for name in self.ports
            if name.startswith(COORDINATOR + "-") and name.removeprefix(COORDINATOR + "-").isdigit()
        )
        if not 1 <= coordinators <= declared_replicas + 1:
            raise LayoutError(
                f"COORDINATORS={coordinators}: between 1 and {declared_replicas + 1}"
                " (tripmesh/mesh/processes.json declares that many)"
            )
        if coordinators > 1 and store != "postgres":
            raise LayoutError(
                f"COORDINATORS={coordinators} needs STORE=postgres: several coordinators share"
                " one trip log on a PostgreSQL server (SQLite is one process's file)"
            )
        dropped = {replica_name(i) for i in range(coordinators, declared_replicas + 1)}
        if store != "postgres":
            dropped.add(POSTGRES)

        def kept(name: str) -> bool:
            return name not in dropped and not any(name.startswith(d + "-") for d in dropped)

        proxies = tuple(
            p for p in self.proxies if kept(p.upstream) and kept(p.name.partition("-to-")[0])
        )
        names = {p.name for p in self.proxies}
        ports = {
            n: port
            for n, port in self.ports.items()
            if (n in {p.name for p in proxies} if n in names else kept(n))
        }
        return Layout(self.host, MappingProxyType(ports), proxies, self.tls, store, coordinators)

    def address(self, name: str) -> str:
        """host:port of a process or a proxy."""
        return f"{self.host}:{self.ports[name]}"

    @property
    def client_address(self) -> str:
        """Where clients dial the coordinators: through their proxies (several, comma-separated,
        for one channel over them all: tripmesh.runtime.rpc.target)."""
        return ",".join(self.address(proxy_name(CLIENT, name)) for name in self.coordinator_names)

    def store_dsn(self, source: str, database: str) -> str:
        """The libpq connection string `source` uses for `database`: through its own proxy
        to the PostgreSQL server, as its superuser (the server trusts 127.0.0.1)."""
        address = self.address(proxy_name(source, POSTGRES))
        host, _, port = address.rpartition(":")
        return f"postgresql://{SUPERUSER}@{host}:{port}/{database}"

    def service_argv(self, kind: str) -> list[str]:
        """Flags of `python -m services.server KIND`: decisions, events and (STORE=postgres)
        its database, each through its own proxy; decisions from any coordinator."""
        argv = [
            kind,
            "--listen",
            self.address(kind),
            "--decisions",
            ",".join(self.address(proxy_name(kind, c)) for c in self.coordinator_names),
            "--metrics-listen",
            self.address(admin_name(kind)),
            "--broker",
            self.broker_url(kind),
        ]
        if self.store == "postgres":
            argv += ["--store", self.store_dsn(kind, kind)]
        return argv

    def broker_url(self, source: str) -> str:
        """nats://host:port of the broker as `source` dials it: through its own proxy."""
        return f"nats://{self.address(proxy_name(source, BROKER))}"

    def broker_argv(self, data_dir: Path) -> list[str]:
        """Flags of nats-server: JetStream with file storage in DATA_DIR/broker, its
        monitoring (health) on the broker's admin port, on this layout's host only."""
        return [
            "--addr",
            self.host,
            "--port",
            str(self.ports[BROKER]),
            "--http_port",
            str(self.ports[admin_name(BROKER)]),
            "--jetstream",
            "--store_dir",
            str(data_dir / BROKER),
            "--name",
            "tripmesh-broker",
        ]

    @property
    def operator_address(self) -> str:
        """Where operators dial the coordinator's `Operator` service (the admin plane)."""
        return self.address(plane_name(COORDINATOR, OPERATOR_PLANE))

    def coordinator_argv(self, name: str = COORDINATOR) -> list[str]:
        """Flags of `python -m coordinator.server` for coordinator `name` (a replica's are
        its own ports and proxies): it dials services, the broker and (STORE=postgres) the
        shared trip log only through proxies."""
        argv = [
            "--listen",
            self.address(name),
            "--operator-listen",
            self.address(plane_name(name, OPERATOR_PLANE)),
            "--decisions-listen",
            self.address(plane_name(name, DECISIONS_PLANE)),
            "--admin-listen",
            self.address(admin_name(name)),
            "--toxiproxy-api",
            self.address(TOXIPROXY),
        ]
        for kind in PARTICIPANTS:
            argv += [f"--{kind}", self.address(proxy_name(name, kind))]
        argv += ["--broker", self.broker_url(name)]
        if self.store == "postgres":
            argv += ["--store", self.store_dsn(name, COORDINATORS_DATABASE), "--replica", name]
        return argv

    def toxiproxy_config(self) -> list[dict[str, Any]]:
        """Toxiproxy's own `-config` file contents: the proxies created at start-up."""
        return [
            {
                "name": p.name,
                "listen": self.address(p.name),
                "upstream": self.address(p.upstream),
                "enabled": True,
            }
            for p in self.proxies
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "ports": dict(self.ports),
            "proxies": [{"name": p.name, "upstream": p.upstream} for p in self.proxies],
            "tls": self.tls,
            "store": self.store,
            "coordinators": self.coordinators,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layout:
        return cls(
            host=data["host"],
            ports=MappingProxyType({k: int(v) for k, v in data["ports"].items()}),
            proxies=tuple(ProxySpec(p["name"], p["upstream"]) for p in data["proxies"]),
            tls=bool(data.get("tls", False)),
            store=str(data.get("store", "sqlite")),
            coordinators=int(data.get("coordinators", 1)),
        )


_handed_out: set[int] = set()


STORED = "layout.json"


def stored(data_dir: Path) -> Layout | None:
    """The layout the mesh in `data_dir` was last started with (DATA_DIR/layout.json), if any."""
    path = data_dir / STORED
    if not path.exists():
        return None
    return Layout.from_json(json.loads(path.read_text()))


def ephemeral_range() -> tuple[int, int]:
    """The ports the OS gives outgoing connections (Linux's default if it cannot say)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now, never the same one twice in a process.

    Chosen outside the OS's ephemeral range, so that no outgoing connection can
    take it between now and the moment a server binds it.
    """
    low, high = ephemeral_range()
    candidates = [*range(10_000, low), *range(high + 1, 65_536)]
    for _ in range(1_000):
        port = random.choice(candidates) if candidates else 0
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            port = int(probe.getsockname()[1])
        _handed_out.add(port)
        return port
    raise OSError(f"no free port on {host}")


def free_layout(*, store: str = "sqlite", coordinators: int = 1) -> Layout:
    """The declared layout with every port moved to a free one: a mesh beside any other."""
    declared = load(environ={}, store=store, coordinators=coordinators)
    return load(
        environ={},
        overrides={name: free_port() for name in declared.ports},
        store=store,
        coordinators=coordinators,
    )


def replica_name(index: int) -> str:
    """The name of the coordinator numbered `index` from 0: coordinator, coordinator-2, ..."""
    return COORDINATOR if index == 0 else f"{COORDINATOR}-{index + 1}"


def env_name(name: str) -> str:
    """The variable overriding one port: a-to-b -> TRIPMESH_PORT_A_TO_B."""
    return "TRIPMESH_PORT_" + name.upper().replace("-", "_")


def admin_name(process: str) -> str:
    """The name of a process's admin HTTP port (metrics; the coordinator's operator page)."""
    return f"{process}-admin"


def plane_name(process: str, plane: str) -> str:
    """The name of one of a process's other gRPC listeners: coordinator-decisions."""
    return f"{process}-{plane}"


def proxy_name(source: str, target: str) -> str:
    return f"{source}-to-{target}"


def declared(declaration: Path = DECLARATION) -> tuple[dict[str, int], tuple[ProxySpec, ...]]:
    """The declared ports by name, and the proxies derived from who dials whom."""
    data = json.loads(declaration.read_text())
    processes: dict[str, Any] = data["processes"]
    ports: dict[str, int] = {name: int(spec["port"]) for name, spec in processes.items()}
    ports |= {
        plane_name(name, plane): int(port)
        for name, spec in processes.items()
        for plane, port in spec.get("planes", {}).items()
    }
    originals = {n: s for n, s in processes.items() if "replica_of" not in s}
    edges = [(CLIENT, target) for target in data["clients_dial"]]
    edges += [(name, target) for name, spec in originals.items() for target in spec["dials"]]
    # A server that is not ours says who dials it; its edges come after, so that adding one
    # moves no proxy already declared.
    edges += [
        (source, name) for name, spec in originals.items() for source in spec.get("dialled_by", [])
    ]
    # A replica's edges mirror its original's (clients, what it dials, who dials it, the
    # servers it uses), and come last of all.
    for name, spec in processes.items():
        if "replica_of" in spec:
            edges += [_mirror(edge, spec["replica_of"], name) for edge in list(edges)]
            edges = list(dict.fromkeys(edges))
    # "coordinator/decisions": the edge is named after the process, it leads to the plane.
    dialled = [(source, *target.partition("/")[::2]) for source, target in edges]
    unknown = sorted(
        f"{process}/{plane}" if plane else process
        for _, process, plane in dialled
        if (plane_name(process, plane) if plane else process) not in ports
    )
    if unknown:
        raise LayoutError(f"{declaration}: processes dial undeclared processes or planes {unknown}")
    proxies = tuple(
        ProxySpec(proxy_name(source, process), plane_name(process, plane) if plane else process)
        for source, process, plane in dialled
    )
    first = int(data["proxies"]["first_port"])
    ports |= {proxy.name: first + i for i, proxy in enumerate(proxies)}
    ports |= {
        admin_name(name): int(spec["admin"]) for name, spec in processes.items() if "admin" in spec
    }
    ports[TOXIPROXY] = int(data["toxiproxy_api"])
    return ports, proxies


def _mirror(edge: tuple[str, str], original: str, replica: str) -> tuple[str, str]:
    """`edge` with `original` (as source, or as target or one of its planes) made `replica`."""
    source, target = edge
    process, slash, plane = target.partition("/")
    if source == original:
        return replica, target
    if process == original:
        return source, replica + slash + plane
    return edge


def load(
    *,
    offset: int | None = None,
    overrides: Mapping[str, int] | None = None,
    environ: Mapping[str, str] | None = None,
    declaration: Path = DECLARATION,
    store: str = "sqlite",
    coordinators: int = 1,
) -> Layout:
    """The declared layout, moved by `offset` and then by per-port overrides, with the
    processes a mesh of `store` and `coordinators` runs (see `Layout._select`).

    Arguments win over the environment (TRIPMESH_PORT_OFFSET, TRIPMESH_PORT_<NAME>).
    Raises LayoutError for a clash, a port out of range or one in the ephemeral range.
    """
    env = os.environ if environ is None else environ
    ports_declared, proxies = declared(declaration)
    if offset is None:
        offset = _int(env.get("TRIPMESH_PORT_OFFSET", "0"), "TRIPMESH_PORT_OFFSET")
    ports = {name: port + offset for name, port in ports_declared.items()}
    for name in ports_declared:
        if env_name(name) in env:
            ports[name] = _int(env[env_name(name)], env_name(name))
    for name, port in (overrides or {}).items():
        if name not in ports_declared:
            raise LayoutError(f"no port named {name!r}; known: {sorted(ports_declared)}")
        ports[name] = port
    host = json.loads(declaration.read_text()).get("host", "127.0.0.1")
    selected = Layout(host, MappingProxyType(ports), proxies)._select(store, coordinators)
    # Only what this mesh runs must be free of clashes (a port moved onto one of a process
    # it does not run is fine).
    _check(selected.ports)
    return selected


def check_not_ephemeral(port: int, what: str) -> None:
    """Refuse a port the kernel may hand to an outgoing connection (see the module doc)."""
    low, high = ephemeral_range()
    if low <= port <= high:
        raise LayoutError(
            f"{what}: port {port} lies inside the kernel's ephemeral port range {low}-{high}"
            " (/proc/sys/net/ipv4/ip_local_port_range); an outgoing connection may take it"
            f" while the process is down. Choose a port below {low} or above {high}."
        )


def check_listen(address: str, what: str) -> None:
    """Refuse a server address whose port lies in the ephemeral range (port 0 and "" pass)."""
    if not address:
        return
    _, _, port = address.rpartition(":")
    number = _int(port, what)
    if number:
        check_not_ephemeral(number, f"{what} {address}")


def check_broker_url(url: str, what: str) -> None:
    """Refuse a broker address that is not nats://host:port."""
    host, _, port = url.removeprefix("nats://").rpartition(":")
    if not url.startswith("nats://") or not host or not port.isdigit():
        raise LayoutError(f"{what} {url!r}: expected nats://host:port")


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise LayoutError(f"{what}={text!r} is not a number") from None


def _check(ports: Mapping[str, int]) -> None:
    bad = {name: port for name, port in ports.items() if not 0 < port < 65536}
    if bad:
        raise LayoutError(f"ports out of range: {bad}")
    for name, port in ports.items():
        check_not_ephemeral(port, env_name(name))
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port in seen:
            raise LayoutError(f"port {port} given to both {seen[port]} and {name}")
        seen[port] = name
