"""A chaos run killed with SIGTERM (a CI job's time-out, `kill`) stops its own mesh.

Before, SIGTERM ended `python -m chaos.run` without running its `finally`: its
supervisord, Toxiproxy, broker (and PostgreSQL) kept running, ports held, until
someone found them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.procs import ROOT
from tripmesh.mesh.mesh import Mesh
from tripmesh.mesh.supervise import pid_alive


def test_a_chaos_run_stopped_with_sigterm_stops_its_mesh(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "chaos.run", "baseline", "--protocol", "saga"]
    command += ["--duration", "60", "--seed", "3", "--runs-dir", str(runs)]
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        # Under way: its mesh serves and its clients have written some history.
        while not any(p.stat().st_size for p in runs.glob("*/history.jsonl")):
            assert run.poll() is None, run.communicate()[0].decode()[-2000:]
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.2)
        pids = Mesh(next(runs.glob("*/mesh"))).pids()  # supervisord and every program
        assert all(pid_alive(pid) for pid in pids.values()), pids
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 128 + signal.SIGTERM, output.decode()[-2000:]
    left = {name: pid for name, pid in pids.items() if pid_alive(pid)}
    assert not left, f"still running after SIGTERM: {left}"
