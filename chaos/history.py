"""The client's history, in the manner of Jepsen: every operation invoked and completed.

An operation is plain data. Its completion type is `ok` (it happened: the
coordinator answered with a trip), `fail` (it definitely did not happen: the
request was refused before anything was written) or `info` (the outcome is
unknown: a timeout or a dropped connection). Retries reuse the idempotency key.
The history is written as JSON Lines, one operation event a line.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Literal

OpType = Literal["invoke", "ok", "fail", "info"]


@dataclass(frozen=True)
class Op:
    """One line of history."""

    process: int  # which client
    type: OpType
    f: str  # "book"
    key: str  # idempotency key
    protocol: str  # "2pc" or "saga"
    time: float  # seconds since the run started
    trip_id: str = ""
    status: str = ""  # the trip status the client saw: confirmed, aborted, pending, ...
    error: str = ""  # gRPC status name for fail / info
    attempt: int = 1

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v != ""}, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Op:
        return cls(**json.loads(line))


class HistoryWriter:
    """Appends operations to a JSONL file as they happen (flushed per line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = path.open("a", buffering=1)
        #: Completions so far by type (ok, fail, info), and `ok` ones by the status seen.
        self.counts: Counter[str] = Counter()

    def write(self, op: Op) -> None:
        self._file.write(op.to_json() + "\n")
        if op.type != "invoke":
            self.counts[op.type] += 1
            if op.type == "ok":
                self.counts[f"ok {op.status}"] += 1

    def close(self) -> None:
        self._file.close()


def read_history(path: Path) -> list[Op]:
    """A history file, plain or gzipped (a name ending in .gz)."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as packed:
            return list(parse_history(packed))
    return list(parse_history(path.read_text().splitlines()))


def parse_history(lines: Iterable[str]) -> Iterator[Op]:
    for line in lines:
        if line.strip():
            yield Op.from_json(line)
