"""`make load` and `make load-ui`: Locust against a mesh, reports in runs/load-<...>/.

    python -m loadtest.run --protocol saga --users 100 --duration 5m --shape black-friday
    python -m loadtest.run --ui            # Locust's web UI on http://127.0.0.1:8089

Which mesh (`--mesh`): `running` is the one `make up` started; `isolated`
starts one on free ports in the run folder, seeded with the peak catalog
(`loadtest.trips.peak_catalog`: the built-in routes with room for minutes of
load; the Black-Friday deal and the vans keep refusing), and stops it after;
`auto` (the default) uses the running one if there is one. `--target
HOST:PORT` skips all that and loads whatever listens there.

The run folder holds Locust's CSV files (locust_stats.csv, _history,
_failures, _exceptions), its HTML report (report.html), its output
(locust.log), the trips by outcome (trips.json) and every trip the
coordinator answered (history.jsonl), the audit (audit.json, books.json.gz)
and run.json (parameters, target, start and end times in UTC, to line up with
a chaos report, the failure ratio and the audit's verdict).

A run fails (exit 1) when more than --max-failure-ratio of its trips failed
(not booked, or not settled when the user gave up), or when the audit of the
mesh's books afterwards is not valid: the chaos lab's checker, run by
`python -m chaos.audit` on the mesh while it is still up, with the run's
history. A run against --target names no mesh folder, and is not audited.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from loadtest.meshes import isolated_mesh, running_mesh
from loadtest.progress import Progress, seconds
from loadtest.tally import judge, merge_tallies
from loadtest.trips import CHOICES, peak_catalog
from tripmesh.mesh.layout import free_port
from tripmesh.mesh.mesh import ROOT, stop_on_sigterm
from tripmesh.runtime import tls

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n")[0])
    p.add_argument("--protocol", choices=CHOICES, default="mixed")
    p.add_argument("--users", type=int, default=50, help="users (the peak, for black-friday)")
    p.add_argument("--spawn-rate", type=float, default=None, help="users started a second")
    p.add_argument("--duration", default="60s", help="Locust --run-time: 90s, 5m, ...")
    p.add_argument("--shape", choices=("steady", "black-friday"), default="steady")
    p.add_argument("--mesh", choices=("auto", "running", "isolated"), default="auto")
    p.add_argument("--target", help="HOST:PORT of a coordinator (its client proxy) to load")
    p.add_argument("--ui", action="store_true", help="Locust's web UI instead of a headless run")
    p.add_argument("--web-port", type=int, default=8089)
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="Locust's distributed mode: a master and this many worker processes (0: one"
        " process); the way load is spread over machines, here on this one",
    )
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    p.add_argument(
        "--max-failure-ratio",
        type=float,
        default=0.01,
        help="fail the run when more than this share of trips failed (default 0.01)",
    )
    p.add_argument("locust_args", nargs="*", help="more Locust options, after --")
    args = p.parse_args(argv)
    if args.workers < 0:
        p.error("--workers: must be 0 or more")
    if args.workers:
        args.master_port = free_port()  # where the workers find the master
    return args


@contextlib.contextmanager
def target(args: argparse.Namespace, folder: Path) -> Iterator[tuple[str, str, Path | None]]:
    """(address, description, data folder or None) of the coordinator to load, starting a
    mesh if need be."""
    if args.target:
        yield args.target, f"given target {args.target}", None
        return
    running = running_mesh() if args.mesh in ("auto", "running") else None
    if running is not None:
        if running.layout.tls:  # Locust (a child process) dials it with the client certificate
            os.environ["TRIPMESH_TLS_DIR"] = str(tls.folder_of(running.data_dir))
        yield (
            running.layout.client_address,
            f"the running mesh in {running.data_dir}",
            running.data_dir,
        )
        return
    if args.mesh == "running":
        raise SystemExit("no mesh is running: `make up` first, or --mesh isolated")
    catalog = peak_catalog(folder / "peak-catalog.json")
    print(f"starting an isolated mesh in {folder / 'mesh'} (peak catalog) ...", flush=True)
    with isolated_mesh(folder / "mesh", catalog=catalog) as mesh:
        yield (
            mesh.layout.client_address,
            f"an isolated mesh in {mesh.data_dir} (peak catalog)",
            mesh.data_dir,
        )
        print("stopping the isolated mesh ...", flush=True)


def locust_argv(args: argparse.Namespace, address: str, folder: Path) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--host",
        address,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate or max(1, args.users // 5)),
        "--protocol",
        args.protocol,
        "--shape",
        args.shape,
        "--csv",
        str(folder / "locust"),
        "--csv-full-history",
        "--html",
        str(folder / "report.html"),
        "--exit-code-on-error",
        "0",
        "--max-failure-ratio",
        str(args.max_failure_ratio),
    ]
    if args.workers:
        argv += [
            "--master",
            "--master-bind-host",
            "127.0.0.1",
            "--master-bind-port",
            str(args.master_port),
            "--expect-workers",
            str(args.workers),
        ]
    if args.ui:
        argv += ["--web-host", "127.0.0.1", "--web-port", str(args.web_port)]
        if args.duration:
            argv += ["--run-time", args.duration]
    else:
        argv += ["--headless", "--only-summary", "--run-time", args.duration]
    return argv + list(args.locust_args)


def worker_argv(args: argparse.Namespace, address: str) -> list[str]:
    """One Locust worker of a distributed run: it connects to the master on this machine
    (on others, --master-host would name the master's)."""
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--worker",
        "--master-host",
        "127.0.0.1",
        "--master-port",
        str(args.master_port),
        "--host",
        address,
        "--protocol",
        args.protocol,
        "--shape",
        args.shape,
        "--max-failure-ratio",
        str(args.max_failure_ratio),
        *args.locust_args,
    ]


def run_locust(
    command: list[str],
    log_path: Path,
    progress: Progress | None = None,
    workers: Sequence[list[str]] = (),
) -> int:
    """Run Locust (and its `workers`, each logging to log_path's folder), its output both
    printed and kept in `log_path`; its exit code, or the first failing worker's.
    `progress`: a live line on the terminal while it runs."""
    started: list[subprocess.Popen[bytes]] = []
    locust: subprocess.Popen[str] | None = None
    try:
        with log_path.open("w") as log, progress or contextlib.nullcontext():
            locust = subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for index, argv in enumerate(workers):
                with (log_path.parent / f"locust-worker-{index}.log").open("wb") as out:
                    started.append(
                        subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
                    )
            assert locust.stdout is not None
            try:
                for line in locust.stdout:
                    sys.stdout.write(line)
                    log.write(line)
            except KeyboardInterrupt:
                pass  # Locust got the same SIGINT: it stops and writes its reports
            code = locust.wait()
        for worker in started:  # the master told them to quit when it did
            try:
                worker_code = worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker_code = worker.wait()
            code = code or worker_code
        return code
    finally:
        if locust is not None and locust.poll() is None:  # this process is being stopped
            locust.terminate()
            locust.wait()
        for worker in started:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()  # killed, it still stops Locust and an isolated mesh
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    mode = "ui" if args.ui else args.shape
    folder = args.runs_dir / f"load-{mode}-{args.protocol}-{stamp}"
    folder.mkdir(parents=True, exist_ok=True)
    with target(args, folder) as (address, described, data_dir):
        command = locust_argv(args, address, folder)
        print(f"load: {described}, coordinator at {address}; reports in {folder}", flush=True)
        if args.ui:
            print(f"Locust's web UI: http://127.0.0.1:{args.web_port} (Ctrl-C to stop)", flush=True)
        started = time.time()
        os.environ["TRIPMESH_LOAD_OUT"] = str(folder)  # trips.json and history.jsonl
        live = None if args.ui else Progress(folder / "history.jsonl", seconds(args.duration))
        workers = [worker_argv(args, address) for _ in range(args.workers)]
        code = run_locust(command, folder / "locust.log", live, workers)
        finished = time.time()
        if args.workers:
            code = judge_workers(folder, args.max_failure_ratio) or code
        audit = audit_books(data_dir, folder)
        record = {
            "workers": args.workers,
            "protocol": args.protocol,
            "shape": args.shape,
            "users": args.users,
            "duration": args.duration,
            "target": address,
            "mesh": described,
            "started_at": started,
            "finished_at": finished,
            "locust_exit_code": code,
            "trips": _read_json(folder / "trips.json"),
            "audit": audit,
            "command": command,
        }
        (folder / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"reports: {folder}/locust_stats.csv, {folder}/report.html, {folder}/run.json")
    failed = code != 0 or audit["verdict"] not in ("valid", "not audited")
    if failed:
        print(
            f"load run FAILED: Locust exit {code} (1: failure ratio over"
            f" {args.max_failure_ratio}), audit {audit['verdict']}"
        )
    return 1 if failed else 0


def judge_workers(folder: Path, limit: float) -> int:
    """A distributed run's trips: the workers' tallies merged into trips.json, printed and
    judged by the failure ratio (1 above it); 1 if a worker wrote none."""
    tallies = sorted(folder.glob("tally-*.json"))
    summary = judge(merge_tallies(tallies).summary(), limit)
    summary["workers"] = len(tallies)
    (folder / "trips.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["passed"] and tallies else 1


def audit_books(data_dir: Path | None, folder: Path) -> dict[str, object]:
    """The chaos checker's audit of the mesh's books (a subprocess: loadtest does not import
    the lab); its verdict."""
    if data_dir is None:
        print("audit: skipped (--target names no mesh folder to read the books from)")
        return {"verdict": "not audited"}
    command = [
        sys.executable,
        "-m",
        "chaos.audit",
        "--data-dir",
        str(data_dir),
        "--history",
        str(folder / "history.jsonl"),
        "--out",
        str(folder),
    ]
    done = subprocess.run(command, cwd=ROOT, text=True, capture_output=True, check=False)
    sys.stdout.write(done.stdout + done.stderr)
    found = _read_json(folder / "audit.json")
    if not isinstance(found, dict):
        return {"verdict": "unknown", "detail": (done.stdout + done.stderr)[-500:]}
    return {"verdict": found.get("verdict", "unknown"), "exit_code": done.returncode}


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
