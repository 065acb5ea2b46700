"""`make load-chaos`: a Locust load test against the mesh of a running chaos scenario.

    python -m loadtest.chaosload SCENARIO --protocol saga --users 30 --duration 60

Starts `python -m chaos.run SCENARIO` (issue 4's runner: its own mesh, its
own workload, its faults, then settle, audit and report) with its run folder
inside ours, waits until that mesh answers through its client proxy, and runs
Locust against it for the rest of the scenario's traffic window, so the two
reports cover the same wall-clock time (both record start and end in UTC
seconds). Locust's trips land in the books the chaos checker audits: its
book-wide checks (all or nothing, conservation, no leaks) cover them too.
The chaos catalog puts fewer days on sale, so Locust books within them.

Exit status: the chaos run's (0 valid, 1 a violation, 2 undecided).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from loadtest import run as load
from loadtest.trips import CHOICES
from tripmesh.mesh.layout import Layout
from tripmesh.mesh.mesh import ROOT, SERVING, grpc_health, stop_on_sigterm

LAST_OFFSET = 25  # chaos runs put 30 days on sale; trips last up to 4 nights


def _wait_for_mesh(folder: Path, chaos: subprocess.Popen[bytes], timeout: float) -> Layout:
    """The layout of the chaos run's mesh, once its coordinator answers through its proxy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if chaos.poll() is not None:
            raise SystemExit(
                f"the chaos run ended before its mesh was up (exit {chaos.returncode})"
            )
        for found in folder.glob("*/mesh/layout.json"):
            layout = Layout.from_json(json.loads(found.read_text()))
            if grpc_health(layout.client_address) == SERVING:
                return layout
        time.sleep(0.2)
    raise SystemExit(f"no chaos mesh SERVING within {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.chaosload")
    p.add_argument("scenario")
    p.add_argument("--protocol", choices=CHOICES, default="saga")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of chaos traffic")
    p.add_argument("--shape", choices=("steady", "black-friday"), default="steady")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    args = p.parse_args(argv)
    stop_on_sigterm()  # killed, it stops the chaos run, which stops its mesh
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    folder = args.runs_dir / f"load-chaos-{args.scenario}-{args.protocol}-{stamp}"
    folder.mkdir(parents=True)
    chaos_argv = [sys.executable, "-m", "chaos.run", args.scenario, "--protocol", args.protocol]
    chaos_argv += ["--seed", str(args.seed), "--duration", str(args.duration)]
    chaos_argv += ["--runs-dir", str(folder / "chaos")]
    print(f"load-chaos: {' '.join(chaos_argv[1:])}; reports in {folder}", flush=True)
    chaos = subprocess.Popen(chaos_argv, cwd=ROOT)
    try:
        layout = _wait_for_mesh(folder / "chaos", chaos, timeout=120)
        began = time.time()
        # Stop before the scenario's traffic does, so Locust's trips settle with the rest.
        seconds = max(5, int(args.duration - 2))
        options = load.parse_args(
            ["--protocol", args.protocol, "--users", str(args.users), "--shape", args.shape]
            + ["--duration", f"{seconds}s", "--target", layout.client_address]
        )
        command = load.locust_argv(options, layout.client_address, folder)
        command += ["--last-offset", str(LAST_OFFSET), "--seed", str(args.seed)]
        os.environ["TRIPMESH_LOAD_OUT"] = str(folder)  # trips.json and history.jsonl
        code = load.run_locust(command, folder / "locust.log")
        ended = time.time()
        status = chaos.wait()
    finally:
        if chaos.poll() is None:  # this process is being stopped: so is the chaos run
            chaos.terminate()
            chaos.wait()
    record = {
        "scenario": args.scenario,
        "protocol": args.protocol,
        "locust": {"started_at": began, "finished_at": ended, "exit_code": code},
        "chaos": {"exit_code": status, "runs": [str(d) for d in (folder / "chaos").iterdir()]},
        "target": layout.client_address,
    }
    (folder / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"load-chaos: Locust reports in {folder}; the chaos report in {folder / 'chaos'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
