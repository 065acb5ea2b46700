"""The mesh launcher: `python -m tripmesh.mesh up|down|status|logs|reset`.

`up` starts Toxiproxy, the three services and the coordinator under
supervisord and returns once every one of them is SERVING; `down` stops them
gracefully (SIGTERM: health goes NOT_SERVING, in-flight RPCs finish) and
checks that none is left; `status` shows each process and proxy; `logs`
prints (or `-f` follows) their logs; `reset` stops, wipes the databases and
logs, and starts again (the catalog is reseeded).

Every command takes:

| option | variable | default | meaning |
|---|---|---|---|
| --data-dir | TRIPMESH_DATA_DIR | .data (in the repo) | databases, logs, supervisord socket |
| --port-offset | TRIPMESH_PORT_OFFSET | 0 | added to every port in tripmesh/mesh/processes.json |
| --tls (up, reset) | | off | mTLS on every gRPC hop, with a local CA and certificates made in DATA_DIR/secrets/tls (`make up TLS=1`) |
| | TRIPMESH_PORT_<NAME> | | one port, e.g. TRIPMESH_PORT_COORDINATOR_TO_HOTEL |
| | TRIPMESH_TOXIPROXY_SERVER | .bin/toxiproxy-server, else on PATH | the Toxiproxy binary |

`status`, `logs` and `down` use the ports the folder's mesh was started with.
The services and the coordinator inherit the environment `up` runs in, so
their own TRIPMESH_* variables (default protocol, timeouts) apply.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tripmesh import PARTICIPANTS
from tripmesh.mesh import layout as layouts
from tripmesh.mesh.errors import MeshError
from tripmesh.mesh.layout import TOXIPROXY, LayoutError
from tripmesh.mesh.mesh import ROOT, SERVING, Mesh, order
from tripmesh.mesh.supervise import SupervisorError
from tripmesh.mesh.toxiproxy import ToxiproxyError
from tripmesh.runtime import auth, tls


def describe(mesh: Mesh) -> str:
    """Endpoints, and one booking to copy and paste."""
    lay = mesh.layout
    lines = ["Every hop goes through Toxiproxy (edge: listen -> upstream):"]
    for proxy in lay.proxies:
        target = f"{proxy.upstream} {lay.address(proxy.upstream)}"
        lines.append(f"  {proxy.name:23} {lay.address(proxy.name):17} -> {target}")
    lines.append("")
    lines.append(f"  clients (gRPC)          {lay.client_address}")
    if lay.store == "postgres":
        lines.append(
            f"  PostgreSQL              {lay.address(layouts.POSTGRES)} (databases"
            f" {', '.join(PARTICIPANTS)}, {layouts.COORDINATORS_DATABASE}; data in"
            f" {_shown(mesh.data_dir / layouts.POSTGRES)}/)"
        )
    lines.append(
        f"  operators (gRPC)        {lay.operator_address} (Operator, with the token below)"
    )
    admin = layouts.admin_name("coordinator")
    if admin in lay.ports:
        lines.append(f"  operator page           http://{lay.address(admin)}/")
    for process in mesh.order:
        name = layouts.admin_name(process)
        if name in lay.ports:
            lines.append(f"  metrics, {process:14} http://{lay.address(name)}/metrics")
    lines.append(f"  Toxiproxy API           http://{lay.address(TOXIPROXY)}/proxies")
    lines.append("                          (or: .venv/bin/tripmesh fault list|cut|slow|heal)")
    lines.append(f"  data and logs           {_shown(mesh.data_dir)}/")
    secrets = mesh.data_dir / auth.SECRETS
    lines.append(f"  operator token          {_shown(secrets / auth.OPERATOR_TOKEN)} (owner-only)")
    if lay.tls:
        lines.append(
            f"  TLS (every gRPC hop)    CA and certificates in {_shown(tls.folder_of(mesh.data_dir))}/"
        )
    day = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=14)).isoformat()
    key = "demo-" + dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    request = {
        "idempotency_key": key,
        "customer_id": "demo",
        "protocol": "PROTOCOL_SAGA",
        "flight": {"flight_id": "JL5", "date": day, "seats": 1},
        "hotel": {"hotel_id": "TOKYO-GRAND", "check_in": day, "nights": 3, "rooms": 1},
        "car": {"car_id": "CAMRY-NRT", "pickup_date": day, "days": 3, "cars": 1},
    }
    flag = (
        "" if replace(lay, tls=False) == layouts.load() else f" --coordinator {lay.client_address}"
    )
    if lay.tls:
        certificates = tls.folder_of(mesh.data_dir)
        security = (
            f"-cacert {_shown(certificates / 'ca.pem')} -cert {_shown(certificates / 'client.pem')}"
            f" -key {_shown(certificates / 'client.key')}"
        )
    else:
        security = "-plaintext"
    lines += [
        "",
        "Book a trip (saga; PROTOCOL_TWO_PHASE_COMMIT / --protocol 2pc for 2PC):",
        f"  .venv/bin/tripmesh{flag} book --protocol saga",
        f"  grpcurl {security} -d '{json.dumps(request)}' \\",
        # grpcurl dials one address: the first coordinator's.
        f"    {lay.client_address.split(',')[0]} tripmesh.v1.Coordinator/BookTrip",
    ]
    return "\n".join(lines)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _up(mesh: Mesh, args: argparse.Namespace) -> int:
    if args.layout != mesh.layout:
        print(
            f"note: the mesh in {_shown(mesh.data_dir)} keeps the ports and TLS setting it was started with"
        )
    started = time.monotonic()
    if not mesh.up(timeout=args.timeout):
        print(f"tripmesh is already up and SERVING ({_shown(mesh.data_dir)}).")
    else:
        print(f"tripmesh is up: every process SERVING after {time.monotonic() - started:.1f}s.")
    print(describe(mesh))
    return 0


def _down(mesh: Mesh, args: argparse.Namespace) -> int:
    if mesh.down(timeout=args.timeout):
        print("tripmesh is down: every process stopped (SIGTERM, then drained); none left.")
    else:
        print(f"tripmesh is not running ({_shown(mesh.data_dir)}).")
    return 0


def _status(mesh: Mesh, args: argparse.Namespace) -> int:
    if not mesh.running():
        print(f"tripmesh is not running ({_shown(mesh.data_dir)}).")
        return 3
    healthy = True
    processes = mesh.supervisor.processes()
    print(f"{'process':12} {'state':9} {'pid':>7}  {'health':12} address")
    for name in mesh.order:
        info = processes[name]
        health = mesh.health(name) if info.state == "RUNNING" else "-"
        healthy &= health == SERVING
        address = mesh.layout.address(name)
        print(f"{name:12} {info.state:9} {info.pid or '-':>7}  {health:12} {address}")
    try:
        proxies = mesh.toxiproxy.proxies()
    except ToxiproxyError as exc:
        print(f"\nToxiproxy API: {exc.message}")
        return 1
    print(f"\n{'proxy':23} {'enabled':7} {'listen':17} toxics")
    for spec in mesh.layout.proxies:
        proxy = proxies.get(spec.name)
        if proxy is None:
            print(f"{spec.name:23} MISSING")
            healthy = False
            continue
        toxics = ", ".join(f"{t.name}({t.type})" for t in proxy.toxics) or "-"
        print(f"{spec.name:23} {str(proxy.enabled).lower():7} {proxy.listen:17} {toxics}")
    return 0 if healthy else 1


def _logs(mesh: Mesh, args: argparse.Namespace) -> int:
    names = args.names or list(LOGS)
    if args.follow:
        paths = [str(mesh.log_path(n)) for n in names]
        os.execvp("tail", ["tail", "-n", str(args.lines), "-F", *paths])
    for name in names:
        print(f"==> {_shown(mesh.log_path(name))} <==\n{mesh.tail(name, args.lines)}\n")
    return 0


def _reset(mesh: Mesh, args: argparse.Namespace) -> int:
    if mesh.down(timeout=args.timeout):
        print("stopped the mesh")
    mesh.wipe()
    print(f"wiped databases and logs in {_shown(mesh.data_dir)}; starting again (reseeds)")
    mesh = Mesh(mesh.data_dir, args.layout)
    return _up(mesh, args)


# Every process any mesh may run (a STORE=postgres one, with several coordinators too).
LOGS = (
    *order(layouts.load(store="postgres", coordinators=layouts.MAX_COORDINATORS)),
    "supervisord",
)
COMMANDS = {"up": _up, "down": _down, "status": _status, "logs": _logs, "reset": _reset}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("TRIPMESH_DATA_DIR", ROOT / ".data")),
        help="databases, logs and supervisord's socket (default: .data)",
    )
    common.add_argument("--port-offset", type=int, default=None, help="added to every port")
    common.add_argument("--timeout", type=float, default=90.0, help="seconds to wait (up, down)")
    parser = argparse.ArgumentParser(
        prog="python -m tripmesh.mesh", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    helps = {
        "up": "start what is not running; return when every process is SERVING",
        "down": "stop every process gracefully and check none is left",
        "status": "each process and each proxy (exit 3: not running, 1: unhealthy)",
        "reset": "stop, wipe the databases and logs, start again",
    }
    for name, text in helps.items():
        command = commands.add_parser(name, parents=[common], help=text, description=text)
        if name in ("up", "reset"):
            command.add_argument(
                "--tls",
                action="store_true",
                help="mTLS on every gRPC hop (a local CA and certificates in DATA_DIR/secrets/tls)",
            )
            command.add_argument(
                "--store",
                choices=layouts.STORES,
                default="sqlite",
                help="where the books and the trip log are: a SQLite file each (default), or"
                " databases on a PostgreSQL server the mesh runs",
            )
            command.add_argument(
                "--coordinators",
                type=int,
                default=1,
                help="how many coordinators serve, sharing the trip log (more than one needs"
                " --store postgres)",
            )
    logs = commands.add_parser("logs", parents=[common], help="print or follow the logs")
    logs.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(LOGS)}")
    logs.add_argument("-n", "--lines", type=int, default=40, help="lines of each (default 40)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing (tail -F)")
    args = parser.parse_args(argv)
    unknown = set(getattr(args, "names", ())) - set(LOGS)
    if unknown:
        parser.error(f"no log named {', '.join(sorted(unknown))}; choose from {', '.join(LOGS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors are printed as one line and exit 1."""
    args = parse_args(argv)
    try:
        store: str = getattr(args, "store", "sqlite")
        coordinators: int = getattr(args, "coordinators", 1)
        tls_on = getattr(args, "tls", False)
        if tls_on and (store, coordinators) != ("sqlite", 1):
            raise LayoutError(
                "TLS=1 is built for one coordinator on SQLite; STORE=postgres and COORDINATORS"
                " run in plaintext for now"
            )
        args.layout = replace(
            layouts.load(offset=args.port_offset, store=store, coordinators=coordinators),
            tls=tls_on,
        )
        # Commands other than `up` follow the ports the folder's mesh was started with.
        mesh = Mesh(args.data_dir, args.layout if args.command in ("up", "reset") else None)
        return COMMANDS[args.command](mesh, args)
    except (MeshError, SupervisorError, LayoutError, ToxiproxyError) as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Output piped into `head`: stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
