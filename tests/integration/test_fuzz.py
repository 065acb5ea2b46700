"""Every bad request is refused cleanly: a fuzz of every method of every server.

Real processes (a coordinator and three participants) over real gRPC. Each
server's methods are found the way any client finds them, through its
reflection service. Two kinds of bad input go to each method:

- random bytes as the request body (seeded): most are not a valid message;
- structured malformed requests: a message of the method's type with one field
  set to a bad value (empty, oversized, unprintable, blank, a date at the
  calendar's edge or in another form, a huge or negative count, an enum value
  the contract does not have); first every field of every method in every bad
  way with the other fields plausible (a sweep), then the other fields
  arbitrary too (hypothesis).

No answer may be UNKNOWN or INTERNAL (the server did not understand its own
failure), no error message may echo a long value back, nothing may be written
anywhere, and every process must still be SERVING afterwards.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.books import Books, day, trip_request
from tests.procs import Cluster
from tripmesh.v1 import catalog_pb2, participant_pb2  # noqa: F401 - the descriptor pool
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import participant_pb2 as ppb

RANDOM_BODIES = 1_000  # per server, spread over its methods
STRUCTURED = 1_000  # in all, spread over every method of every server
REFUSED = ("UNKNOWN", "INTERNAL")  # the server did not understand its own failure
# An error message quotes a short prefix of a bad value, never all of it: no run of
# ECHO characters of the 5,000-character value, and no message longer than a field
# list naming every field of the largest request.
ECHO = 100
MAX_DETAILS = 2_000
LONG = "x" * 5_000
BAD_STRINGS = ("", LONG, "a\x00b", "line\nbreak", "\u202eevil", " ")
BAD_DATES = ("9999-12-31", "0001-01-01", "20301010", "2030-02-30", "2030-W01-1", "2030-1-1")
BAD_INTEGERS = (-1, -(2**31), 2**31 - 1, 10**6)
BAD_ENUM = 999
STREAMS = {"/grpc.health.v1.Health/Watch", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"}  # fmt: skip


@dataclass(frozen=True)
class Method:
    server: str
    path: str  # /package.Service/Method
    descriptor: MethodDescriptor

    @property
    def request(self) -> Descriptor:
        return self.descriptor.input_type


def _methods(server: str, address: str) -> list[Method]:
    """Every method the server offers, listed through its own reflection service."""
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([ask]), timeout=10))
    pool = descriptor_pool.Default()
    found = []
    for service in reply.list_services_response.service:
        for method in pool.FindServiceByName(service.name).methods:
            found.append(Method(server, f"/{service.name}/{method.name}", method))
    return found


def _call(channel: grpc.Channel, method: Method, body: bytes) -> tuple[str, str]:
    """Send `body` as-is; (status code name, details). Streams read one reply at most."""
    identity: Callable[[bytes], bytes] = lambda b: b
    try:
        if method.path == "/grpc.health.v1.Health/Watch":
            replies = channel.unary_stream(method.path, identity, identity)(body, timeout=0.3)
            next(iter(replies), None)
        elif method.path in STREAMS:
            call = channel.stream_stream(method.path, identity, identity)
            list(call(iter([body]), timeout=2))
        else:
            channel.unary_unary(method.path, identity, identity)(body, timeout=5)
    except grpc.RpcError as exc:
        assert isinstance(exc, grpc.Call)
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and method.path in STREAMS:
            return "OK", ""  # a Watch that answered and goes on watching
        return exc.code().name, exc.details() or ""
    return "OK", ""


# -- structured malformed requests ---------------------------------------------------


def _is_date(field: FieldDescriptor) -> bool:
    return "date" in field.name or field.name in ("check_in", "from", "to")


def _bad_values(field: FieldDescriptor) -> tuple[Any, ...]:
    """The bad values a field of this type can take (none for a bool)."""
    if field.type == FieldDescriptor.TYPE_STRING:
        return BAD_DATES + BAD_STRINGS if _is_date(field) else BAD_STRINGS
    if field.type == FieldDescriptor.TYPE_ENUM:
        return (BAD_ENUM,)
    if field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32):
        return BAD_INTEGERS
    if field.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return (*BAD_INTEGERS, 2**63 - 1, -(2**63))
    return ()


def _any_value(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=20), st.sampled_from(BAD_DATES + BAD_STRINGS))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return st.sampled_from([*values, BAD_ENUM])
    if field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32):
        return st.integers(-(2**31), 2**31 - 1)
    if field.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return st.integers(-(2**63), 2**63 - 1)
    return st.nothing()


def _leaves(descriptor: Descriptor, prefix: str = "") -> list[tuple[str, FieldDescriptor]]:
    """Every scalar field, nested ones by their dotted path (no repeated fields)."""
    found = []
    for field in descriptor.fields:
        if field.is_repeated:
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.full_name.startswith("tripmesh."):
                found += _leaves(field.message_type, f"{prefix}{field.name}.")
            continue
        found.append((f"{prefix}{field.name}", field))
    return found


def _set(message: Message, path: str, value: Any) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        message = getattr(message, parent)
    setattr(message, name, value)


@st.composite
def malformed(draw: st.DrawFn, methods: list[Method]) -> tuple[Method, bytes]:
    """A method, and a request of its type with one field bad and the rest arbitrary."""
    candidates = [
        m for m in methods if m.request.full_name.startswith("tripmesh.") and _bad_fields(m)
    ]
    method = draw(st.sampled_from(candidates))
    request = GetMessageClass(method.request)()
    leaves = _leaves(method.request)
    for path, field in leaves:
        if draw(st.booleans()):
            _set(request, path, draw(_any_value(field)))
    path, field = draw(st.sampled_from(_bad_fields(method)))
    _set(request, path, draw(st.sampled_from(_bad_values(field))))
    return method, request.SerializeToString()


def _sane(field: FieldDescriptor) -> Any:
    """A plausible value, so that the one bad field is what a sweep case tests."""
    if field.type == FieldDescriptor.TYPE_STRING:
        return day(5) if _is_date(field) else "fuzz-1"
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    if field.type == FieldDescriptor.TYPE_BOOL:
        return False
    return 1


def sweep(methods: list[Method]) -> Iterator[tuple[Method, bytes]]:
    """Every method, every field it has set bad in every way, the others plausible."""
    for method in methods:
        if not method.request.full_name.startswith("tripmesh."):
            continue
        leaves = _leaves(method.request)
        for bad_path, bad_field in _bad_fields(method):
            for value in _bad_values(bad_field):
                request = GetMessageClass(method.request)()
                for path, field in leaves:
                    _set(request, path, _sane(field))
                _set(request, bad_path, value)
                yield method, request.SerializeToString()


def _bad_fields(method: Method) -> list[tuple[str, FieldDescriptor]]:
    return [(p, f) for p, f in _leaves(method.request) if _bad_values(f)]


# -- the books, before and after ----------------------------------------------------


def _written(books: Books) -> dict[str, Any]:
    """Everything a write could change: trips, reservations, inventory totals."""
    trips = books.coordinator.ListTrips(cpb.ListTripsRequest(page_size=1000), timeout=10)
    state: dict[str, Any] = {"trips": sorted(t.trip_id for t in trips.trips)}
    for kind, stub in books.participants.items():
        state[kind] = sorted(r.reservation_id for r in books.reservations(kind))
        totals = stub.SummarizeInventory(ppb.SummarizeInventoryRequest(), timeout=10)
        state[f"{kind} totals"] = [
            (r.resource_id, r.available, r.held, r.confirmed) for r in totals.resources
        ]
    return state


def _all_serving(addresses: dict[str, str]) -> dict[str, str]:
    states = {}
    for name, address in addresses.items():
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        states[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return states


@pytest.fixture
def fuzzed(make_cluster: Callable[..., tuple[Cluster, Books]]) -> Iterator[tuple[Books, dict]]:
    cluster, books = make_cluster()
    assert cluster.coordinator is not None
    # One real trip, so that reads and operator calls have something to find.
    seed = trip_request("fuzz-seed", cpb.PROTOCOL_SAGA, flight="FX", hotel="H", car="C")
    books.coordinator.BookTrip(seed, timeout=10)
    # The coordinator's three planes are three servers: clients, operators, the mesh.
    addresses = {
        "coordinator": cluster.coordinator.address,
        "coordinator-operator": cluster.operator_address,
        "coordinator-decisions": cluster.decisions_address,
    }
    addresses |= {kind: proc.address for kind, proc in cluster.services.items()}
    yield books, addresses


def test_random_bytes_and_malformed_requests_are_refused_cleanly(
    fuzzed: tuple[Books, dict[str, str]],
) -> None:
    books, addresses = fuzzed
    methods = {name: _methods(name, address) for name, address in addresses.items()}
    everything = [m for found in methods.values() for m in found]
    assert any(m.path == "/tripmesh.v1.Participant/Abort" for m in everything)
    assert any(m.path == "/tripmesh.v1.Coordinator/BookTrip" for m in everything)
    before = _written(books)
    seen: Counter[tuple[str, str]] = Counter()
    wrong: dict[tuple[str, str], str] = {}  # (method, what was wrong) -> an example

    def record(method: Method, body: bytes, answer: tuple[str, str]) -> None:
        code, details = answer
        seen[(method.path, code)] += 1
        if code in REFUSED:
            wrong.setdefault((method.path, code), f"{details[:150]} <- {body[:80]!r}")
        if LONG[:ECHO] in details or len(details) > MAX_DETAILS:
            wrong.setdefault((method.path, "echoes a long value"), details[:150])

    channels = {name: grpc.insecure_channel(address) for name, address in addresses.items()}
    try:
        rng = random.Random(20261130)
        for name, found in methods.items():
            for i in range(RANDOM_BODIES):
                method = found[i % len(found)]
                body = rng.randbytes(rng.choice((1, 3, 8, 20, 64, 300)))
                record(method, body, _call(channels[name], method, body))

        for method, body in sweep(everything):
            record(method, body, _call(channels[method.server], method, body))

        @settings(
            max_examples=STRUCTURED,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(malformed(everything))
        def send(case: tuple[Method, bytes]) -> None:
            method, body = case
            record(method, body, _call(channels[method.server], method, body))

        send()
    finally:
        for channel in channels.values():
            channel.close()
    assert not wrong, "\n".join(f"{k}: {v}" for k, v in sorted(wrong.items()))
    assert seen.total() >= len(addresses) * RANDOM_BODIES + STRUCTURED
    assert any(code == "INVALID_ARGUMENT" for _, code in seen)
    assert _written(books) == before
    assert _all_serving(addresses) == dict.fromkeys(addresses, "SERVING")
