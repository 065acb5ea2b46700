"""A real PostgreSQL server that tripmesh runs itself: for the PostgreSQL stores' tests and
for several coordinators sharing one trip log.

`PostgresServer` runs Debian's (or any PATH's) `initdb` and `postgres` on a
data folder of its own: trust authentication for the `tripmesh` superuser,
listening on TCP at 127.0.0.1 only (no unix socket: a data folder deep in a run's
folder would make its path too long for one, and every client dials TCP),
with `fsync=on` and `synchronous_commit=on`, so that a commit that returned is
on disk. The server's log is `postgres.log` in the data folder.

PostgreSQL refuses to run as root. When this process is root, the server runs
as the unprivileged `nobody` user (group `nogroup`) through subprocess's
`user=`/`group=`: the data folder is made theirs, and every folder above it
must let them through (`base_folder()` makes such a place; pytest's
`/tmp/pytest-of-root` is mode 0700 and does not). Otherwise it runs as the
current user.
"""

from __future__ import annotations

import contextlib
import glob
import grp
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

SUPERUSER = "tripmesh"
LOG_NAME = "postgres.log"
# Who runs the server when we are root (Debian's names for the unprivileged account).
UNPRIVILEGED_USER, UNPRIVILEGED_GROUP = "nobody", "nogroup"
_PROGRAMS = ("initdb", "pg_ctl", "postgres")


class PostgresError(RuntimeError):
    """The PostgreSQL server could not be installed, initialised, started or stopped."""


@dataclass(frozen=True)
class Binaries:
    initdb: Path
    pg_ctl: Path
    postgres: Path


def find_binaries() -> Binaries:
    """The server's programs: from PATH, else the newest `/usr/lib/postgresql/*/bin` (Debian's
    layout, which does not put them on PATH)."""
    found = [shutil.which(name) for name in _PROGRAMS]
    if all(found):
        return Binaries(*(Path(p) for p in found if p is not None))
    folders = sorted(
        (Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda d: _version_key(d.parent.name),
        reverse=True,
    )
    for folder in folders:
        if all((folder / name).is_file() for name in _PROGRAMS):
            return Binaries(*(folder / name for name in _PROGRAMS))
    raise PostgresError(
        "the PostgreSQL server is not installed (initdb, pg_ctl and postgres are neither on PATH"
        " nor in /usr/lib/postgresql/*/bin): on Debian or Ubuntu, `apt-get install postgresql`"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else -1 for part in name.split("."))


def base_folder(prefix: str = "tripmesh-pg-") -> Path:
    """A new empty folder under the system's temporary folder that the server's user can
    enter: mode 0755, where `tempfile.mkdtemp` makes 0700 (it is owned by root when we are
    root, and the server then runs as `nobody`). The caller removes it."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


class PostgresServer:
    """One PostgreSQL server on one data folder; `init` once, then `start`/`stop` (or `kill`)."""

    def __init__(self, data_dir: Path | str, *, binaries: Binaries | None = None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.binaries = binaries or find_binaries()
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._as_user: dict[str, Any] = {}
        self._uid, self._gid = os.geteuid(), os.getegid()
        if self._uid == 0:
            self._uid = pwd.getpwnam(UNPRIVILEGED_USER).pw_uid
            self._gid = _group_id(UNPRIVILEGED_GROUP, default=pwd.getpwuid(self._uid).pw_gid)
            # extra_groups=[]: drop root's supplementary groups too.
            self._as_user = {"user": self._uid, "group": self._gid, "extra_groups": []}

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    def init(self) -> None:
        """Create the cluster: `initdb` with trust authentication for `tripmesh`, in UTF8."""
        _check_reachable(self.data_dir.parent, self._uid, self._gid)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.data_dir, self._uid, self._gid)
        self.data_dir.chmod(0o700)
        command = [
            str(self.binaries.initdb),
            f"--pgdata={self.data_dir}",
            f"--username={SUPERUSER}",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]
        done = subprocess.run(
            command,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            **self._as_user,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise PostgresError(f"initdb failed on {self.data_dir}:\n{output}")

    def argv(self, port: int) -> list[str]:
        """The command that runs this server on 127.0.0.1:`port` in the foreground (as
        `start` does, or a supervisor): durable commits, TCP only."""
        return [
            str(self.binaries.postgres),
            "-D",
            str(self.data_dir),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",  # none: TCP only
            # Acknowledged means committed: the WAL is flushed before a commit returns.
            "-c",
            "fsync=on",
            "-c",
            "synchronous_commit=on",
            "-c",
            "full_page_writes=on",
        ]

    @property
    def user(self) -> str | None:
        """Who the server runs as when it is not us: `nobody` when we are root, else None."""
        return pwd.getpwuid(self._uid).pw_name if self._as_user else None

    @property
    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def start(self, port: int, *, timeout: float = 30.0) -> None:
        """Start the server on 127.0.0.1:`port` and return once it accepts connections."""
        if self.running:
            raise PostgresError(f"the server on {self.data_dir} is running already")
        command = self.argv(port)
        with self.log_path.open("ab") as log:
            # A session of its own: a Ctrl-C meant for the caller does not reach it, and the
            # caller's cleanup (`stop`) shuts it down in order.
            self._process = subprocess.Popen(
                command,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._as_user,
            )
        self.port = port
        try:
            self._wait_until_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise PostgresError(
                    f"postgres exited with status {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresError(
                        f"postgres did not accept connections within {timeout:g} s ({exc}):\n"
                        f"{self.log_tail()}"
                    ) from exc
            time.sleep(0.05)  # polled: a server being started has nothing to wait on

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def dsn(self, database: str = "postgres") -> str:
        """A libpq connection string for `database` on this server (over TCP)."""
        if self.port is None:
            raise PostgresError("the server has not been started")
        return make_conninfo(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname=database)

    def create_database(self, name: str) -> None:
        """Create the database `name`, unless it exists."""
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if exists.fetchone() is not None:
                return
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except psycopg.errors.DuplicateDatabase:
                pass  # created meanwhile by someone else: what was asked for

    def stop(self, *, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: sessions are ended, the data is checkpointed); waits for it.
        A server that does not stop within `timeout` is killed, and that is an error."""
        process = self._process
        if process is None or process.poll() is not None:
            self._process = None
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PostgresError(
                f"postgres did not stop within {timeout:g} s; killed it:\n{self.log_tail()}"
            ) from None
        self._process = None

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends, as a crash would: no checkpoint, no
        goodbye to clients. The next `start` recovers from the WAL.

        Each backend leads a process group of its own (the postmaster signals them one by
        one), so they are found by parent and killed each; this returns once they are gone,
        so that a new postmaster does not find the old shared memory still attached."""
        process = self._process
        if process is None:
            return
        kill_server(process.pid, reap=process.wait)
        self._process = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])


def _group_id(name: str, *, default: int) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return default


def _check_reachable(folder: Path, uid: int, gid: int) -> None:
    """Refuse a place the server's user cannot reach: initdb would fail with a worse message."""
    for parent in (folder, *folder.parents):
        mode = os.stat(parent)
        if mode.st_uid == uid:
            allowed = bool(mode.st_mode & stat.S_IXUSR)
        elif mode.st_gid == gid:
            allowed = bool(mode.st_mode & stat.S_IXGRP)
        else:
            allowed = bool(mode.st_mode & stat.S_IXOTH)
        if not allowed:
            raise PostgresError(
                f"{parent} cannot be entered by uid {uid}, who runs the server (mode"
                f" {stat.filemode(mode.st_mode)}): put the data folder somewhere it can reach,"
                " e.g. under tripmesh.runtime.postgres.base_folder()"
            )


def kill_server(pid: int, *, reap: Callable[[], object] | None = None) -> None:
    """SIGKILL the postmaster `pid` and then its backends (found before, by parent: each
    leads a process group of its own); return once they are gone. `reap` waits for the
    postmaster when it is our child (a supervisor reaps its own)."""
    backends = _children(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)  # first: a dead postmaster starts no more backends
    if reap is not None:
        reap()
    for backend in backends:
        with contextlib.suppress(ProcessLookupError):
            os.kill(backend, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while any(_alive(p) for p in backends) and time.monotonic() < deadline:
        time.sleep(0.01)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux's /proc; none found elsewhere)."""
    found = []
    for stat_file in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat_file).read_text()
        except OSError:
            continue  # it exited meanwhile
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(text.split(" ", 1)[0]))
    return found


def _alive(pid: int) -> bool:
    """True while `pid` runs; an exited process awaiting its reaping (a zombie) is not."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"
