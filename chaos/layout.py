"""Where everything listens: the mesh's processes, its proxies and their ports.

`chaos/proxies.json` is the one declaration: each process's default port and
one Toxiproxy proxy per edge, named after it (`coordinator-to-hotel`). A
`Layout` is that declaration with the ports actually used, which can be moved
all at once (`--port-offset`, or TRIPMESH_PORT_OFFSET) or one by one
(TRIPMESH_PORT_<NAME>, e.g. TRIPMESH_PORT_COORDINATOR_TO_HOTEL=61052), so that
a test can run a whole mesh beside a running `make up`.
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

from chaos.errors import ChaosError

DECLARATION = Path(__file__).with_name("proxies.json")
KINDS = ("flight", "hotel", "car")
TOXIPROXY = "toxiproxy"


class LayoutError(ChaosError):
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

    def address(self, name: str) -> str:
        """host:port of a process or a proxy."""
        return f"{self.host}:{self.ports[name]}"

    @property
    def processes(self) -> tuple[str, ...]:
        return ("coordinator", *KINDS)

    @property
    def client_address(self) -> str:
        """Where clients dial the coordinator: through its proxy."""
        return self.address("client-to-coordinator")

    def service_argv(self, kind: str) -> list[str]:
        """Flags of `python -m services.server KIND`: decisions go through its proxy."""
        return [
            kind,
            "--listen",
            self.address(kind),
            "--decisions",
            self.address(f"{kind}-to-coordinator"),
            "--metrics-listen",
            self.address(f"{kind}-metrics"),
        ]

    def coordinator_argv(self) -> list[str]:
        """Flags of `python -m coordinator.server`: it dials services only through proxies."""
        argv = [
            "--listen",
            self.address("coordinator"),
            "--admin-listen",
            self.address("coordinator-admin"),
        ]
        for kind in KINDS:
            argv += [f"--{kind}", self.address(f"coordinator-to-{kind}")]
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
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layout:
        return cls(
            host=data["host"],
            ports=MappingProxyType({k: int(v) for k, v in data["ports"].items()}),
            proxies=tuple(ProxySpec(p["name"], p["upstream"]) for p in data["proxies"]),
        )


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
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
    low, high = _ephemeral_range()
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


def free_layout() -> Layout:
    """The declared layout with every port moved to a free one: a mesh beside any other."""
    declared = load(environ={})
    return load(environ={}, overrides={name: free_port() for name in declared.ports})


def env_name(name: str) -> str:
    """The variable overriding one port: a-to-b -> TRIPMESH_PORT_A_TO_B."""
    return "TRIPMESH_PORT_" + name.upper().replace("-", "_")


def load(
    *,
    offset: int | None = None,
    overrides: Mapping[str, int] | None = None,
    environ: Mapping[str, str] | None = None,
    declaration: Path = DECLARATION,
) -> Layout:
    """The declared layout, moved by `offset` and then by per-port overrides.

    Arguments win over the environment (TRIPMESH_PORT_OFFSET, TRIPMESH_PORT_<NAME>).
    """
    env = os.environ if environ is None else environ
    data = json.loads(declaration.read_text())
    proxies = tuple(ProxySpec(p["name"], p["upstream"]) for p in data["proxies"])
    declared: dict[str, int] = {
        **data["processes"],
        **{p["name"]: p["listen"] for p in data["proxies"]},
        TOXIPROXY: data["toxiproxy_api"],
        **data.get("admin", {}),
    }
    unknown = {p.upstream for p in proxies} - set(data["processes"])
    if unknown:
        raise LayoutError(
            f"{declaration}: proxies forward to undeclared processes {sorted(unknown)}"
        )
    if offset is None:
        offset = _int(env.get("TRIPMESH_PORT_OFFSET", "0"), "TRIPMESH_PORT_OFFSET")
    ports = {name: port + offset for name, port in declared.items()}
    for name in declared:
        if env_name(name) in env:
            ports[name] = _int(env[env_name(name)], env_name(name))
    for name, port in (overrides or {}).items():
        if name not in declared:
            raise LayoutError(f"no port named {name!r}; known: {sorted(declared)}")
        ports[name] = port
    _check(ports)
    return Layout(data.get("host", "127.0.0.1"), MappingProxyType(ports), proxies)


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise LayoutError(f"{what}={text!r} is not a number") from None


def _check(ports: Mapping[str, int]) -> None:
    bad = {name: port for name, port in ports.items() if not 0 < port < 65536}
    if bad:
        raise LayoutError(f"ports out of range: {bad}")
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port in seen:
            raise LayoutError(f"port {port} given to both {seen[port]} and {name}")
        seen[port] = name
