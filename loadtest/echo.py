"""The ceiling: a trivial unary RPC on the same server model as the mesh's servers.

    python -m loadtest.echo --listen 127.0.0.1:0

`tripmesh.runtime.rpc.start_server` with no service of its own: the same
grpc.aio server, options and handler wrappers (CallGuard) as the coordinator and
the services, and the standard health service they all register. The "echo" is
`grpc.health.v1.Health/Check`: a tiny request, a tiny reply, no work between.
It prints the bound port on its first line of output.

`echo_server` runs one behind its own Toxiproxy proxy, for the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from collections.abc import Iterator

from tripmesh.mesh.layout import free_port
from tripmesh.mesh.mesh import ROOT
from tripmesh.mesh.toxiproxy import Toxiproxy
from tripmesh.runtime import rpc

ECHO_PROXY = "bench-echo"


async def serve(listen: str) -> None:
    running = await rpc.start_server(listen, [])
    await running.set_serving(True)
    print(running.port, flush=True)
    await rpc.serve_until_signalled(running, grace=1.0)


@contextlib.contextmanager
def echo_server(toxiproxy: Toxiproxy) -> Iterator[tuple[str, int]]:
    """(address of its proxy, pid) of a `loadtest.echo` process behind a new Toxiproxy proxy."""
    process = subprocess.Popen(
        [sys.executable, "-m", "loadtest.echo", "--listen", "127.0.0.1:0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        listen = f"127.0.0.1:{free_port()}"
        toxiproxy.create_proxy(ECHO_PROXY, listen, f"127.0.0.1:{port}")
        try:
            yield listen, process.pid
        finally:
            toxiproxy.delete_proxy(ECHO_PROXY)
    finally:
        process.terminate()
        process.wait(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.echo")
    parser.add_argument("--listen", default="127.0.0.1:0")
    rpc.run(serve(parser.parse_args(argv).listen))


if __name__ == "__main__":
    main()
