"""The mesh exactly as `make up` runs it, on free ports and in a temporary folder.

`make up` runs `python -m tripmesh.mesh up`; so do these fixtures, with every
port moved through TRIPMESH_PORT_<NAME> so that a mesh started by `make up`
on this machine is never touched. Teardown is `python -m tripmesh.mesh down`,
and it fails if any process it started is still alive afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.catalog import SeedResource, write_catalog_file
from tests.books import TODAY, Books
from tests.procs import ROOT, free_port
from tripmesh import PARTICIPANTS
from tripmesh.mesh import layout as layouts
from tripmesh.mesh.mesh import Mesh, MeshError, find_nats_server, find_toxiproxy
from tripmesh.mesh.supervise import pid_alive
from tripmesh.mesh.toxiproxy import Toxiproxy


@dataclass
class RunningMesh:
    """A mesh started by the launcher, with a client for its Toxiproxy and its books."""

    data_dir: Path
    env: dict[str, str]
    mesh: Mesh
    toxiproxy: Toxiproxy
    books: Books

    @property
    def client_address(self) -> str:
        return self.mesh.layout.client_address


def run_launcher(
    command: str, data_dir: Path, env: dict[str, str], *flags: str
) -> subprocess.CompletedProcess[str]:
    """`python -m tripmesh.mesh COMMAND --data-dir DATA_DIR`, as the Makefile runs it."""
    return subprocess.run(
        [sys.executable, "-m", "tripmesh.mesh", command, "--data-dir", str(data_dir), *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def isolated_env() -> dict[str, str]:
    """This environment with every mesh port moved to a free one."""
    try:
        find_toxiproxy()
        find_nats_server()
    except MeshError as exc:
        pytest.fail(f"{exc.message} (the e2e tests run a real Toxiproxy and a real broker)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPMESH_")}
    # Every port any mesh may use (a STORE=postgres one with the most coordinators too).
    widest = layouts.load(environ={}, store="postgres", coordinators=layouts.MAX_COORDINATORS)
    for name in widest.ports:
        env[layouts.env_name(name)] = str(free_port())
    for server in ("TRIPMESH_TOXIPROXY_SERVER", "TRIPMESH_NATS_SERVER"):
        if server in os.environ:
            env[server] = os.environ[server]
    return env


def start(data_dir: Path, env: dict[str, str], *flags: str) -> Mesh:
    """`up`, as `make up` does; the launcher stops what it started if this fails."""
    started = run_launcher("up", data_dir, env, *flags)
    assert started.returncode == 0, started.stdout + started.stderr
    return Mesh(data_dir)


def stop_and_check(mesh: Mesh, env: dict[str, str]) -> None:
    """Stop the mesh through the launcher; fail if any of its processes outlived it."""
    pids = mesh.pids() if mesh.running() else {}
    stopped = run_launcher("down", mesh.data_dir, env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    left = {name: pid for name, pid in pids.items() if pid_alive(pid)}
    assert not left, f"still running after down: {left}"
    assert not mesh.running()


@pytest.fixture(scope="session")
def running_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    data_dir = tmp_path_factory.mktemp("mesh")
    env = isolated_env()
    mesh = start(data_dir, env)
    lay = mesh.layout
    books = Books.open(lay.client_address, {k: lay.address(k) for k in PARTICIPANTS})
    toxiproxy = Toxiproxy(lay.host, lay.ports[layouts.TOXIPROXY])
    try:
        yield RunningMesh(data_dir, env, mesh, toxiproxy, books)
    finally:
        books.close()
        stop_and_check(mesh, env)


# A catalog of four: plenty of everything, and a car that is always sold out.
DOOMED_CATALOG = (
    SeedResource("FX", "flight", 10_000, 1_000),
    SeedResource("HX", "hotel", 10_000, 1_000),
    SeedResource("CX", "car", 10_000, 1_000),
    SeedResource("C-NONE", "car sold out", 10_000, 0),
)


@contextmanager
def doomed_catalog_mesh(folder: Path, **variables: str) -> Iterator[tuple[Mesh, Books]]:
    """A mesh as `make up` runs it, seeded with DOOMED_CATALOG for ten days, with these
    TRIPMESH_ variables for its processes; its books."""
    catalog = write_catalog_file(folder / "catalog.json", list(DOOMED_CATALOG), TODAY, 10)
    env = {**isolated_env(), "TRIPMESH_CATALOG": str(catalog), **variables}
    mesh = start(folder / "mesh", env)
    lay = mesh.layout
    books = Books.open(lay.client_address, {k: lay.address(k) for k in PARTICIPANTS})
    try:
        yield mesh, books
    finally:
        books.close()
        stop_and_check(mesh, env)
