"""gRPC plumbing shared by every tripmesh server and client.

- `start_server`: a grpc.aio server with health checking and reflection, bound
  to an address (port 0 picks a free one) and returning the bound port.
- `CallGuard`: the one place where TripmeshError becomes a gRPC status,
  with field violations in the rich error model (google.rpc.BadRequest), where
  a body that is not a valid message gets INVALID_ARGUMENT (every method, the
  streaming ones too), and where the caller's trip and correlation id come
  into scope for logging.
- `serve_until_signalled`: serving, with start-up's heap frozen out of the
  garbage collector's reach (`heap.freeze_start_up`), until SIGTERM, when
  it shuts down gracefully: health goes
  NOT_SERVING first, then in-flight RPCs get `grace` seconds to finish; and
  a loud exit when the process's storage fails (`StorageFailure`).
- `channel`: a long-lived client channel with keepalive and retries of
  UNAVAILABLE declared in its service config.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import json
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_status import rpc_status

from tripmesh.runtime import heap, logs
from tripmesh.runtime.errors import ErrorKind, FieldViolation, TripmeshError, invalid

log = logging.getLogger(__name__)
T = TypeVar("T")

_CODES: dict[ErrorKind, tuple[grpc.StatusCode, int]] = {
    ErrorKind.INVALID: (grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT),
    ErrorKind.NOT_FOUND: (grpc.StatusCode.NOT_FOUND, code_pb2.NOT_FOUND),
    ErrorKind.CONFLICT: (grpc.StatusCode.ALREADY_EXISTS, code_pb2.ALREADY_EXISTS),
    ErrorKind.PRECONDITION: (grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
    ErrorKind.EXHAUSTED: (grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED),
    ErrorKind.UNAVAILABLE: (grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE),
}


def rpc_code(error: TripmeshError) -> int:
    """The google.rpc.Code (an int) that `error` is answered with."""
    return _CODES[error.kind][1]


async def abort_with(context: grpc.aio.ServicerContext, error: TripmeshError) -> None:
    """Abort the RPC with the status that `error` maps to (raises)."""
    details = []
    if error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    status = status_pb2.Status(code=rpc_code(error), message=error.message, details=details)
    await context.abort_with_status(rpc_status.to_status(status))


class _Undecodable:
    """What a request body that is not a valid message deserializes to (never raises)."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's deserializer, returning `_Undecodable` where it would raise.

    grpc answers a deserializer's exception with UNKNOWN; a body that is not
    the method's message is the caller's mistake, so the guard answers it with
    INVALID_ARGUMENT instead.
    """
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or anything a parser raises
            return _Undecodable(type(exc).__name__)

    return parse


UNDECODABLE = FieldViolation("request", "the body is not a valid message of this method's type")


def _rewrap(
    handler: grpc.RpcMethodHandler, behaviour: Callable[[Any, grpc.aio.ServicerContext], Any]
) -> grpc.RpcMethodHandler:
    """The same unary method, with `behaviour` (which calls the original) in its place."""
    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=_tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _rewrap_stream(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A streaming method (health Watch, reflection) whose undecodable requests are refused.

    The original may be an async generator or a coroutine that writes to the
    context (health Watch is one); the wrapper is of the same kind.
    """
    deserialize = _tolerant(handler.request_deserializer)
    serialize = handler.response_serializer
    unary = handler.unary_stream is not None
    inner = handler.unary_stream if unary else handler.stream_stream

    async def checked(source: Any, context: grpc.aio.ServicerContext) -> Any:
        async for request in source:
            if isinstance(request, _Undecodable):
                await abort_with(context, invalid(UNDECODABLE))
            yield request

    async def prepare(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not unary:
            return checked(request, context)
        if isinstance(request, _Undecodable):
            await abort_with(context, invalid(UNDECODABLE))
        return request

    behaviour: Callable[[Any, grpc.aio.ServicerContext], Any]
    if inspect.isasyncgenfunction(inner):

        async def generator(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async for reply in inner(await prepare(request, context), context):
                yield reply

        behaviour = generator
    else:

        async def writer(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await inner(await prepare(request, context), context)

        behaviour = writer
    make = grpc.unary_stream_rpc_method_handler if unary else grpc.stream_stream_rpc_method_handler
    return make(behaviour, request_deserializer=deserialize, response_serializer=serialize)


def timestamp(seconds: float) -> Timestamp:
    """A protobuf Timestamp from seconds since the epoch."""
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class MethodWrapper:
    """Wraps each method's handler once, when the server registers it (see `start_server`).

    What an interceptor would do around every call, without one: grpc.aio runs
    a server interceptor's `intercept_service` (a coroutine, and a continuation)
    on every call before it finds the handler; a wrapped handler costs nothing
    until its own code runs.
    """

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler to serve `method` with (`handler`, to leave it as it is)."""
        raise NotImplementedError


# The most method names a server remembers the handler of (a caller may send any name).
_MAX_METHODS = 1000


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A registered generic handler whose method handlers are wrapped, each the first time
    it is asked for (an unknown method stays None: grpc answers UNIMPLEMENTED)."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler],
    ) -> None:
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        try:
            return self._wrapped[method]
        except KeyError:
            pass
        handler = self._inner.service(handler_call_details)
        wrapped = None if handler is None else self._wrap(method, handler)
        if len(self._wrapped) < _MAX_METHODS:
            self._wrapped[method] = wrapped
        return wrapped


class _Registrar:
    """What the generated `add_*_to_server` functions and reflection are given as the server:
    each handler they register reaches the real server wrapped by `wrappers` (the first
    outermost)."""

    def __init__(self, server: grpc.aio.Server, wrappers: Sequence[MethodWrapper]) -> None:
        self._server = server
        self._wrappers = tuple(reversed(wrappers))

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        for wrapper in self._wrappers:
            handler = wrapper.wrap(method, handler)
        return handler

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGeneric(handler, self._wrap) for handler in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {m: self._wrap(f"/{service}/{m}", h) for m, h in handlers.items()}
        )


class CallGuard(MethodWrapper):
    """Around every call: the caller's ids in scope, and errors mapped to a status.

    The caller's trip and correlation id (gRPC metadata) are bound for the
    handler's log lines; a TripmeshError becomes its status code, anything else
    a plain INTERNAL; a body that is not a valid message, INVALID_ARGUMENT.
    """

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            return _rewrap(handler, _guarded(handler.unary_unary, method))
        if handler.unary_stream is not None or handler.stream_stream is not None:
            return _rewrap_stream(handler)
        return handler  # no client-streaming method is served


def _guarded(inner: Callable[[Any, grpc.aio.ServicerContext], Any], method: str) -> Any:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await abort_with(context, invalid(UNDECODABLE))
        metadata = context.invocation_metadata()
        if metadata:
            _bind_caller(metadata)
        try:
            return await inner(request, context)
        except TripmeshError as exc:
            await abort_with(context, exc)
        except grpc.aio.AbortError:
            raise
        except NotImplementedError:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
        except Exception:
            log.exception("unexpected error in %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    return guarded


def _bind_caller(metadata: Iterable[tuple[str, Any]]) -> None:
    trip_id = correlation_id = None
    for key, value in metadata:
        if key == logs.TRIP_ID_KEY:
            trip_id = str(value)
        elif key == logs.CORRELATION_ID_KEY:
            correlation_id = str(value)
    if trip_id:
        logs.bind(trip_id=trip_id, correlation_id=correlation_id or trip_id)


@dataclass(frozen=True)
class Service:
    """A servicer to register: the generated `add_*_to_server` and its full name."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str


class Health(health.aio.HealthServicer):
    """grpc's asyncio health servicer, with List (the whole map of statuses) implemented."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: Health
    service_names: tuple[str, ...]

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    address: str,
    services: Sequence[Service],
    *,
    guards: Iterable[MethodWrapper] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> RunningServer:
    """Start a server on `address` ("127.0.0.1:0" for a free port) and return it;
    TLS only when given `credentials` (tripmesh.runtime.tls).

    Every method's handler is wrapped once as it is registered: `CallGuard`
    outermost, then `guards` in order (who may call what: auth.Guard).

    Health reports NOT_SERVING until the caller says `set_serving(True)`, so a
    process can finish its start-up work (recovery) before it takes traffic.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            # Accept the keepalive pings our own channels send (see `channel`),
            # instead of answering them with GOAWAY "too_many_pings".
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    registrar: Any = _Registrar(server, [CallGuard(), *guards])
    health_servicer = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
    for service in services:
        service.add_to_server(service.servicer, registrar)
    names = tuple(s.full_name for s in services)
    # reflection.enable_server_reflection, for an asyncio server (which it tells by the
    # server's type, and the registrar is not one).
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer((*names, health.SERVICE_NAME, reflection.SERVICE_NAME)),
        registrar,
    )
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    running = RunningServer(server, port, health_servicer, names)
    await running.set_serving(False)
    return running


# The exit status of a server whose storage failed: its supervisor restarts it.
EXIT_STORAGE_FAILED = 70  # EX_SOFTWARE


class StorageFailure:
    """Set from any thread when the process's storage can no longer write at all.

    `serve_until_signalled` then turns health NOT_SERVING, keeps answering
    (every call that needs the storage fails UNAVAILABLE) for `linger` seconds
    so that health checkers see it, and returns; the server exits with
    EXIT_STORAGE_FAILED.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        self.cause: BaseException | None = None

    def __call__(self, cause: BaseException) -> None:
        self.cause = cause
        self._loop.call_soon_threadsafe(self.event.set)


async def serve_until_signalled(
    running: RunningServer | Sequence[RunningServer],
    *,
    grace: float = 5.0,
    failure: StorageFailure | None = None,
    linger: float = 1.0,
) -> bool:
    """Serve until SIGTERM or SIGINT (shut down gracefully; False) or a storage failure
    (health NOT_SERVING, then stop; True). Several servers (one process's
    listeners) go NOT_SERVING and drain together.

    Start-up's objects are frozen first: no full collection walks them again
    while the process serves (see `tripmesh.runtime.heap`)."""
    servers = [running] if isinstance(running, RunningServer) else list(running)
    log.debug("start-up heap frozen: %d objects", heap.freeze_start_up())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    waits = [asyncio.ensure_future(stop.wait())]
    if failure is not None:
        waits.append(asyncio.ensure_future(failure.event.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for waiting in waits:
        waiting.cancel()
    if failure is not None and failure.event.is_set():
        log.critical(
            "storage failed (%r): NOT_SERVING, exiting in %.1fs so that the supervisor"
            " restarts this process",
            failure.cause,
            linger,
        )
        await asyncio.gather(*(server.set_serving(False) for server in servers))
        await asyncio.sleep(linger)
        await asyncio.gather(*(server.stop(0.5) for server in servers))
        return True
    log.info("signal received: NOT_SERVING, draining for up to %.1fs", grace)
    await asyncio.gather(*(server.stop(grace) for server in servers))
    return False


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop of the kind `run` uses (for a thread of its own: a database's)."""
    if os.environ.get("TRIPMESH_EVENT_LOOP", "uvloop") == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a process's main coroutine: on uvloop, unless TRIPMESH_EVENT_LOOP=asyncio.

    uvloop measured about 8% less CPU per Reserve call than asyncio's own loop
    (one participant, direct, 32 callers, three runs each).
    """
    if os.environ.get("TRIPMESH_EVENT_LOOP", "uvloop") == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def _service_config(services: Sequence[str], *, balanced: bool) -> str:
    config: dict[str, Any] = {}
    if services:
        config["methodConfig"] = [
            {
                "name": [{"service": s} for s in services],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    if balanced:
        # Several replicas: calls go round robin over those whose health (the standard
        # protocol, every server's overall status) is SERVING; one that dies or drains
        # drops out until it is back.
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        config["healthCheckConfig"] = {"serviceName": ""}
    return json.dumps(config)


def target(addresses: str) -> str:
    """The gRPC target for `addresses`: one host:port as it is, or several, comma-separated
    (replicas of one service), as one static target of IP literals (`ipv4:a:1,b:2`)."""
    found = [a.strip() for a in addresses.split(",") if a.strip()]
    if not found:
        raise ValueError("no address given")
    if len(found) == 1:
        return found[0]
    literal = []
    for address in found:
        host, _, port = address.rpartition(":")
        host = "127.0.0.1" if host == "localhost" else host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{address!r}: several addresses must be IP literals (127.0.0.1:15050)"
            ) from None
        if ip.version != 4 or not port.isdigit():
            raise ValueError(f"{address!r}: several addresses must be IPv4 host:port")
        literal.append(f"{host}:{port}")
    return "ipv4:" + ",".join(literal)


def channel_options(addresses: str, retry_services: Sequence[str] = ()) -> list[tuple[str, Any]]:
    """The service config for `addresses`: retries for `retry_services`, round robin with
    health checking over several replicas."""
    balanced = target(addresses).startswith("ipv4:")
    if not retry_services and not balanced:
        return []
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", _service_config(retry_services, balanced=balanced))
    ]
    if retry_services:
        options.append(("grpc.enable_retries", 1))
    return options


def channel(
    addresses: str,
    *,
    retry_services: Sequence[str] = (),
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """A long-lived channel to `addresses` (one host:port, or several replicas,
    comma-separated: round robin over the healthy ones); calls to `retry_services` retry
    UNAVAILABLE; TLS when given `credentials`.

    Only list services whose every method is idempotent.
    """
    options: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect quickly after a partition heals or a server restarts.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.min_reconnect_backoff_ms", 100),
    ]
    options += channel_options(addresses, retry_services)
    if credentials is not None:
        return grpc.aio.secure_channel(target(addresses), credentials, options=options)
    return grpc.aio.insecure_channel(target(addresses), options=options)
