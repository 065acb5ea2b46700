"""Run a chaos scenario: traffic and faults, heal, settle, audit, report.

    python -m chaos.run SCENARIO --protocol 2pc|3pc|saga|saga-lock|mixed [--seed N] [--duration S]

Each run starts its own mesh (on free ports, in its run folder under
runs/chaos/), so it never touches a mesh started by `make up`. The exit status
is 0 when every check is valid, 1 when any invariant is violated, 2 when a
check could not decide.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import json
import logging
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.live import Live

from chaos import audit, checker
from chaos.audit import read_books, save_books
from chaos.checker import BooksSnapshot, CheckResult
from chaos.history import HistoryWriter, read_history
from chaos.nemesis import Fault, Nemesis, Window
from chaos.scenarios import Scenario, registry
from chaos.workload import Catalog, ClientSettings, Planned, generate, run_clients
from services import car, flight, hotel
from services.catalog import write_catalog_file
from tripmesh import PARTICIPANTS
from tripmesh.mesh.layout import BROKER, POSTGRES, free_layout
from tripmesh.mesh.mesh import ROOT, Mesh, stop_on_sigterm
from tripmesh.runtime.names import BOOKING_MODES

log = logging.getLogger("chaos")

# The story's trip is the Black-Friday deal: its seats and cars are scarce, so
# trips contend for them, some sell out, and sagas compensate.
SCARCE = {"JL5": 40, "CAMRY-NRT": 12}
DAYS_ON_SALE = 30
# Shorter than the defaults so that a run's faults resolve within its length.
COORDINATOR_ARGS = ("--rpc-timeout", "1", "--step-give-up", "3", "--compensation-give-up", "60")
# 3PC time-outs a lab run shows in seconds: a yes vote waits 2 s for PreCommit.
SERVICE_ARGS = ("--resolve-after", "2", "--3pc-wait-timeout", "2", "--3pc-precommit-timeout", "4")
# The audited books of a run, kept beside its history (gzipped JSON, chaos.audit.load_books).
BOOKS_FILE = "books.json.gz"
# The client's history, compressed once the run is reported (chaos.history.read_history).
HISTORY_FILE = "history.jsonl.gz"


@dataclass(frozen=True)
class RunOutcome:
    status: int  # 0 valid, 1 invalid, 2 unknown
    verdict: str
    run_dir: Path


@dataclass(frozen=True)
class RunConfig:
    scenario: Scenario
    protocol: str
    seed: int
    duration: float
    ops: int
    concurrency: int
    settle_timeout: float
    runs_dir: Path
    keep_mesh: bool = False
    """Keep the mesh's databases after the audit (by default a run keeps its books,
    history and logs, compressed: a few hundred kB instead of tens of MB)."""


def write_catalogs(folder: Path) -> tuple[dict[str, Path], Catalog]:
    """The built-in catalog with the story's trip made scarce, as catalog files."""
    folder.mkdir(parents=True, exist_ok=True)
    today = dt.datetime.now(dt.UTC).date()
    files = {}
    for kind in (flight.KIND, hotel.KIND, car.KIND):
        resources = [replace(r, capacity=SCARCE.get(r.resource_id, r.capacity)) for r in kind.seed]
        files[kind.name] = write_catalog_file(
            folder / f"{kind.name}.json", resources, today, DAYS_ON_SALE
        )
    catalog = Catalog(
        flights=tuple(r.resource_id for r in flight.KIND.seed),
        hotels=tuple(r.resource_id for r in hotel.KIND.seed),
        cars=tuple(r.resource_id for r in car.KIND.seed),
        first_date=today,
        days_on_sale=DAYS_ON_SALE,
    )
    return files, catalog


# Every status whose units sit in the held column, as the checker names them.
def settle(mesh: Mesh, timeout: float) -> float | None:
    """Seconds until nothing is pending or held; None if the deadline passed first."""
    return audit.settle(mesh.layout, timeout)


async def _traffic(
    config: RunConfig,
    mesh: Mesh,
    nemesis: Nemesis,
    plans: list[Planned],
    schedule: list[Fault],
    history: HistoryWriter,
) -> tuple[float, list[Window]]:
    """Run the clients and the nemesis; (the epoch time of the run's start, the fault windows)."""
    origin, started_at = time.monotonic(), time.time()
    guard = None
    if config.scenario.restart_after is not None:
        guard = asyncio.create_task(nemesis.keep_alive(restart_after=config.scenario.restart_after))
    settings = ClientSettings(concurrency=config.concurrency)
    clients = run_clients(
        mesh.layout.client_address,
        plans,
        history,
        settings,
        started=origin,
        stop_at=origin + config.duration,
    )
    progress = asyncio.create_task(show_progress(config, schedule, history, origin))
    try:
        _, windows = await asyncio.gather(clients, nemesis.run(schedule, origin))
    finally:
        progress.cancel()
        if guard is not None:
            guard.cancel()
    return started_at, windows


def progress_line(
    elapsed: float, duration: float, counts: Mapping[str, int], schedule: Sequence[Fault]
) -> str:
    """One line of where a run stands: time, completions by outcome, the faults now on."""
    statuses = ", ".join(
        f"{k.removeprefix('ok ')} {n:,}" for k, n in sorted(counts.items()) if k.startswith("ok ")
    )
    ok = f"ok {counts.get('ok', 0):,}" + (f" ({statuses})" if statuses else "")
    ops = f"{ok}, fail {counts.get('fail', 0):,}, info {counts.get('info', 0):,}"
    active = [f for f in schedule if f.start <= elapsed < f.start + f.duration]
    faults = (
        "; ".join(
            f"{f.action} {f.target} ({elapsed - f.start:.1f}/{f.duration:.1f} s)" for f in active
        )
        or "none"
    )
    return f"{min(elapsed, duration):5.1f}/{duration:.0f} s | {ops} | fault now: {faults}"


async def show_progress(
    config: RunConfig, schedule: Sequence[Fault], history: HistoryWriter, origin: float
) -> None:
    """Live on the console while a run drives traffic (only on a terminal: logs stay clean)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        return
    title = f"{config.scenario.name} {config.protocol} seed {config.seed}"

    def line() -> str:
        elapsed = time.monotonic() - origin
        return f"{title} | " + progress_line(elapsed, config.duration, history.counts, schedule)

    with Live(line(), console=console, refresh_per_second=4, transient=True) as live:
        while True:
            await asyncio.sleep(0.25)
            live.update(line())


def run(config: RunConfig) -> RunOutcome:
    """One scenario run: its verdict, exit status and folder."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    run_dir = (
        config.runs_dir / f"{config.scenario.name}-{config.protocol}-seed{config.seed}-{stamp}"
    )
    run_dir.mkdir(parents=True)
    catalogs, catalog = write_catalogs(run_dir / "catalog")
    plans = generate(config.seed, config.ops, config.protocol, catalog)
    schedule = config.scenario.schedule(random.Random(config.seed), config.duration)
    (run_dir / "schedule.json").write_text(json.dumps([f.to_dict() for f in schedule], indent=1))
    (run_dir / "run.json").write_text(
        json.dumps(
            {
                "scenario": config.scenario.name,
                "protocol": config.protocol,
                "seed": config.seed,
                "duration": config.duration,
                "ops": config.ops,
                "concurrency": config.concurrency,
            },
            indent=1,
        )
    )
    scenario = config.scenario
    mesh = Mesh(
        run_dir / "mesh",
        free_layout(store=scenario.store, coordinators=scenario.coordinators),
        environment=scenario.environment(config.protocol, run_dir / "failpoints"),
        extra_args={
            "coordinator": (*COORDINATOR_ARGS, *scenario.coordinator_args),
            **{k: (*SERVICE_ARGS, "--catalog", str(catalogs[k])) for k in PARTICIPANTS},
        },
        restart=False,  # the nemesis decides when a killed process comes back
    )
    mesh.up()
    nemesis = Nemesis(mesh)
    history = HistoryWriter(run_dir / "history.jsonl")
    try:
        started_at, windows = asyncio.run(_traffic(config, mesh, nemesis, plans, schedule, history))
        # The faults as applied, on the books' clock too (epoch seconds), for later audits.
        (run_dir / "faults.json").write_text(
            json.dumps(
                {"started_at": started_at, "windows": [w.to_dict() for w in windows]}, indent=1
            )
        )
        history.close()
        nemesis.heal_all()
        settled = settle(mesh, config.settle_timeout)
        books = read_books(
            mesh.layout.address("coordinator"), {k: mesh.layout.address(k) for k in PARTICIPANTS}
        )
        taken_over = _takeovers(mesh, books, windows, started_at)
    finally:
        history.close()
        mesh.down()
    save_books(books, run_dir / BOOKS_FILE)
    results = checker.check_all(read_history(run_dir / "history.jsonl"), books)
    _report(run_dir, config, schedule, windows, results, books, settled, started_at, taken_over)
    compact(run_dir, keep_mesh=config.keep_mesh)
    verdict = checker.overall(results)
    print(
        f"{config.scenario.name} {config.protocol} seed {config.seed}: {verdict.upper()}  ({run_dir})"
    )
    return RunOutcome({"valid": 0, "invalid": 1}.get(verdict, 2), verdict, run_dir)


def _report(
    run_dir: Path,
    config: RunConfig,
    schedule: list[Fault],
    windows: list[Window],
    results: list[CheckResult],
    books: BooksSnapshot,
    settled: float | None,
    started_at: float,
    taken_over: list[float] | None = None,
) -> None:
    from chaos.measures import measure
    from chaos.report import write_run_report

    history = read_history(run_dir / "history.jsonl")
    measures = measure(
        history,
        books,
        settle_seconds=settled,
        duration=config.duration,
        windows=[w.to_dict() for w in windows],
        started_at=started_at,
        takeovers=taken_over,
    )
    notes = list(config.scenario.notes)
    notes += recovery_notes(run_dir / "mesh" / "logs" / "coordinator.log")
    notes += unilateral_notes({k: run_dir / "mesh" / "logs" / f"{k}.log" for k in PARTICIPANTS})
    if settled is None:
        notes.append(f"The mesh did not settle within {config.settle_timeout:.0f} s of healing.")
    write_run_report(
        run_dir,
        scenario=config.scenario.name,
        protocol=config.protocol,
        seed=config.seed,
        schedule=[f.to_dict() for f in schedule],
        fault_windows=[w.to_dict() for w in windows],
        results=results,
        measures=measures,
        loss_model=config.scenario.loss_model,
        notes=notes,
        time_out_splits=len(checker.time_out_splits(books)),
        history=history,
    )


def _takeovers(
    mesh: Mesh, books: BooksSnapshot, windows: list[Window], started_at: float
) -> list[float] | None:
    """When one of several coordinators was killed: how soon the others took each of its
    trips in flight over (chaos.audit.takeovers); None when no such kill happened. The
    trips are read from a coordinator that was not killed."""
    names = mesh.layout.coordinator_names
    killed = [w for w in windows if w.action == "kill" and w.target in names]
    if not killed or len(names) < 2:
        return None
    survivor = next(n for n in names if n not in {w.target for w in killed})
    found: list[float] = []
    for window in killed:
        found += audit.takeovers(
            mesh.layout.address(survivor),
            books.trips,
            started_at + window.start,
            started_at + window.end,
        )
    return sorted(found)


def compact(run_dir: Path, *, keep_mesh: bool) -> None:
    """Shrink a reported run: the history and every log gzipped, the databases and the
    broker's streams dropped (the audited books are in BOOKS_FILE) unless `keep_mesh`."""
    _gzip(run_dir / "history.jsonl", run_dir / HISTORY_FILE)
    mesh = run_dir / "mesh"
    for log_file in sorted((mesh / "logs").glob("*.log*")):
        if log_file.suffix != ".gz":
            _gzip(log_file, log_file.with_name(log_file.name + ".gz"))
    if not keep_mesh:
        for database in mesh.glob("*.db*"):
            database.unlink()
        shutil.rmtree(mesh / BROKER, ignore_errors=True)
        shutil.rmtree(mesh / POSTGRES, ignore_errors=True)


def _gzip(source: Path, target: Path) -> None:
    if source.exists():
        with source.open("rb") as raw, gzip.open(target, "wb", compresslevel=6) as packed:
            shutil.copyfileobj(raw, packed)
        source.unlink()


def unilateral_notes(service_logs: dict[str, Path]) -> list[str]:
    """How many 3PC holds each participant decided on its own time-out (commit, abort)."""
    notes = []
    for kind, path in service_logs.items():
        if not path.exists():
            continue
        counts = {"commit": 0, "abort": 0}
        for line in path.read_text(errors="replace").splitlines():
            for decision in counts:
                counts[decision] += f'"msg": "3PC time-out: {decision} ' in line
        if any(counts.values()):
            notes.append(
                f"{kind} decided {counts['commit'] + counts['abort']} 3PC holds on its own"
                f" time-out: {counts['commit']} committed, {counts['abort']} aborted."
            )
    return notes


def recovery_notes(coordinator_log: Path) -> list[str]:
    """What the coordinator logged about its recoveries (how many trips, how long)."""
    notes = []
    if coordinator_log.exists():
        for line in coordinator_log.read_text(errors="replace").splitlines():
            if '"recovered ' in line:
                notes.append("Coordinator: " + json.loads(line)["msg"] + ".")
    return notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=sorted(registry()))
    p.add_argument(
        "--protocol",
        choices=[*BOOKING_MODES, "mixed"],
        default="saga",
        help="saga-lock: the saga with its semantic lock; mixed: 2PC and saga, per trip",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic and faults")
    p.add_argument("--ops", type=int, default=100_000, help="booking requests at most")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--settle-timeout", type=float, default=120.0)
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "chaos")
    p.add_argument(
        "--keep-mesh",
        action="store_true",
        help="keep the mesh's databases (by default only the audited books are kept)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()  # killed, it still stops its mesh
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    config = RunConfig(
        scenario=registry()[args.scenario],
        protocol=args.protocol,
        seed=args.seed,
        duration=args.duration,
        ops=args.ops,
        concurrency=args.concurrency,
        settle_timeout=args.settle_timeout,
        runs_dir=args.runs_dir,
        keep_mesh=args.keep_mesh,
    )
    return run(config).status


if __name__ == "__main__":
    raise SystemExit(main())
