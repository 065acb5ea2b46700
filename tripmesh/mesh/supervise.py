"""The mesh's processes under supervisord: its config file, and a client for its control socket.

supervisord (the `supervisor` package) owns the processes: it starts them,
keeps their logs, and on shutdown stops them one at a time in reverse
priority order with SIGTERM, waiting `stopwaitsecs` before SIGKILL. We only
render its config into the data folder and talk to it over its unix socket
(the same XML-RPC interface `supervisorctl` uses).

A program with `restart=True` (every process of `make up`) is restarted by
supervisord whenever it exits without being asked to: at once if it had run for
`RESTART_STARTSECS`, else after a back-off that grows by a second each try, up to
`RESTART_TRIES` tries (then FATAL). The coordinator's recovery then finishes its
trips in flight. The chaos lab starts its meshes with `restart=False`: it kills
processes on purpose and decides itself when they come back.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from tripmesh.mesh.errors import MeshError
from tripmesh.runtime.logs import LOG_FILE_VARIABLE

# AF_UNIX paths are limited to 108 bytes including the terminator, and supervisord
# first binds a temporary name, the socket's path plus "." and its pid (up to 7 digits).
MAX_SOCKET_PATH = 107 - len(".4194304")
STOP_WAIT_SECONDS = 15  # servers drain for 5 s after SIGTERM; this is the SIGKILL backstop
RESTART_STARTSECS = 1  # a restarted program that lives this long counts as started
RESTART_TRIES = 10  # start attempts that die within RESTART_STARTSECS before FATAL


class SupervisorError(MeshError):
    """supervisord could not be started, reached or obeyed."""


@dataclass(frozen=True)
class Program:
    """One supervised process."""

    name: str
    argv: Sequence[str]
    #: Lower starts first and stops last.
    priority: int
    #: False: started later by `Supervisor.start`, once what it needs is up.
    autostart: bool = True
    environment: Mapping[str, str] | None = None
    #: True: supervisord restarts it whenever it exits unasked (with back-off).
    restart: bool = False
    #: True: it writes its own log, logs/NAME.log (TRIPMESH_LOG_FILE); supervisord keeps
    #: only what it prints outside its log (a crash's traceback) in logs/NAME.console.log.
    own_log: bool = False
    #: Run as this user (supervisord, when root, switches to it): PostgreSQL refuses root.
    user: str | None = None
    #: How supervisord asks it to stop (PostgreSQL: INT, its fast shutdown).
    stop_signal: str = "TERM"


@dataclass(frozen=True)
class ProcessInfo:
    name: str
    #: RUNNING, STARTING, STOPPED, EXITED, FATAL, BACKOFF, STOPPING, UNKNOWN.
    state: str
    pid: int
    description: str


def _escape(value: str) -> str:
    # supervisord expands %(name)s in values: a literal % must be doubled.
    return value.replace("%", "%%")


def render_config(data_dir: Path, programs: Sequence[Program], *, workdir: Path) -> str:
    """supervisord.conf for `programs`, with its socket, pid file and logs in `data_dir`."""
    logs = data_dir / "logs"
    sections = [
        "; Written by tripmesh/mesh/mesh.py on every `up`; edits are overwritten.",
        "[unix_http_server]",
        f"file = {_escape(str(socket_path(data_dir)))}",
        "chmod = 0700",
        "",
        "[supervisord]",
        f"logfile = {_escape(str(logs / 'supervisord.log'))}",
        f"pidfile = {_escape(str(data_dir / 'supervisord.pid'))}",
        f"childlogdir = {_escape(str(logs))}",
        f"directory = {_escape(str(workdir))}",
        "nodaemon = false",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl = unix://{_escape(str(socket_path(data_dir)))}",
    ]
    for program in programs:
        env = {"PYTHONUNBUFFERED": "1", **(program.environment or {})}
        if program.own_log:
            env[LOG_FILE_VARIABLE] = str(logs / f"{program.name}.log")
        sections += [
            "",
            f"[program:{program.name}]",
            f"command = {_escape(shlex.join(program.argv))}",
            f"directory = {_escape(str(workdir))}",
            f"priority = {program.priority}",
            f"autostart = {str(program.autostart).lower()}",
            f"autorestart = {str(program.restart).lower()}",
            f"startsecs = {RESTART_STARTSECS if program.restart else 0}",
            f"startretries = {RESTART_TRIES}",
            f"stopsignal = {program.stop_signal}",
            f"stopwaitsecs = {STOP_WAIT_SECONDS}",
            "stopasgroup = true",
            "killasgroup = true",
            f"stdout_logfile = {_escape(str(logs / log_name(program)))}",
            "stdout_logfile_maxbytes = 50MB",
            "redirect_stderr = true",
            "environment = " + ",".join(f'{k}="{_escape(v)}"' for k, v in env.items()),
        ]
        if program.user:
            sections.append(f"user = {program.user}")
    return "\n".join(sections) + "\n"


def log_name(program: Program) -> str:
    """The file supervisord writes a program's output to."""
    return f"{program.name}.console.log" if program.own_log else f"{program.name}.log"


def socket_path(data_dir: Path) -> Path:
    """supervisord's control socket: in the data folder, or, when that path would be
    longer than a unix socket may be, a short one in the temp folder named after it."""
    inside = data_dir / "supervisord.sock"
    if len(str(inside)) <= MAX_SOCKET_PATH:
        return inside
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"tripmesh-{digest}.sock"


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return True  # no /proc (not Linux): trust kill(0)


class Supervisor:
    """Start supervisord for a data folder, and control it through its socket."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.config = data_dir / "supervisord.conf"
        self.socket = socket_path(data_dir)

    def _rpc(self) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def running(self) -> bool:
        """True when a supervisord answers on this data folder's socket."""
        if not self.socket.exists():
            return False
        try:
            return bool(self._rpc().supervisor.getState()["statename"] == "RUNNING")
        except (OSError, http.client.HTTPException, xmlrpc.client.Error):
            return False

    def launch(self, config_text: str, *, timeout: float = 20.0) -> None:
        """Write the config, start supervisord as a daemon, and wait until it answers."""
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.config.write_text(config_text)
        started = subprocess.run(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.config)],
            capture_output=True,
            text=True,
            check=False,
        )
        if started.returncode != 0:
            raise SupervisorError(
                f"supervisord did not start: {(started.stderr or started.stdout).strip()}"
            )
        deadline = time.monotonic() + timeout
        while not self.running():
            if time.monotonic() > deadline:
                raise SupervisorError(
                    f"supervisord not answering on {self.socket} after {timeout:.0f}s;"
                    f" see {self.data_dir / 'logs' / 'supervisord.log'}"
                )
            time.sleep(0.05)

    def processes(self) -> dict[str, ProcessInfo]:
        """Every program's state and pid, by name."""
        return {
            info["name"]: ProcessInfo(
                info["name"], info["statename"], int(info["pid"]), info["description"]
            )
            for info in self._call("getAllProcessInfo")
        }

    def start(self, name: str) -> None:
        """Start one program (no-op if it is already running)."""
        try:
            self._rpc().supervisor.startProcess(name, True)
        except xmlrpc.client.Fault as fault:
            if "ALREADY_STARTED" not in fault.faultString:
                raise SupervisorError(f"start {name}: {fault.faultString}") from fault
        except (OSError, http.client.HTTPException) as exc:
            raise SupervisorError(f"start {name}: {exc}") from exc

    def pid(self) -> int:
        """supervisord's own pid."""
        return int(self._call("getPID"))

    def shutdown(self, *, timeout: float) -> list[str]:
        """Stop every program gracefully, then supervisord; return what was still alive after.

        Waits for supervisord to exit, then checks that no program it started
        outlived it (anything that did is named in the result).
        """
        own_pid = self.pid()
        children = {p.name: p.pid for p in self.processes().values() if p.pid}
        self._call("shutdown")
        deadline = time.monotonic() + timeout
        while pid_alive(own_pid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        leftovers = [f"supervisord (pid {own_pid})"] if pid_alive(own_pid) else []
        leftovers += [f"{n} (pid {pid})" for n, pid in children.items() if pid_alive(pid)]
        return leftovers

    def _call(self, method: str) -> Any:
        try:
            return getattr(self._rpc().supervisor, method)()
        except (OSError, http.client.HTTPException) as exc:
            raise SupervisorError(f"supervisord not reachable on {self.socket}: {exc}") from exc
        except xmlrpc.client.Error as exc:
            raise SupervisorError(f"supervisord {method}: {exc}") from exc
