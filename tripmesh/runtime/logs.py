"""Logging: one JSON object a line, each carrying the trip and correlation id in scope.

`bind(trip_id=..., correlation_id=...)` sets them for the current asyncio task
(context variables); every log line written in that task carries them, and
the coordinator's participant calls send them as gRPC metadata, so one trip's
lines can be pulled from all four processes' logs with one grep.

A process started with TRIPMESH_LOG_FILE writes its own log there, rotated at
`ROTATE_BYTES` with `ROTATE_KEEP` old files (logging.handlers), so that
nothing pipes every line through its supervisor; without it, to stderr.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import os
import sys
import time

TRIP_ID: contextvars.ContextVar[str] = contextvars.ContextVar("trip_id", default="")
CORRELATION_ID: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="")

# gRPC metadata keys (lower case, as HTTP/2 requires).
TRIP_ID_KEY = "x-trip-id"
CORRELATION_ID_KEY = "x-correlation-id"


def bind(*, trip_id: str = "", correlation_id: str = "") -> None:
    """Put a trip (and its correlation id, by default the trip id) in scope for this task."""
    TRIP_ID.set(trip_id)
    CORRELATION_ID.set(correlation_id or trip_id)


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """The metadata that carries the current trip to the next hop."""
    trip_id = TRIP_ID.get()
    if not trip_id:
        return ()
    return ((TRIP_ID_KEY, trip_id), (CORRELATION_ID_KEY, CORRELATION_ID.get() or trip_id))


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "process": self.process_name,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        trip_id = getattr(record, "trip_id", None) or TRIP_ID.get()
        if trip_id:
            entry["trip_id"] = trip_id
            entry["correlation_id"] = CORRELATION_ID.get() or trip_id
        for key in ("leg", "reservation_id", "event"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class RotatingLog(logging.handlers.RotatingFileHandler):
    """logging's RotatingFileHandler, each line formatted once and the size kept here.

    The standard one, before every line, formats the record a first time to
    measure it, asks the file system twice whether the file is still a regular
    file, and seeks to its end. This one counts what it wrote (JSON lines are
    ASCII: characters are bytes) and rolls over when the next line would pass
    `maxBytes`, as the standard one does. Every line is flushed as it is
    written, so a killed process loses none it logged.
    """

    def __init__(self, path: str, *, max_bytes: int, keep: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=keep, encoding="utf-8")
        self._size = os.path.getsize(path)  # a log already there: appended to

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            if self._size and self._size + len(line) >= self.maxBytes:
                self.doRollover()
                self._size = 0
            stream = self.stream
            if stream is None:  # closed, or rolled over with delay: open it again
                stream = self.stream = self._open()
            stream.write(line)
            stream.flush()
            self._size += len(line)
        except Exception:  # noqa: BLE001 - as logging's own handlers do: never raise
            self.handleError(record)


LOG_FILE_VARIABLE = "TRIPMESH_LOG_FILE"
ROTATE_BYTES = 50 * 1024 * 1024
ROTATE_KEEP = 3


def configure(process_name: str, level: str = "INFO") -> None:
    """JSON lines to TRIPMESH_LOG_FILE (rotated) when it is set, else to stderr."""
    path = os.environ.get(LOG_FILE_VARIABLE, "")
    handler: logging.Handler
    if path:
        handler = RotatingLog(path, max_bytes=ROTATE_BYTES, keep=ROTATE_KEEP)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process_name))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
