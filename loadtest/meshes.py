"""Meshes to load: the one `make up` runs, or an isolated one on free ports with its own catalog.

An isolated mesh is the mesh exactly as `make up` starts it (supervisord,
Toxiproxy, every hop through a proxy), in its own data folder and on free
ports, so it never touches a running `make up`. Its services seed from one
catalog file given through TRIPMESH_CATALOG, which they inherit from
supervisord, which inherits it from us.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from tripmesh.mesh.layout import free_layout
from tripmesh.mesh.mesh import ROOT, Mesh


def running_mesh() -> Mesh | None:
    """The mesh `make up` started (in TRIPMESH_DATA_DIR, default .data), if it is up."""
    mesh = Mesh(ROOT / os.environ.get("TRIPMESH_DATA_DIR", ".data"))
    return mesh if mesh.running() else None


@contextlib.contextmanager
def environment(changes: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block (what supervisord and its programs inherit)."""
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def isolated_mesh(
    data_dir: Path,
    *,
    catalog: Path | None = None,
    env: Mapping[str, str] | None = None,
    store: str = "sqlite",
    coordinators: int = 1,
) -> Iterator[Mesh]:
    """Start a mesh in `data_dir` on free ports (its books and trip log in `store`, with
    `coordinators` coordinators); stop it (gracefully) when the block ends."""
    changes = dict(env or {})
    if catalog is not None:
        changes["TRIPMESH_CATALOG"] = str(catalog.resolve())
    mesh = Mesh(data_dir, free_layout(store=store, coordinators=coordinators))
    with environment(changes):
        mesh.up(timeout=90)
    try:
        yield mesh
    finally:
        mesh.down()
