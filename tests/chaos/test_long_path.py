"""A chaos run starts and audits in a folder whose path is long (its mesh's: 150-200 characters).

supervisord binds its control socket at the data folder's path plus ".<pid>";
past a unix socket's 107 bytes the socket moves to a short path in the temp folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from chaos.run import RunConfig, run
from chaos.scenarios import registry
from tests.procs import long_folder


def test_a_chaos_run_starts_in_a_folder_with_a_long_path(tmp_path: Path) -> None:
    runs_dir = long_folder(tmp_path, 120)
    outcome = run(RunConfig(registry()["baseline"], "saga", 3, 2.0, 100_000, 4, 30.0, runs_dir))
    mesh_dir = outcome.run_dir / "mesh"
    assert 150 <= len(str(mesh_dir)) <= 200, len(str(mesh_dir))
    assert outcome.status == 0 and outcome.verdict == "valid"
    assert json.loads((mesh_dir / "layout.json").read_text())["ports"]
