"""The report that decides: `make chaos-report`.

    python -m chaos.compare [--runs DIR ...] [--scenarios a,b] [--protocols 2pc,saga]
                            [--seeds 1,2,3] [--duration S] [--bench FILE|latest] [--out DIR]

With --runs and nothing else, builds the report from the run folders found
there (seconds). With --scenarios, --protocols or --seeds, runs every
scenario, protocol and seed of that plan that the folders do not hold yet
(into the first --runs, or a new folder under runs/chaos), then reports on
the plan. Writes report.md (a PNG per scenario beside it) and report.html
(self-contained) and prints the recommendation. Exits 1 if a run in the
report found a violation (3PC under partition does: the lab shows it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import sys
import time
from pathlib import Path

from chaos.comparison import Bench, read_bench, write_report
from chaos.matrix import PROTOCOL_ORDER, RunRecord, find_runs, load_runs
from chaos.run import RunConfig, run
from chaos.scenarios import registry
from tripmesh.mesh.mesh import ROOT, stop_on_sigterm

# What a full report covers when nothing is asked for and no runs are given.
DEFAULT_PROTOCOLS = "2pc,3pc,saga,saga-lock,choreography"
DEFAULT_SEEDS = "1,2,3"
DEFAULT_DURATION = 30.0


def _names(
    text: str, known: list[str] | tuple[str, ...], flag: str, p: argparse.ArgumentParser
) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in known:
            p.error(f"{flag}: unknown {name!r}; choose from {', '.join(known)}")
    if not names:
        p.error(f"{flag}: name at least one")
    return names


def _seeds(text: str, p: argparse.ArgumentParser) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: {text!r} is not a comma-separated list of integers")
    if not seeds:
        p.error("--seeds: name at least one")
    return seeds


def _bench(value: str | None, p: argparse.ArgumentParser) -> Bench | None:
    if not value or value == "none":
        return None
    if value == "latest":
        found = sorted((ROOT / "runs").glob("bench-*/bench.json"))
        return read_bench(found[-1]) if found else None
    path = Path(value)
    if not path.exists():
        p.error(f"--bench: {path} does not exist")
    return read_bench(path)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    p = argparse.ArgumentParser(
        prog="python -m chaos.compare", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--runs", type=Path, action="append", default=[], help="run folders to reuse")
    p.add_argument("--scenarios", help=f"comma-separated, from {', '.join(registry())}")
    p.add_argument("--protocols", help=f"comma-separated, from {', '.join(PROTOCOL_ORDER)}")
    p.add_argument("--seeds", help="comma-separated integers")
    p.add_argument(
        "--duration", type=float, help=f"seconds per run (default {DEFAULT_DURATION:.0f})"
    )
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--bench", help="a bench.json for the performance rows, or latest")
    p.add_argument("--out", type=Path, help="where the report goes (default: beside the runs)")
    p.add_argument(
        "--remeasure",
        action="store_true",
        help="compute each stored run's measures again from its history and books",
    )
    return p.parse_args(argv), p


def main(argv: list[str] | None = None) -> int:
    args, p = parse_args(argv)
    stop_on_sigterm()  # killed, the run under way still stops its mesh
    bench = _bench(args.bench, p)  # refused before anything is run or read
    scenarios = registry()
    if args.duration is not None and args.duration <= 0:
        p.error("--duration: must be positive")
    planned = bool(args.scenarios or args.protocols or args.seeds) or not args.runs
    for folder in args.runs:
        if not folder.exists() and not planned:
            p.error(f"--runs: {folder} does not exist (name runs to make: --scenarios, ...)")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    runs_dir = args.runs[0] if args.runs else ROOT / "runs" / "chaos" / f"report-{stamp}"
    existing = load_runs(find_runs(args.runs), remeasure=args.remeasure)
    if planned:
        plan = list(
            itertools.product(
                _names(args.scenarios or ",".join(scenarios), list(scenarios), "--scenarios", p),
                _names(args.protocols or DEFAULT_PROTOCOLS, PROTOCOL_ORDER, "--protocols", p),
                _seeds(args.seeds or DEFAULT_SEEDS, p),
            )
        )
        duration = args.duration or DEFAULT_DURATION
        have = {
            (r.scenario, r.protocol, r.seed): r
            for r in existing
            if args.duration is None or r.duration == args.duration
        }
        missing = [cell for cell in plan if cell not in have]
        runs_dir.mkdir(parents=True, exist_ok=True)
        if missing:
            print(f"{len(plan) - len(missing)} of {len(plan)} runs found; running {len(missing)}:")
        made: list[RunRecord] = []
        for scenario, protocol, seed in missing:
            outcome = run(
                RunConfig(scenarios[scenario], protocol, seed, duration, 100_000,
                          args.concurrency, 120.0, runs_dir)
            )  # fmt: skip
            made += load_runs([outcome.run_dir])
        records = [have[cell] for cell in plan if cell in have] + made
    else:
        records = existing
    if not records:
        p.error(f"no reported runs under {', '.join(map(str, args.runs))}")
    started = time.monotonic()
    out = args.out or runs_dir / "report"
    md, page, sentences = write_report(records, out, bench)
    print(f"\n{len(records)} runs; report built in {time.monotonic() - started:.1f} s\n")
    print("Recommendation:")
    for s in sentences:
        print(f"- {s.requirement}. {s.text}")
    print(f"\n{md}\n{page}")
    invalid = [r for r in records if r.verdict == "invalid"]
    if invalid:
        print(
            f"\n{len(invalid)} runs found a violation: "
            + ", ".join(f"{r.scenario} {r.protocol} seed {r.seed}" for r in invalid),
            file=sys.stderr,
        )
    return 1 if invalid else 0


if __name__ == "__main__":
    raise SystemExit(main())
