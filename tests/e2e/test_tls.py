"""`make up TLS=1`: mTLS on every gRPC hop, through the real Toxiproxy.

One booking in each protocol goes client -> proxy -> coordinator -> proxies ->
participants (and their decision queries back) over TLS; the checks around it
are the ones an attacker on the mesh's network would try: plaintext, TLS
without a certificate, a certificate from another CA that calls itself the
coordinator, and the `client` certificate with the mesh's stolen token.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.books import Books, day, trip_request
from tests.e2e.conftest import RunningMesh, isolated_env, start, stop_and_check
from tests.e2e.test_cli_mesh import _cli, _state_file_only
from tripmesh import PARTICIPANTS
from tripmesh.mesh import layout as layouts
from tripmesh.mesh.mesh import grpc_health
from tripmesh.mesh.toxiproxy import Toxiproxy
from tripmesh.runtime import auth, tls
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import coordinator_pb2_grpc, participant_pb2_grpc
from tripmesh.v1 import participant_pb2 as ppb

pytestmark = pytest.mark.e2e

PROTOCOLS = (cpb.PROTOCOL_TWO_PHASE_COMMIT, cpb.PROTOCOL_THREE_PHASE_COMMIT, cpb.PROTOCOL_SAGA)
STORY = {"flight": "JL5", "hotel": "TOKYO-GRAND", "car": "CAMRY-NRT"}


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    data_dir = tmp_path_factory.mktemp("tls-mesh")
    env = isolated_env()
    mesh = start(data_dir, env, "--tls")
    lay = mesh.layout
    credentials = tls.client_credentials(data_dir)
    books = Books.open(lay.client_address, {k: lay.address(k) for k in PARTICIPANTS}, credentials)
    try:
        yield RunningMesh(data_dir, env, mesh, Toxiproxy(lay.host, lay.ports["toxiproxy"]), books)
    finally:
        books.close()
        stop_and_check(mesh, env)


def _health(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    return grpc_health(address, timeout=3, credentials=credentials)


def _code(call) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code().name


def test_one_booking_in_each_protocol_over_mtls_through_toxiproxy(tls_mesh: RunningMesh) -> None:
    lay = tls_mesh.mesh.layout
    assert lay.tls
    for proxy in tls_mesh.toxiproxy.proxies().values():  # every hop goes through its proxy
        assert proxy.enabled
    for i, protocol in enumerate(PROTOCOLS):
        request = trip_request(f"tls-{protocol}", protocol, **STORY, offset=5 + i)
        trip = tls_mesh.books.coordinator.BookTrip(request, timeout=30).trip
        assert trip.status == cpb.TRIP_STATUS_CONFIRMED, trip
        for kind in PARTICIPANTS:
            (leg,) = tls_mesh.books.reservations(kind, trip.trip_id)
            assert leg.status == ppb.RESERVATION_STATUS_CONFIRMED
    # The CLI finds the mesh and its certificates from the data folder alone.
    booked = _cli(_state_file_only(tls_mesh), "book", "--protocol", "saga", "--date", day(9))
    assert booked.returncode == 0, booked.stdout + booked.stderr
    # The keys are the owner's only.
    folder = tls.folder_of(tls_mesh.data_dir)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for identity in (tls.CA, *tls.IDENTITIES):
        assert stat.S_IMODE((folder / f"{identity}.key").stat().st_mode) == 0o600, identity


def test_only_the_coordinators_certificate_reaches_a_participants_steps(
    tls_mesh: RunningMesh, tmp_path: Path
) -> None:
    lay = tls_mesh.mesh.layout
    folder = tls.folder_of(tls_mesh.data_dir)
    ca = (folder / "ca.pem").read_bytes()
    client = tls.client_credentials(tls_mesh.data_dir)
    # Another CA's certificate that calls itself the coordinator.
    tls.ensure_certificates(tmp_path)
    impostor = tls.Identity.load(tls.folder_of(tmp_path), tls.COORDINATOR)
    forged = grpc.ssl_channel_credentials(ca, impostor.key, impostor.certificate)
    no_certificate = grpc.ssl_channel_credentials(root_certificates=ca)

    for kind in PARTICIPANTS:
        address = lay.address(f"coordinator-to-{kind}")  # through the proxy, as the mesh dials
        assert _health(address, client) == "SERVING"
        assert _health(address, None) == "UNAVAILABLE"  # plaintext
        assert _health(address, no_certificate) == "UNAVAILABLE"
        assert _health(address, forged) == "UNAVAILABLE"
    # The client plane speaks TLS only; it needs no client certificate.
    assert _health(lay.client_address, None) == "UNAVAILABLE"
    assert _health(lay.client_address, no_certificate) == "SERVING"

    # A booked leg, and someone holding the `client` certificate and the mesh's token.
    trip = tls_mesh.books.coordinator.BookTrip(
        trip_request("tls-leg", cpb.PROTOCOL_SAGA, **STORY, offset=8), timeout=30
    ).trip
    assert trip.status == cpb.TRIP_STATUS_CONFIRMED
    mesh_token = (tls_mesh.data_dir / auth.SECRETS / auth.MESH_TOKEN).read_text().strip()
    with tls.dial(lay.address("flight"), client) as channel:
        flight = participant_pb2_grpc.ParticipantStub(channel)
        cancel = ppb.CancelRequest(reservation_id=f"{trip.trip_id}-flight", trip_id=trip.trip_id)
        refused = _code(lambda: flight.Cancel(cancel, timeout=5, metadata=auth.bearer(mesh_token)))
        assert refused == "PERMISSION_DENIED"
        (leg,) = tls_mesh.books.reservations("flight", trip.trip_id)
        assert leg.status == ppb.RESERVATION_STATUS_CONFIRMED  # nothing written
    # The decisions plane answers the participants' certificates only.
    decisions_address = lay.address(f"flight-to-{layouts.COORDINATOR}")
    with tls.dial(decisions_address, client) as channel:
        ask = cpb.GetDecisionRequest(trip_id=trip.trip_id)
        decide = coordinator_pb2_grpc.DecisionsStub(channel).GetDecision
        assert _code(lambda: decide(ask, timeout=5, metadata=auth.bearer(mesh_token))) == (
            "PERMISSION_DENIED"
        )
    flight_identity = tls.Identity.load(folder, "flight").channel_credentials()
    with tls.dial(decisions_address, flight_identity) as channel:
        decide = coordinator_pb2_grpc.DecisionsStub(channel).GetDecision
        answer = decide(
            cpb.GetDecisionRequest(trip_id=trip.trip_id),
            timeout=5,
            metadata=auth.bearer(mesh_token),
        )
        assert answer.decision == cpb.DECISION_COMMIT
