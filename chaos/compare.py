"""Every scenario in every protocol, side by side: `make chaos-report`.

    python -m chaos.compare [--duration S] [--seed N] [--scenarios a,b,...] [--protocols 2pc,3pc,saga]

Writes runs/chaos/comparison-<time>.md: the story's decision matrix, with a
measured number in every cell instead of an adjective. Exits 1 if any run
found a violation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from chaos.report import PROTOCOL_ORDER as PROTOCOLS
from chaos.report import write_comparison
from chaos.run import RunConfig, run
from chaos.scenarios import registry
from tripmesh.mesh.mesh import ROOT


def collect(run_dir: Path) -> dict[str, object]:
    """One run's row for the comparison, read back from its folder."""
    meta = json.loads((run_dir / "run.json").read_text())
    verdicts = json.loads((run_dir / "verdicts.json").read_text())
    return {
        "scenario": meta["scenario"],
        "protocol": meta["protocol"],
        "verdict": verdicts["verdict"],
        "measures": json.loads((run_dir / "measures.json").read_text()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m chaos.compare", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--scenarios", default=",".join(registry()))
    p.add_argument(
        "--protocols", default="2pc,3pc,saga", help="comma-separated, from 2pc, 3pc, saga, mixed"
    )
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "chaos")
    args = p.parse_args(argv)
    scenarios = registry()
    protocols = args.protocols.split(",")
    for name, known, flag in (
        *((n, scenarios, "--scenarios") for n in args.scenarios.split(",")),
        *((n, PROTOCOLS, "--protocols") for n in protocols),
    ):
        if name not in known:
            p.error(f"{flag}: unknown {name!r}; choose from {', '.join(known)}")
    rows, worst = [], 0
    for name in args.scenarios.split(","):
        for protocol in protocols:
            outcome = run(
                RunConfig(
                    scenarios[name],
                    protocol,
                    args.seed,
                    args.duration,
                    100_000,
                    args.concurrency,
                    120.0,
                    args.runs_dir,
                )
            )
            worst = max(worst, outcome.status)
            rows.append(collect(outcome.run_dir))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    out = args.runs_dir / f"comparison-{stamp}.md"
    print(write_comparison(rows, out))
    print(f"\nwritten to {out}")
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
