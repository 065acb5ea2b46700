"""The layout shows the architecture: what each folder holds and may import, and the mesh's ports."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from tripmesh import PARTICIPANTS
from tripmesh.mesh import layout as layouts
from tripmesh.mesh.supervise import MAX_SOCKET_PATH, socket_path

ROOT = Path(__file__).resolve().parents[2]
# Each top-level package, and the packages it must never import (README, "Where things are").
FORBIDDEN = {
    "tripmesh": {"services", "coordinator", "chaos", "loadtest", "tests"},
    "services": {"coordinator", "chaos", "loadtest", "tests"},
    "coordinator": {"services", "chaos", "loadtest", "tests"},
    "loadtest": {"coordinator", "chaos", "tests"},
    "chaos": {"coordinator", "loadtest", "tests"},
}


def _imports(path: Path) -> set[str]:
    """The top-level packages a module imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def _modules(folder: str) -> list[Path]:
    return [p for p in (ROOT / folder).rglob("*.py") if "_pb2" not in p.name]


def test_protos_holds_only_the_contract() -> None:
    listed = subprocess.run(
        ["git", "ls-files", "protos"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert listed, "git lists nothing under protos/"
    assert [p for p in listed if not p.endswith(".proto")] == []
    assert not [p for p in (ROOT / "protos").rglob("*.py")]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_folder_imports_only_what_it_may(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in _modules(package)
    }
    assert {k: v for k, v in wrong.items() if v} == {}


def test_only_the_chaos_lab_and_its_tests_import_it() -> None:
    outside = [
        str(path.relative_to(ROOT))
        for folder in ("tripmesh", "services", "coordinator", "loadtest", "tests")
        for path in _modules(folder)
        if "chaos" in _imports(path) and not path.is_relative_to(ROOT / "tests" / "chaos")
    ]
    assert outside == []


def test_proxies_are_derived_from_who_dials_whom() -> None:
    lay = layouts.load(environ={})
    names = [p.name for p in lay.proxies]
    assert names[0] == "client-to-coordinator"
    assert {f"coordinator-to-{k}" for k in PARTICIPANTS} <= set(names)
    assert {f"{k}-to-coordinator" for k in PARTICIPANTS} <= set(names)
    # Everyone who speaks to the broker does so through a proxy of its own, declared last.
    to_broker = [f"{k}-to-broker" for k in (layouts.COORDINATOR, *PARTICIPANTS)]
    assert names[-len(to_broker) :] == to_broker
    assert len(names) == 1 + 2 * len(PARTICIPANTS) + len(to_broker)
    assert all(lay.ports[p.name] != lay.ports[p.upstream] for p in lay.proxies)
    assert len(set(lay.ports.values())) == len(lay.ports)


def test_adding_the_broker_moved_no_proxy_declared_before_it() -> None:
    lay = layouts.load(environ={})
    assert [lay.ports[n] for n in ("client-to-coordinator", "coordinator-to-car",
                                   "flight-to-coordinator", "car-to-coordinator")] == [
        16050, 16053, 16054, 16056
    ]  # fmt: skip
    assert lay.broker_url("hotel") == f"nats://127.0.0.1:{lay.ports['hotel-to-broker']}"
    argv = lay.broker_argv(Path("/data"))
    assert argv[argv.index("--store_dir") + 1] == "/data/broker" and "--jetstream" in argv
    assert argv[argv.index("--port") + 1] == str(lay.ports[layouts.BROKER])
    assert lay.service_argv("car")[-2:] == ["--broker", lay.broker_url("car")]


def test_a_postgres_mesh_adds_a_proxy_per_database_connection_and_moves_none() -> None:
    plain = layouts.load(environ={})
    lay = layouts.load(environ={}, store="postgres", coordinators=2)
    # Every proxy of the plain mesh keeps its port; the new ones come after them all.
    assert {p.name: lay.ports[p.name] for p in plain.proxies} == {
        p.name: plain.ports[p.name] for p in plain.proxies
    }
    assert lay.proxies[: len(plain.proxies)] == plain.proxies
    upstreams = {p.name: p.upstream for p in lay.proxies[len(plain.proxies) :]}
    assert {n for n, up in upstreams.items() if up == layouts.POSTGRES} == {
        f"{s}-to-postgres" for s in (*PARTICIPANTS, "coordinator", "coordinator-2")
    }
    # The replica mirrors the coordinator: clients, what it dials, its decisions, the broker.
    assert upstreams["client-to-coordinator-2"] == "coordinator-2"
    assert {upstreams[f"coordinator-2-to-{k}"] for k in PARTICIPANTS} == set(PARTICIPANTS)
    assert {upstreams[f"{k}-to-coordinator-2"] for k in PARTICIPANTS} == {"coordinator-2-decisions"}
    assert upstreams["coordinator-2-to-broker"] == layouts.BROKER
    assert "coordinator-3" not in lay.ports and "coordinator-3" not in plain.ports
    assert layouts.POSTGRES not in plain.ports
    assert len(set(lay.ports.values())) == len(lay.ports)


def test_each_coordinator_and_service_is_told_about_the_others_and_the_database() -> None:
    lay = layouts.load(environ={}, store="postgres", coordinators=2)
    assert lay.client_address == ",".join(
        lay.address(f"client-to-{c}") for c in ("coordinator", "coordinator-2")
    )
    flags = lay.service_argv("hotel")
    assert flags[flags.index("--decisions") + 1] == ",".join(
        lay.address(f"hotel-to-{c}") for c in ("coordinator", "coordinator-2")
    )
    store = flags[flags.index("--store") + 1]
    assert store == f"postgresql://tripmesh@{lay.address('hotel-to-postgres')}/hotel"
    argv = lay.coordinator_argv("coordinator-2")
    flag = {argv[i]: argv[i + 1] for i in range(0, len(argv), 2)}
    assert flag["--listen"] == lay.address("coordinator-2")
    assert flag["--decisions-listen"] == lay.address("coordinator-2-decisions")
    assert flag["--flight"] == lay.address("coordinator-2-to-flight")
    assert flag["--replica"] == "coordinator-2"
    assert flag["--store"].endswith(f"{lay.address('coordinator-2-to-postgres')}/coordinators")
    # SQLite: nothing of the kind.
    plain = layouts.load(environ={})
    assert (
        "--store" not in plain.service_argv("hotel") and "--store" not in plain.coordinator_argv()
    )


@pytest.mark.parametrize(
    ("store", "coordinators", "message"),
    [
        ("sqlite", 2, "needs STORE=postgres"),
        ("postgres", 4, "between 1 and 3"),
        ("postgres", 0, "between 1 and 3"),
        ("mysql", 1, "expected one of sqlite, postgres"),
    ],
)
def test_a_mesh_that_cannot_be_is_refused_saying_why(
    store: str, coordinators: int, message: str
) -> None:
    with pytest.raises(layouts.LayoutError, match=message):
        layouts.load(environ={}, store=store, coordinators=coordinators)


@pytest.mark.parametrize("url", ["127.0.0.1:4222", "nats://:4222", "nats://host", "http://h:1"])
def test_a_broker_address_that_is_not_nats_host_port_is_refused(url: str) -> None:
    with pytest.raises(layouts.LayoutError, match="expected nats://host:port"):
        layouts.check_broker_url(url, "--broker")


def test_participants_reach_only_the_coordinators_decisions_plane() -> None:
    lay = layouts.load(environ={})
    decisions = layouts.plane_name(layouts.COORDINATOR, layouts.DECISIONS_PLANE)
    upstreams = {p.name: p.upstream for p in lay.proxies}
    assert {upstreams[f"{k}-to-coordinator"] for k in PARTICIPANTS} == {decisions}
    assert upstreams["client-to-coordinator"] == layouts.COORDINATOR
    argv = lay.coordinator_argv()
    planes = {argv[i]: argv[i + 1] for i in range(0, len(argv), 2)}
    listening = [planes["--listen"], planes["--operator-listen"], planes["--decisions-listen"]]
    assert len(set(listening)) == 3
    assert planes["--decisions-listen"] == lay.address(decisions)


def test_a_dial_to_an_undeclared_plane_is_refused(tmp_path: Path) -> None:
    text = (
        (layouts.DECLARATION).read_text().replace('"coordinator/decisions"', '"coordinator/x"', 1)
    )
    (tmp_path / "processes.json").write_text(text)
    with pytest.raises(layouts.LayoutError, match="coordinator/x"):
        layouts.load(environ={}, declaration=tmp_path / "processes.json")


def test_every_default_port_lies_outside_the_ephemeral_range() -> None:
    low, high = layouts.ephemeral_range()
    lay = layouts.load(environ={})
    assert {n: p for n, p in lay.ports.items() if low <= p <= high} == {}


def test_a_port_inside_the_ephemeral_range_is_refused_by_name() -> None:
    low, high = layouts.ephemeral_range()
    with pytest.raises(layouts.LayoutError) as refused:
        layouts.load(environ={"TRIPMESH_PORT_COORDINATOR_TO_HOTEL": str(low + 5)})
    assert "TRIPMESH_PORT_COORDINATOR_TO_HOTEL" in refused.value.message
    assert f"{low}-{high}" in refused.value.message
    with pytest.raises(layouts.LayoutError):
        layouts.load(environ={}, offset=low - 15_000)  # moves every port into the range
    with pytest.raises(layouts.LayoutError, match="--listen"):
        layouts.check_listen(f"127.0.0.1:{high}", "--listen")
    layouts.check_listen("127.0.0.1:0", "--listen")  # the OS's choice: allowed
    layouts.check_listen(f"127.0.0.1:{low - 1}", "--listen")


@pytest.mark.parametrize("length", [20, 90, 100, 150, 200])
def test_supervisords_socket_path_always_fits(tmp_path: Path, length: int) -> None:
    folder = Path("/" + "d" * (length - 1))
    path = socket_path(folder)
    # supervisord binds PATH.<pid> first: that name too must fit in 107 bytes.
    assert len(str(path)) + len(".4194304") <= 107
    assert len(str(path)) <= MAX_SOCKET_PATH
    if len(str(folder / "supervisord.sock")) <= MAX_SOCKET_PATH:
        assert path == folder / "supervisord.sock"


@pytest.mark.parametrize(
    "argv",
    [
        ["coordinator.server", "--broker", "localhost:4222"],
        ["services.server", "car", "--broker", "nats://car-broker"],
    ],
)
def test_the_servers_refuse_a_broker_that_is_not_nats_host_port(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from coordinator.server import CoordinatorConfig
    from services.server import ServiceConfig

    parse = (
        CoordinatorConfig.from_args if argv[0] == "coordinator.server" else ServiceConfig.from_args
    )
    with pytest.raises(SystemExit) as exit_:
        parse(argv[1:])
    assert exit_.value.code == 2
    assert f"--broker {argv[-1]!r}: expected nats://host:port" in capsys.readouterr().err


def test_the_servers_dial_the_broker_through_their_own_proxy_by_default() -> None:
    from coordinator.server import CoordinatorConfig
    from services.server import ServiceConfig

    lay = layouts.load(environ={})
    assert ServiceConfig.from_args(["hotel"]).broker == lay.broker_url("hotel")
    assert CoordinatorConfig.from_args([]).broker == lay.broker_url(layouts.COORDINATOR)
