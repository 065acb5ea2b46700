"""The choreographed saga's participants, on a real broker, behind Toxiproxy.

The mesh as `make up` runs it: nats-server with JetStream, every service
dialling it through its own `X-to-broker` proxy. No coordinator drives these
trips: the test publishes `TRIP_REQUESTED` through `coordinator-to-broker`, as
the coordinator's outbox will, and then reads only the event stream and the
participants' own books. Each service must react to the event before its
step, and compensation must flow back through events alone.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from tests.books import TODAY, Books, trip_request
from tests.e2e.conftest import doomed_catalog_mesh
from tripmesh import PARTICIPANTS
from tripmesh.mesh.layout import COORDINATOR, TOXIPROXY, admin_name
from tripmesh.mesh.mesh import Mesh
from tripmesh.mesh.toxiproxy import Toxiproxy
from tripmesh.runtime import auth, broker
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import coordinator_pb2_grpc
from tripmesh.v1 import events_pb2 as epb
from tripmesh.v1 import participant_pb2 as ppb

pytestmark = pytest.mark.e2e
# Seconds with no event before the coordinator flags a choreographed trip.
STUCK_AFTER = 3.0

K = epb.SagaEventKind
BOOKED = [
    K.SAGA_EVENT_KIND_TRIP_REQUESTED,
    K.SAGA_EVENT_KIND_FLIGHT_RESERVED,
    K.SAGA_EVENT_KIND_HOTEL_RESERVED,
    K.SAGA_EVENT_KIND_CAR_RESERVED,
]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Books]]:
    folder = tmp_path_factory.mktemp("choreography")
    with doomed_catalog_mesh(folder, TRIPMESH_CHOREOGRAPHY_STUCK_AFTER=str(STUCK_AFTER)) as found:
        yield found


def plan(car: str = "CX") -> epb.TripPlan:
    trip_id = f"chor-{uuid.uuid4().hex[:12]}"
    day = (TODAY).isoformat()
    return epb.TripPlan(
        trip_id=trip_id,
        flight=ppb.Hold(resource_id="FX", start_date=day, days=1, quantity=1),
        hotel=ppb.Hold(resource_id="HX", start_date=day, days=2, quantity=1),
        car=ppb.Hold(resource_id=car, start_date=day, days=2, quantity=1),
    )


async def _publish(url: str, event: epb.SagaEvent, message_id: str) -> bool:
    """Publish as the coordinator will; True if the broker kept it as a duplicate."""
    client = await broker.connect(url, "test-coordinator")
    try:
        js = client.jetstream()
        await broker.ensure_stream(js)
        ack = await js.publish(
            broker.subject(event.kind),
            event.SerializeToString(),
            headers={"Nats-Msg-Id": message_id},
            timeout=5,
        )
        return bool(ack.duplicate)
    finally:
        await client.close()


async def _stream(url: str, trip_id: str) -> list[tuple[int, epb.SagaEvent]]:
    """Every event of `trip_id` in the stream, with its stream sequence, oldest first."""
    client = await broker.connect(url, "test-reader")
    try:
        js = client.jetstream()
        consumer = await js.pull_subscribe(broker.SUBJECT_PREFIX + ">", stream=broker.STREAM)
        found = []
        while True:
            try:
                messages = await consumer.fetch(500, timeout=0.5)
            except TimeoutError:
                break
            for m in messages:
                event = epb.SagaEvent.FromString(m.data)
                if event.plan.trip_id == trip_id:
                    found.append((m.metadata.sequence.stream, event))
                await m.ack()
        await consumer.unsubscribe()
        return found
    finally:
        await client.close()


def request(mesh: Mesh, trip: epb.TripPlan, message_id: str = "") -> bool:
    event = broker.new_event(K.SAGA_EVENT_KIND_TRIP_REQUESTED, trip, source=COORDINATOR)
    url = mesh.layout.broker_url(COORDINATOR)
    return asyncio.run(_publish(url, event, message_id or event.event_id))


def events_until(mesh: Mesh, trip_id: str, last: int, timeout: float = 20.0) -> list[epb.SagaEvent]:
    """The trip's events once `last` is among them (ordered by stream sequence)."""
    url = mesh.layout.broker_url(COORDINATOR)
    deadline = time.monotonic() + timeout
    while True:
        found = [e for _, e in sorted(asyncio.run(_stream(url, trip_id)), key=lambda p: p[0])]
        if any(e.kind == last for e in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def own_records(books: Books, trip_id: str) -> dict[str, ppb.Reservation]:
    """Each participant's reservation for the trip, from its own books."""
    found = {}
    for kind, stub in books.participants.items():
        reply = stub.ListReservations(ppb.ListReservationsRequest(trip_id=trip_id), timeout=5)
        for r in reply.reservations:
            found[kind] = r
    return found


def test_a_choreographed_trip_books_through_toxiproxy_and_the_broker(
    mesh: tuple[Mesh, Books],
) -> None:
    started, books = mesh
    trip = plan()
    assert request(started, trip) is False
    events = events_until(started, trip.trip_id, K.SAGA_EVENT_KIND_CAR_RESERVED)
    assert [e.kind for e in events] == BOOKED
    assert [e.source for e in events] == ["coordinator", "flight", "hotel", "car"]
    records = own_records(books, trip.trip_id)
    assert {k: r.status for k, r in records.items()} == {
        k: ppb.RESERVATION_STATUS_CONFIRMED for k in PARTICIPANTS
    }
    assert {r.reservation_id for r in records.values()} == {
        f"{trip.trip_id}-{k}" for k in PARTICIPANTS
    }
    # Each service took its step only after the one before it: its own records say so.
    taken = [records[k].created_at.ToNanoseconds() for k in PARTICIPANTS]
    assert taken == sorted(taken)
    assert all(e.price_cents > 0 for e in events[1:])


def test_car_sold_out_the_hotel_then_the_flight_cancel_driven_by_events(
    mesh: tuple[Mesh, Books],
) -> None:
    started, books = mesh
    trip = plan(car="C-NONE")
    request(started, trip)
    events = events_until(started, trip.trip_id, K.SAGA_EVENT_KIND_FLIGHT_CANCELLED)
    assert [e.kind for e in events] == [
        K.SAGA_EVENT_KIND_TRIP_REQUESTED,
        K.SAGA_EVENT_KIND_FLIGHT_RESERVED,
        K.SAGA_EVENT_KIND_HOTEL_RESERVED,
        K.SAGA_EVENT_KIND_CAR_REFUSED,
        K.SAGA_EVENT_KIND_HOTEL_CANCELLED,
        K.SAGA_EVENT_KIND_FLIGHT_CANCELLED,
    ]
    assert events[3].reason.startswith("sold out")
    records = own_records(books, trip.trip_id)
    assert records["car"].status == ppb.RESERVATION_STATUS_REFUSED
    assert records["hotel"].status == ppb.RESERVATION_STATUS_CANCELLED
    assert records["flight"].status == ppb.RESERVATION_STATUS_CANCELLED
    # In that order, from the participants' own clocks: the hotel gave back first.
    hotel_back = records["hotel"].updated_at.ToNanoseconds()
    assert hotel_back <= records["flight"].updated_at.ToNanoseconds()
    assert records["hotel"].settled_by == records["flight"].settled_by == "choreography"


def test_a_duplicated_or_redelivered_event_changes_nothing(mesh: tuple[Mesh, Books]) -> None:
    started, books = mesh
    trip = plan()
    request(started, trip)
    first = events_until(started, trip.trip_id, K.SAGA_EVENT_KIND_CAR_RESERVED)
    before = own_records(books, trip.trip_id)
    flight_totals = books.participants["flight"].SummarizeInventory(
        ppb.SummarizeInventoryRequest(), timeout=5
    )
    # The same event id again: the broker itself drops it.
    assert request(started, trip) is True
    # The same event under another message id: the broker keeps it, the flight service
    # handles it again, and its step (keyed on the reservation id) changes nothing.
    assert request(started, trip, message_id=f"{trip.trip_id}.again") is False
    time.sleep(2.0)
    after = events_until(started, trip.trip_id, K.SAGA_EVENT_KIND_CAR_RESERVED)
    assert [e.kind for e in after] == [*[e.kind for e in first], K.SAGA_EVENT_KIND_TRIP_REQUESTED]
    assert own_records(books, trip.trip_id) == before
    assert (
        books.participants["flight"].SummarizeInventory(ppb.SummarizeInventoryRequest(), timeout=5)
        == flight_totals
    )


def _timeline(trip: cpb.Trip) -> list[tuple[str, str, str]]:
    """(actor, leg, what) of the lines the services' events wrote."""
    return [(e.actor, e.leg, e.kind) for e in trip.events if e.actor in ("flight", "hotel", "car")]


def test_book_trip_by_choreography_confirms_as_the_events_say(mesh: tuple[Mesh, Books]) -> None:
    _, books = mesh
    request = trip_request(
        "chor-book-1", cpb.PROTOCOL_CHOREOGRAPHY, flight="FX", hotel="HX", car="CX"
    )
    trip = books.coordinator.BookTrip(request, timeout=20).trip
    assert trip.status == cpb.TRIP_STATUS_CONFIRMED, trip
    assert trip.protocol == cpb.PROTOCOL_CHOREOGRAPHY
    assert [leg.status for leg in trip.legs] == [cpb.LEG_STATUS_CONFIRMED] * 3
    assert all(leg.price_cents > 0 for leg in trip.legs)
    full = books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=trip.trip_id), timeout=5)
    # The timeline says who reacted to what, from the events alone.
    assert _timeline(full) == [
        ("flight", "flight", "flight_reserved"),
        ("hotel", "hotel", "hotel_reserved"),
        ("car", "car", "car_reserved"),
    ]
    records = own_records(books, trip.trip_id)
    assert {k: r.status for k, r in records.items()} == {
        k: ppb.RESERVATION_STATUS_CONFIRMED for k in PARTICIPANTS
    }


def test_book_trip_by_choreography_with_the_car_sold_out_aborts_after_both_cancel(
    mesh: tuple[Mesh, Books],
) -> None:
    _, books = mesh
    request = trip_request(
        "chor-book-2", cpb.PROTOCOL_CHOREOGRAPHY, flight="FX", hotel="HX", car="C-NONE"
    )
    trip = books.coordinator.BookTrip(request, timeout=20).trip
    assert trip.status == cpb.TRIP_STATUS_ABORTED, trip
    assert trip.failure_reason.startswith("car: sold out")
    assert [leg.status for leg in trip.legs] == [
        cpb.LEG_STATUS_CANCELLED,
        cpb.LEG_STATUS_CANCELLED,
        cpb.LEG_STATUS_REFUSED,
    ]
    full = books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=trip.trip_id), timeout=5)
    assert [what for _, _, what in _timeline(full)] == [
        "flight_reserved",
        "hotel_reserved",
        "car_refused",
        "hotel_cancelled",
        "flight_cancelled",
    ]
    answered = {e.kind: e.detail for e in full.events}
    assert answered["hotel_cancelled"] == "to car_refused or trip_abandoned"
    assert answered["car_refused"].startswith("to hotel_reserved: sold out")
    # The same key again: the same trip, replayed.
    again = books.coordinator.BookTrip(request, timeout=20)
    assert again.replayed and again.trip.trip_id == trip.trip_id


def test_a_service_cut_off_the_broker_leaves_the_trip_flagged_then_it_finishes(
    mesh: tuple[Mesh, Books],
) -> None:
    started, books = mesh
    with _car_cut_off(started):
        began = time.monotonic()
        trip = _book_stuck(books, "chor-stuck-1")
        flagged = time.monotonic() - began
        assert trip.attention == cpb.ATTENTION_CHOREOGRAPHY_STUCK
        assert "last: hotel_reserved; waiting for car to reserve" in trip.attention_detail
        assert STUCK_AFTER <= flagged < STUCK_AFTER + 5
        # The operator retries: the trip waits for the car again.
        operator = _operator(started)
        action = cpb.OperatorActionRequest(trip_id=trip.trip_id, reason="car cut off the broker")
        retried = operator.RetryTrip(action, timeout=2 * STUCK_AFTER, metadata=_token(started))
        assert retried.status in (cpb.TRIP_STATUS_PENDING, cpb.TRIP_STATUS_NEEDS_ATTENTION)
    # The car hears the hotel's event once its link is back, and the trip moves on.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        trip = books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=trip.trip_id), timeout=5)
        if trip.status == cpb.TRIP_STATUS_CONFIRMED:
            break
        time.sleep(0.3)
    assert trip.status == cpb.TRIP_STATUS_CONFIRMED, trip
    assert trip.attention == cpb.ATTENTION_UNSPECIFIED
    kinds = [e.kind for e in trip.events]
    assert kinds.index("attention") < kinds.index("operator-retry") < len(kinds) - 1


def test_an_operator_gives_a_stuck_trip_up_and_the_late_service_undoes_its_leg(
    mesh: tuple[Mesh, Books],
) -> None:
    started, books = mesh
    with _car_cut_off(started):
        trip = _book_stuck(books, "chor-abandon-1")
        action = cpb.OperatorActionRequest(trip_id=trip.trip_id, reason="give it up")
        given_up = _operator(started).ForceCompensation(
            action, timeout=15, metadata=_token(started)
        )
        # The flight and the hotel undo their legs at once; the trip is aborted.
        assert given_up.status == cpb.TRIP_STATUS_ABORTED, given_up
        assert [leg.status for leg in given_up.legs[:2]] == [cpb.LEG_STATUS_CANCELLED] * 2
        assert given_up.failure_reason.startswith("abandoned by ")
    # The car, back, hears HOTEL_RESERVED and then TRIP_ABANDONED: it takes and gives back.
    events = events_until(started, trip.trip_id, K.SAGA_EVENT_KIND_CAR_CANCELLED)
    kinds = [e.kind for e in events]
    assert kinds.index(K.SAGA_EVENT_KIND_TRIP_ABANDONED) < kinds.index(
        K.SAGA_EVENT_KIND_CAR_CANCELLED
    )
    records = own_records(books, trip.trip_id)
    assert {k: r.status for k, r in records.items()} == {
        k: ppb.RESERVATION_STATUS_CANCELLED for k in PARTICIPANTS
    }
    final = books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=trip.trip_id), timeout=5)
    assert final.status == cpb.TRIP_STATUS_ABORTED  # a late CAR_RESERVED confirmed nothing
    assert final.legs[2].status == cpb.LEG_STATUS_CANCELLED


@contextmanager
def _car_cut_off(mesh: Mesh) -> Iterator[None]:
    """The car's link to the broker disabled (its proxy), then restored."""
    toxiproxy = Toxiproxy(mesh.layout.host, mesh.layout.ports[TOXIPROXY])
    toxiproxy.disable("car-to-broker")
    try:
        yield
    finally:
        toxiproxy.enable("car-to-broker")


def _book_stuck(books: Books, key: str) -> cpb.Trip:
    """A choreographed booking whose car never hears of it: NEEDS_ATTENTION, answered."""
    request = trip_request(key, cpb.PROTOCOL_CHOREOGRAPHY, flight="FX", hotel="HX", car="CX")
    trip = books.coordinator.BookTrip(request, timeout=STUCK_AFTER + 10).trip
    assert trip.status == cpb.TRIP_STATUS_NEEDS_ATTENTION, trip
    return trip


def _operator(mesh: Mesh) -> coordinator_pb2_grpc.OperatorStub:
    channel = grpc.insecure_channel(mesh.layout.operator_address)
    return coordinator_pb2_grpc.OperatorStub(channel)


def _token(mesh: Mesh) -> tuple[tuple[str, str], ...]:
    """The first operator's token, as `make up` wrote it."""
    line = (mesh.data_dir / auth.SECRETS / auth.OPERATORS).read_text().splitlines()[0]
    return auth.bearer(line.split(" ", 1)[1].strip())


def _scrape(address: str) -> dict[str, float]:
    """Every sample of a /metrics page: {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_the_choreography_is_measured_where_it_happens(mesh: tuple[Mesh, Books]) -> None:
    started, books = mesh
    request = trip_request("chor-metrics", cpb.PROTOCOL_CHOREOGRAPHY, flight="FX", hotel="HX",
                           car="CX")  # fmt: skip
    assert books.coordinator.BookTrip(request, timeout=20).trip.status == cpb.TRIP_STATUS_CONFIRMED
    lay = started.layout
    flight = _scrape(lay.address(admin_name("flight")))
    car = _scrape(lay.address(admin_name("car")))
    coordinator = _scrape(lay.address(admin_name(COORDINATOR)))
    # The flight reacts to TRIP_REQUESTED, the car to HOTEL_RESERVED; the coordinator follows all.
    assert flight['tripmesh_choreography_events_total{kind="trip_requested"}'] >= 1
    assert car['tripmesh_choreography_events_total{kind="hotel_reserved"}'] >= 1
    assert coordinator['tripmesh_choreography_events_total{kind="car_reserved"}'] >= 1
    assert car['tripmesh_choreography_event_lag_seconds_count{kind="hotel_reserved"}'] >= 1
    # Everything committed has been published.
    assert flight["tripmesh_outbox_depth"] == coordinator["tripmesh_outbox_depth"] == 0
