"""A failed chaos test shows what went wrong inside its mesh: the error lines of every
process's log (the run's folder, logs included, goes with the test's temporary folder;
on a CI machine nothing else is left to read)."""

from __future__ import annotations

import gzip
from collections.abc import Generator, Iterable
from pathlib import Path

import pytest

# What marks an error: tripmesh's JSON log lines, PostgreSQL's and supervisord's own.
_MARKS = ('"level": "ERROR"', '"level": "CRITICAL"', "ERROR:", "FATAL:", "PANIC:", " CRIT ")
_LINES_PER_FILE = 20
_LINE_CHARS = 3000


def mesh_errors(folders: Iterable[Path]) -> str:
    """The error lines of the mesh logs under `folders` (gzipped or not), per file."""
    parts: list[str] = []
    for folder in folders:
        for path in sorted(folder.glob("**/mesh/logs/*.log*")):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", errors="replace") as lines:
                found = [
                    line.rstrip()[:_LINE_CHARS] for line in lines if any(m in line for m in _MARKS)
                ]
            if found:
                shown = found[:_LINES_PER_FILE]
                more = f"\n... {len(found) - len(shown)} more" if len(found) > len(shown) else ""
                parts.append(f"== {path}\n" + "\n".join(shown) + more)
    return "\n".join(parts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    folders = [funcargs[name] for name in ("tmp_path", "runs_dir") if name in funcargs]
    errors = mesh_errors(folders)
    if errors:
        report.sections.append(("mesh logs: error lines", errors))
