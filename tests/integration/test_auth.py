"""Only operators act on trips, only the mesh calls its own protocol steps.

Real processes whose data folder holds the secrets `make up` creates
(tripmesh.runtime.auth). A caller without credentials gets UNAUTHENTICATED,
one with credentials that are not valid PERMISSION_DENIED, and nothing is
written either way; the operator the timeline records is the one the token
names, whatever the request's free-text field says. Reads stay open.
"""

from __future__ import annotations

import stat

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.books import Books, trip_request
from tests.procs import Cluster, stuck_saga, with_secrets
from tripmesh.runtime import auth
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import coordinator_pb2_grpc
from tripmesh.v1 import participant_pb2 as ppb

SAGA = cpb.PROTOCOL_SAGA


def _refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def _secured(make_cluster) -> tuple[Cluster, Books, str, str]:
    cluster, books = make_cluster(coordinator_args=["--compensation-give-up", "2"])
    return (cluster, books, *with_secrets(cluster))


def test_secrets_are_owner_only(make_cluster) -> None:
    cluster, _, _, _ = _secured(make_cluster)
    folder = cluster.data_dir / auth.SECRETS
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in (auth.MESH_TOKEN, auth.OPERATORS, auth.OPERATOR_TOKEN):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    assert (folder / auth.OPERATORS).read_text().split()[0] == "ada"


def test_only_an_operator_acts_and_the_timeline_names_who(make_cluster) -> None:
    cluster, books, operator_token, mesh_token = _secured(make_cluster)
    assert cluster.coordinator is not None
    # The mesh's own calls carry its token: a booking works end to end.
    fine = books.coordinator.BookTrip(
        trip_request("fine", SAGA, flight="FX", hotel="H", car="C"), timeout=10
    ).trip
    assert fine.status == cpb.TRIP_STATUS_CONFIRMED
    # A saga stuck in compensation: the hotel crashed on its Cancel; it comes back.
    stuck = stuck_saga(cluster, books)
    cluster.services["hotel"].start(extra_env={"TRIPMESH_FAILPOINTS": ""})
    before = len(stuck.events)

    channel = grpc.insecure_channel(cluster.operator_address)
    operator = coordinator_pb2_grpc.OperatorStub(channel)
    ask = cpb.OperatorActionRequest(trip_id=stuck.trip_id, operator="mallory", reason="hotel back")
    assert _refused(lambda: operator.RetryTrip(ask, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    for wrong in ("not-a-token", mesh_token):  # the mesh's token is not an operator's
        denied = _refused(
            lambda w=wrong: operator.RetryTrip(ask, timeout=10, metadata=auth.bearer(w))
        )
        assert denied == grpc.StatusCode.PERMISSION_DENIED, wrong
    unchanged = books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=stuck.trip_id), timeout=5)
    assert unchanged.status == cpb.TRIP_STATUS_NEEDS_ATTENTION
    assert len(unchanged.events) == before  # nothing written

    done = operator.RetryTrip(ask, timeout=20, metadata=auth.bearer(operator_token))
    assert done.status == cpb.TRIP_STATUS_ABORTED
    acted = next(e for e in done.events if e.kind == "operator-retry")
    assert (acted.actor, acted.detail) == ("ada", "hotel back")  # the token's name, not mallory
    channel.close()


def test_only_the_mesh_calls_a_participants_steps_and_decisions(make_cluster) -> None:
    cluster, books, operator_token, mesh_token = _secured(make_cluster)
    assert cluster.coordinator is not None
    trip = books.coordinator.BookTrip(
        trip_request("leg", SAGA, flight="FX", hotel="H", car="C"), timeout=10
    ).trip
    flight = books.participants["flight"]
    cancel = ppb.CancelRequest(reservation_id=f"{trip.trip_id}-flight", trip_id=trip.trip_id)
    # Anyone who can reach the flight service can read it, but not undo a confirmed leg.
    assert _refused(lambda: flight.Cancel(cancel, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    denied = _refused(
        lambda: flight.Cancel(cancel, timeout=5, metadata=auth.bearer(operator_token))
    )
    assert denied == grpc.StatusCode.PERMISSION_DENIED
    # Nor in a Steps call, which carries the same steps.
    steps = ppb.StepsRequest(steps=[ppb.Step(cancel=cancel)])
    assert _refused(lambda: flight.Steps(steps, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    denied = _refused(lambda: flight.Steps(steps, timeout=5, metadata=auth.bearer(operator_token)))
    assert denied == grpc.StatusCode.PERMISSION_DENIED
    assert books.totals("flight", "FX") == (0, 1)  # still confirmed: nothing written
    (leg,) = books.reservations("flight", trip.trip_id)
    assert leg.status == ppb.RESERVATION_STATUS_CONFIRMED
    # Decisions answer the mesh only.
    decisions = coordinator_pb2_grpc.DecisionsStub(grpc.insecure_channel(cluster.decisions_address))
    ask = cpb.GetDecisionRequest(trip_id=trip.trip_id)
    assert (
        _refused(lambda: decisions.GetDecision(ask, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    )
    answer = decisions.GetDecision(ask, timeout=5, metadata=auth.bearer(mesh_token))
    assert answer.decision == cpb.DECISION_COMMIT
    # The repair by hand (README) presents the mesh's token.
    undone = flight.Cancel(cancel, timeout=5, metadata=auth.bearer(mesh_token))
    assert undone.reservation.status == ppb.RESERVATION_STATUS_CANCELLED


def _listed(address: str) -> set[str]:
    """The services reflection lists at `address`."""
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([ask]), timeout=5))
    return {s.name for s in reply.list_services_response.service}


HEALTH, REFLECTION = "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"


def test_each_plane_serves_only_its_own_callers(make_cluster) -> None:
    cluster, books, operator_token, mesh_token = _secured(make_cluster)
    assert cluster.coordinator is not None
    assert _listed(cluster.coordinator.address) == {"tripmesh.v1.Coordinator", HEALTH, REFLECTION}
    assert _listed(cluster.operator_address) == {"tripmesh.v1.Operator", HEALTH, REFLECTION}
    assert _listed(cluster.decisions_address) == {"tripmesh.v1.Decisions", HEALTH, REFLECTION}

    stuck = stuck_saga(cluster, books, key="planes")
    before = books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=stuck.trip_id), timeout=5)
    ask = cpb.OperatorActionRequest(trip_id=stuck.trip_id, operator="ada", reason="try")
    # A client holding even the operator's token cannot act through the client port...
    with grpc.insecure_channel(cluster.coordinator.address) as client_port:
        unknown = _refused(
            lambda: coordinator_pb2_grpc.OperatorStub(client_port).ForceCompensation(
                ask, timeout=5, metadata=auth.bearer(operator_token)
            )
        )
        assert unknown == grpc.StatusCode.UNIMPLEMENTED
        decide = coordinator_pb2_grpc.DecisionsStub(client_port).GetDecision
        asked = cpb.GetDecisionRequest(trip_id=stuck.trip_id)
        refused = _refused(lambda: decide(asked, timeout=5, metadata=auth.bearer(mesh_token)))
        assert refused == grpc.StatusCode.UNIMPLEMENTED
    # ...nor book through the operator or the decisions plane.
    request = trip_request("wrong-plane", SAGA, flight="FX", hotel="H", car="C")
    for plane in (cluster.operator_address, cluster.decisions_address):
        with grpc.insecure_channel(plane) as channel:
            book = coordinator_pb2_grpc.CoordinatorStub(channel).BookTrip
            assert _refused(lambda b=book: b(request, timeout=5)) == grpc.StatusCode.UNIMPLEMENTED
    after = books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=stuck.trip_id), timeout=5)
    assert (after.status, len(after.events)) == (before.status, len(before.events))
    listed = books.coordinator.ListTrips(cpb.ListTripsRequest(), timeout=5).trips
    assert [t.trip_id for t in listed] == [stuck.trip_id]  # no trip booked on a wrong plane
