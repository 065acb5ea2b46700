"""Bad input, against the real mesh: the right status, the field named, nothing written.

Every bad call is sent once, in the module's `sent` fixture, to real service and
coordinator processes on loopback; the books are read right after, before any
test writes anything on purpose. The tests then check each answer (status code
and, for INVALID_ARGUMENT and NOT_FOUND, the field in the google.rpc.BadRequest
details) and that no trip, reservation, hold or idempotency key appeared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.books import Books, day, write_catalog
from tests.procs import PARTICIPANTS, Cluster
from tripmesh.runtime.database import connect
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import participant_pb2 as ppb

C = grpc.StatusCode
INVALID, NOT_FOUND = C.INVALID_ARGUMENT, C.NOT_FOUND
SALE_DAYS = 10  # on sale from today (day(0)) to day(SALE_DAYS - 1)
CAPACITY = 5
RESOURCES = {"flight": "FL1", "hotel": "HT1", "car": "CR1"}
CLEAR = object()  # "leave this message field unset"


@dataclass
class Mesh:
    cluster: Cluster
    books: Books


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("bad-input")
    capacities = {kind: {rid: CAPACITY} for kind, rid in RESOURCES.items()}
    cluster = Cluster(root / "data", catalog=write_catalog(root / "catalog", capacities, SALE_DAYS))
    try:
        cluster.start()
        assert cluster.coordinator is not None
        books = Books.open(
            cluster.coordinator.address, {k: p.address for k, p in cluster.services.items()}
        )
        try:
            yield Mesh(cluster, books)
        finally:
            books.close()
    finally:
        cluster.stop()


# -- the bad calls -------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One bad call: what is sent, and the status and fields it must be answered with."""

    name: str
    send: Callable[[Mesh], Message]
    code: grpc.StatusCode
    fields: tuple[str, ...] = ()


def label(changes: dict[str, Any]) -> str:
    """A short test id that does not change from day to day: ``flight.date=day(10),car=unset``."""
    offsets = {day(n): f"day({n})" for n in range(-5, 30)}
    return ",".join(
        f"{k}={'unset' if v is CLEAR else offsets.get(v, repr(v)[:20])}" for k, v in changes.items()
    )


def valid_booking() -> cpb.BookTripRequest:
    return cpb.BookTripRequest(
        idempotency_key="bad-input-1",
        customer_id="customer-1",
        protocol=cpb.PROTOCOL_SAGA,
        flight=cpb.FlightSelection(flight_id="FL1", date=day(1), seats=1),
        hotel=cpb.HotelSelection(hotel_id="HT1", check_in=day(1), nights=2, rooms=1),
        car=cpb.CarSelection(car_id="CR1", pickup_date=day(1), days=2, cars=1),
    )


def booking(code: grpc.StatusCode, fields: tuple[str, ...], **changes: Any) -> Bad:
    """A valid BookTrip with `changes` (``flight__seats=0``; CLEAR unsets a selection)."""
    request = valid_booking()
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target: Any = request
        for name in parents:
            target = getattr(target, name)
        if value is CLEAR:
            target.ClearField(leaf)
        else:
            setattr(target, leaf, value)
    name = label({k.replace("__", "."): v for k, v in changes.items()})
    return Bad(name, lambda m: m.books.coordinator.BookTrip(request, timeout=10), code, fields)


BOOKINGS = [
    booking(INVALID, ("idempotency_key",), idempotency_key=""),
    booking(INVALID, ("customer_id",), customer_id=""),
    booking(INVALID, ("idempotency_key",), idempotency_key="k" * 129),
    booking(INVALID, ("customer_id",), customer_id="c" * 129),
    booking(INVALID, ("idempotency_key",), idempotency_key="bell\x07"),
    booking(INVALID, ("flight",), flight=CLEAR),
    booking(INVALID, ("hotel",), hotel=CLEAR),
    booking(INVALID, ("car",), car=CLEAR),
    booking(INVALID, ("flight.flight_id",), flight__flight_id=""),
    booking(INVALID, ("hotel.hotel_id",), hotel__hotel_id="h" * 129),
    booking(INVALID, ("flight.date",), flight__date="2026-13-01"),
    booking(INVALID, ("flight.date",), flight__date=""),
    booking(INVALID, ("hotel.check_in",), hotel__check_in="tomorrow"),
    booking(INVALID, ("car.pickup_date",), car__pickup_date="2031-02-30"),
    booking(INVALID, ("car.pickup_date",), car__pickup_date=day(1).replace("-", "")),
    booking(INVALID, ("flight.date",), flight__date=day(-1)),
    booking(INVALID, ("hotel.check_in",), hotel__check_in=day(-1)),
    booking(INVALID, ("car.pickup_date",), car__pickup_date=day(-1)),
    booking(INVALID, ("flight.seats",), flight__seats=0),
    booking(INVALID, ("flight.seats",), flight__seats=-1),
    booking(INVALID, ("flight.seats",), flight__seats=10),
    booking(INVALID, ("hotel.nights",), hotel__nights=0),
    booking(INVALID, ("hotel.nights",), hotel__nights=-2),
    booking(INVALID, ("hotel.nights",), hotel__nights=31),
    booking(INVALID, ("hotel.rooms",), hotel__rooms=0),
    booking(INVALID, ("hotel.rooms",), hotel__rooms=-1),
    booking(INVALID, ("car.days",), car__days=0),
    booking(INVALID, ("car.days",), car__days=-1),
    booking(INVALID, ("car.cars",), car__cars=0),
    booking(INVALID, ("car.cars",), car__cars=-3),
    booking(INVALID, ("car.cars",), car__cars=10),
    booking(
        INVALID, ("semantic_lock",), semantic_lock=True, protocol=cpb.PROTOCOL_TWO_PHASE_COMMIT
    ),
    booking(
        INVALID, ("semantic_lock",), semantic_lock=True, protocol=cpb.PROTOCOL_THREE_PHASE_COMMIT
    ),
    booking(INVALID, ("semantic_lock",), semantic_lock=True, protocol=cpb.PROTOCOL_CHOREOGRAPHY),
    # This cluster's coordinator has no broker: it cannot book a choreographed trip.
    booking(grpc.StatusCode.FAILED_PRECONDITION, ("protocol",), protocol=cpb.PROTOCOL_CHOREOGRAPHY),
    booking(INVALID, ("protocol",), protocol=7),
    booking(INVALID, ("protocol",), protocol=-1),
    booking(
        INVALID,
        ("idempotency_key", "customer_id", "flight.seats", "hotel.check_in", "car"),
        idempotency_key="",
        customer_id="",
        flight__seats=0,
        hotel__check_in="tomorrow",
        car=CLEAR,
    ),
    booking(NOT_FOUND, ("flight.flight_id",), flight__flight_id="XX999"),
    booking(NOT_FOUND, ("hotel.hotel_id",), hotel__hotel_id="NO-SUCH-HOTEL"),
    booking(NOT_FOUND, ("car.car_id",), car__car_id="NO-SUCH-CAR"),
    # Dates that are valid and in the future, but not on sale.
    booking(INVALID, ("flight.date",), flight__date=day(SALE_DAYS)),
    booking(INVALID, ("hotel.check_in",), hotel__check_in=day(SALE_DAYS - 2), hotel__nights=5),
    booking(INVALID, ("car.pickup_date",), car__pickup_date=day(20)),
    booking(INVALID, ("hotel.check_in",), hotel__check_in="9999-12-31", hotel__nights=2),
    # A huge count once overflowed the calendar check (INTERNAL).
    booking(INVALID, ("hotel.nights",), hotel__nights=2**31 - 1),
    booking(INVALID, ("car.days",), car__days=2**31 - 1),
    booking(INVALID, ("customer_id",), customer_id="   "),
]


def lookup(
    name: str, code: grpc.StatusCode, fields: tuple[str, ...], call: Callable[[Mesh], Message]
) -> Bad:
    return Bad(name, call, code, fields)


LOOKUPS = [
    lookup(
        "GetTrip unknown id",
        NOT_FOUND,
        (),
        lambda m: m.books.coordinator.GetTrip(
            cpb.GetTripRequest(trip_id="trip-00000000000000000000"), timeout=10
        ),
    ),
    lookup(
        "GetTrip 5,000-character id",
        INVALID,
        ("trip_id",),
        lambda m: m.books.coordinator.GetTrip(cpb.GetTripRequest(trip_id="t" * 5000), timeout=10),
    ),
    lookup(
        "GetTrip empty id",
        INVALID,
        ("trip_id",),
        lambda m: m.books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=""), timeout=10),
    ),
    *(
        lookup(
            f"ListTrips page_token={token!r:.12}",
            INVALID,
            ("page_token",),
            lambda m, t=token: m.books.coordinator.ListTrips(
                cpb.ListTripsRequest(page_token=t), timeout=10
            ),
        )
        for token in ("abc", "-5", "²", "9" * 30)
    ),
    lookup(
        "ListTrips page_size=-1",
        INVALID,
        ("page_size",),
        lambda m: m.books.coordinator.ListTrips(cpb.ListTripsRequest(page_size=-1), timeout=10),
    ),
    lookup(
        "ListTrips status=99",
        INVALID,
        ("status",),
        lambda m: m.books.coordinator.ListTrips(cpb.ListTripsRequest(status=99), timeout=10),
    ),
]


def prepare(
    kind: str,
    code: grpc.StatusCode,
    fields: tuple[str, ...],
    *,
    saga: bool = False,
    ids: dict[str, str] | None = None,
    hold: object = None,
    **hold_changes: Any,
) -> Bad:
    """A Prepare (or Reserve) of a valid hold with `ids` / `hold_changes`; hold=CLEAR sends none."""
    method = "Reserve" if saga else "Prepare"
    request_type = ppb.ReserveRequest if saga else ppb.PrepareRequest
    request = request_type(**{"reservation_id": "bad-r1", "trip_id": "bad-t1", **(ids or {})})
    if hold is not CLEAR:
        values = {"resource_id": RESOURCES[kind], "start_date": day(1), "days": 1, "quantity": 1}
        request.hold.CopyFrom(ppb.Hold(**{**values, **hold_changes}))
    changes = {**(ids or {}), **({"hold": CLEAR} if hold is CLEAR else {}), **hold_changes}
    return Bad(
        f"{kind} {method} {label(changes)}",
        lambda m: getattr(m.books.participants[kind], method)(request, timeout=10),
        code,
        fields,
    )


def participant(
    kind: str, method: str, request: Message, code: grpc.StatusCode, fields: tuple[str, ...]
) -> Bad:
    return Bad(
        f"{kind} {method} {type(request).__name__}({str(request).strip()!r:.40})",
        lambda m: getattr(m.books.participants[kind], method)(request, timeout=10),
        code,
        fields,
    )


PARTICIPANT_CALLS = [
    prepare("flight", INVALID, ("hold.quantity",), quantity=0),
    prepare("flight", INVALID, ("hold.quantity",), quantity=-1),
    prepare("hotel", INVALID, ("hold.quantity",), quantity=10),
    prepare("flight", INVALID, ("hold.days",), days=0),
    prepare("car", INVALID, ("hold.days",), days=31),
    prepare("flight", INVALID, ("reservation_id",), ids={"reservation_id": ""}),
    prepare("flight", INVALID, ("reservation_id",), ids={"reservation_id": "r" * 201}),
    prepare("flight", INVALID, ("trip_id",), ids={"trip_id": ""}),
    prepare("flight", INVALID, ("hold.resource_id", "hold.start_date"), hold=CLEAR),
    prepare("flight", INVALID, ("hold.start_date",), start_date="2026-13-01"),
    prepare("flight", NOT_FOUND, ("hold.resource_id",), resource_id="XX999"),
    prepare("hotel", INVALID, ("hold.start_date",), start_date=day(SALE_DAYS + 3)),
    prepare("car", INVALID, ("hold.start_date",), start_date=day(SALE_DAYS - 1), days=2),
    prepare("flight", INVALID, ("hold.start_date",), start_date="9999-12-31", days=2),
    # The participants take dates and ids exactly as the coordinator does.
    prepare("flight", INVALID, ("hold.start_date",), start_date=day(5).replace("-", "")),
    prepare("hotel", INVALID, ("hold.start_date",), start_date="2030-W01-1"),
    prepare("car", INVALID, ("hold.start_date",), start_date=day(-1)),
    prepare("flight", INVALID, ("hold.days",), days=2**31 - 1),
    prepare("flight", INVALID, ("reservation_id",), ids={"reservation_id": "r\x00"}),
    prepare("hotel", INVALID, ("trip_id",), ids={"trip_id": "   "}),
    prepare("car", INVALID, ("hold.resource_id",), resource_id="C\n1"),
    prepare("hotel", INVALID, ("hold.quantity",), saga=True, quantity=0),
    prepare("car", NOT_FOUND, ("hold.resource_id",), saga=True, resource_id="NO-SUCH-CAR"),
    prepare("hotel", INVALID, ("hold.start_date",), saga=True, start_date=day(SALE_DAYS)),
    participant(
        "flight", "Commit", ppb.CommitRequest(trip_id="bad-t1"), INVALID, ("reservation_id",)
    ),
    participant("hotel", "Abort", ppb.AbortRequest(trip_id="bad-t1"), INVALID, ("reservation_id",)),
    participant(
        "hotel",
        "Abort",
        ppb.AbortRequest(
            reservation_id="bad-r1", trip_id="bad-t1", protocol=ppb.PARTICIPANT_PROTOCOL_SAGA
        ),
        INVALID,
        ("protocol",),
    ),
    participant(
        "flight",
        "CanCommit",
        ppb.CanCommitRequest(
            reservation_id="bad-r1",
            trip_id="bad-t1",
            hold=ppb.Hold(resource_id="FL1", start_date=day(1), days=1, quantity=0),
        ),
        INVALID,
        ("hold.quantity",),
    ),
    participant(
        "flight", "PreCommit", ppb.PreCommitRequest(trip_id="bad-t1"), INVALID, ("reservation_id",)
    ),
    participant(
        "car", "DoCommit", ppb.DoCommitRequest(reservation_id="bad-r1"), INVALID, ("trip_id",)
    ),
    participant(
        "car", "Confirm", ppb.ConfirmRequest(trip_id="bad-t1"), INVALID, ("reservation_id",)
    ),
    participant("car", "Cancel", ppb.CancelRequest(reservation_id="bad-r1"), INVALID, ("trip_id",)),
    participant("flight", "GetInventory", ppb.GetInventoryRequest(), INVALID, ("resource_id",)),
    participant(
        "flight",
        "GetInventory",
        ppb.GetInventoryRequest(resource_id="XX999"),
        NOT_FOUND,
        ("resource_id",),
    ),
    participant(
        "hotel",
        "ListReservations",
        ppb.ListReservationsRequest(page_token="abc"),
        INVALID,
        ("page_token",),
    ),
    participant(
        "hotel",
        "ListReservations",
        ppb.ListReservationsRequest(page_token="²"),
        INVALID,
        ("page_token",),
    ),
    participant(
        "hotel",
        "ListReservations",
        ppb.ListReservationsRequest(page_token="9" * 30),
        INVALID,
        ("page_token",),
    ),
    participant(
        "car",
        "ListReservations",
        ppb.ListReservationsRequest(page_size=-1),
        INVALID,
        ("page_size",),
    ),
    participant(
        "car", "ListReservations", ppb.ListReservationsRequest(status=99), INVALID, ("status",)
    ),
]

ALL_BAD = [*BOOKINGS, *LOOKUPS, *PARTICIPANT_CALLS]
assert len({bad.name for bad in ALL_BAD}) == len(ALL_BAD), "case names must be unique"


@dataclass(frozen=True)
class Written:
    """Everything a bad call could have written, read right after the last one."""

    trips: list[cpb.Trip]
    log_rows: dict[str, int]  # coordinator.db table -> row count
    reservations: dict[str, list[ppb.Reservation]]
    inventory: dict[str, list[ppb.InventoryDay]]


@dataclass(frozen=True)
class Sent:
    answers: dict[str, grpc.RpcError | Message]
    written: Written


def read_written(mesh: Mesh) -> Written:
    books = mesh.books
    trips = books.coordinator.ListTrips(cpb.ListTripsRequest(page_size=500), timeout=10).trips
    log = connect(mesh.cluster.data_dir / "coordinator.db", readonly=True)
    try:
        tables = [r[0] for r in log.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        log_rows = {t: log.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    finally:
        log.close()
    return Written(
        list(trips),
        log_rows,
        {kind: books.reservations(kind) for kind in PARTICIPANTS},
        {kind: books.inventory(kind, RESOURCES[kind]) for kind in PARTICIPANTS},
    )


@pytest.fixture(scope="module")
def sent(mesh: Mesh) -> Sent:
    answers: dict[str, grpc.RpcError | Message] = {}
    for bad in ALL_BAD:
        try:
            answers[bad.name] = bad.send(mesh)
        except grpc.RpcError as err:
            answers[bad.name] = err
    return Sent(answers, read_written(mesh))


def field_violations(err: grpc.RpcError) -> list[str]:
    """The field paths in the error's google.rpc.BadRequest details."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    fields: list[str] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [v.field for v in bad_request.field_violations]
    return fields


@pytest.mark.parametrize("bad", ALL_BAD, ids=[bad.name for bad in ALL_BAD])
def test_bad_call_gets_its_status_and_names_the_field(sent: Sent, bad: Bad) -> None:
    answer = sent.answers[bad.name]
    assert isinstance(answer, grpc.RpcError), f"accepted: {answer}"
    assert isinstance(answer, grpc.Call)
    assert answer.code() == bad.code, f"{answer.code()}: {answer.details()}"
    assert answer.details(), "the message must say what is wrong"
    named = field_violations(answer)
    for name in bad.fields:
        assert name in named, f"{name} not among the field violations {named}: {answer.details()}"


def test_no_bad_call_is_answered_unknown_or_internal(mesh: Mesh, sent: Sent) -> None:
    codes = {
        name: answer.code()
        for name, answer in sent.answers.items()
        if isinstance(answer, grpc.Call)
    }
    assert {n: c for n, c in codes.items() if c in (C.UNKNOWN, C.INTERNAL)} == {}
    procs = [mesh.cluster.coordinator, *mesh.cluster.services.values()]
    tracebacks = [p.name for p in procs if p is not None and "Traceback" in p.log_text()]
    assert tracebacks == [], f"tracebacks in the logs of {tracebacks}"


def test_nothing_is_written_anywhere(sent: Sent) -> None:
    written = sent.written
    assert written.trips == []
    assert set(written.log_rows) >= {"trips", "legs", "idempotency_keys", "events"}
    assert {t: n for t, n in written.log_rows.items() if n and t != "sqlite_sequence"} == {}
    assert written.reservations == {kind: [] for kind in PARTICIPANTS}
    for kind, days in written.inventory.items():
        assert [d.date for d in days] == [day(i) for i in range(SALE_DAYS)], kind
        for d in days:
            assert (d.capacity, d.available, d.held, d.confirmed) == (CAPACITY, CAPACITY, 0, 0), (
                kind,
                d,
            )


# -- the same reservation id with another hold: ALREADY_EXISTS, first hold kept ---------


def _inventory(mesh: Mesh, kind: str, first: str, last: str) -> list[tuple[int, int, int]]:
    got = mesh.books.participants[kind].GetInventory(
        ppb.GetInventoryRequest(resource_id=RESOURCES[kind], from_date=first, to_date=last),
        timeout=10,
    )
    return [(d.available, d.held, d.confirmed) for d in got.days]


@pytest.mark.parametrize("kind, saga", [("hotel", False), ("car", True)], ids=["2pc", "saga"])
def test_same_reservation_with_another_hold_is_already_exists(
    mesh: Mesh, sent: Sent, kind: str, saga: bool
) -> None:
    stub = mesh.books.participants[kind]
    send, request = (
        (stub.Reserve, ppb.ReserveRequest) if saga else (stub.Prepare, ppb.PrepareRequest)
    )
    ids = {"reservation_id": f"conflict-{kind}", "trip_id": f"conflict-trip-{kind}"}
    first = ppb.Hold(resource_id=RESOURCES[kind], start_date=day(4), days=2, quantity=2)
    other = ppb.Hold(resource_id=RESOURCES[kind], start_date=day(4), days=3, quantity=3)
    reply = send(request(**ids, hold=first), timeout=10)
    assert reply.reserved if saga else reply.vote == ppb.VOTE_YES, reply
    with pytest.raises(grpc.RpcError) as caught:
        send(request(**ids, hold=other), timeout=10)
    assert caught.value.code() == C.ALREADY_EXISTS, caught.value.details()
    assert ids["reservation_id"] in caught.value.details()
    if not saga:
        # The in-doubt resolver may release the hold at any moment (presumed abort: the
        # coordinator never heard of this trip), so settle it ourselves before looking.
        stub.Abort(ppb.AbortRequest(**ids), timeout=10)
    (kept,) = mesh.books.reservations(kind, ids["trip_id"])
    status = ppb.RESERVATION_STATUS_CONFIRMED if saga else ppb.RESERVATION_STATUS_RELEASED
    assert (kept.hold, kept.status) == (first, status)
    taken = 2 if saga else 0  # the first hold's, never the second's
    assert _inventory(mesh, kind, day(4), day(6)) == [
        (CAPACITY - taken, 0, taken),
        (CAPACITY - taken, 0, taken),
        (CAPACITY, 0, 0),
    ]
