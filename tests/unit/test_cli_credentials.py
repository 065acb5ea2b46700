"""Which credentials the CLI dials with: TLS only for the mesh its data folder describes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from coordinator import cli
from tripmesh.mesh import layout as layouts


def _store(data_dir: Path, lay: layouts.Layout, *, tls: bool) -> None:
    (data_dir / layouts.STORED).write_text(json.dumps({**lay.to_json(), "tls": tls}))


def test_a_mesh_elsewhere_is_dialled_in_plaintext_even_beside_a_tls_mesh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIPMESH_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TRIPMESH_TLS_DIR", raising=False)
    for name in [n for n in os.environ if n.startswith("TRIPMESH_PORT_")]:
        monkeypatch.delenv(name)
    lay = layouts.free_layout()
    _store(tmp_path, lay, tls=True)
    elsewhere = max(lay.ports.values()) + 1
    assert cli._credentials(f"127.0.0.1:{elsewhere}") is None
    # The mesh that folder describes is dialled with its client certificate (none was
    # made here: loading it fails, which shows TLS was chosen).
    with pytest.raises(OSError):
        cli._credentials(lay.client_address)
    _store(tmp_path, lay, tls=False)
    assert cli._credentials(lay.client_address) is None
