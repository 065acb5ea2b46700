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
    assert len(names) == 1 + 2 * len(PARTICIPANTS)
    assert all(lay.ports[p.name] != lay.ports[p.upstream] for p in lay.proxies)
    assert len(set(lay.ports.values())) == len(lay.ports)


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
