"""The admin HTTP port's actions and search, over real HTTP against real processes.

An action (POST /api/trips/<id>/retry|compensate|resolve) needs an operator's
token like the gRPC operator plane: without one 401, with another's 403,
malformed 400/413/415, and nothing is written for any of them; the timeline
names the operator the token names. The trips list finds a trip by id, key or
customer, within a time range, as gRPC ListTrips does by its new filters.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tests.books import Books, trip_request
from tests.procs import Cluster, stuck_saga, with_secrets
from tripmesh.v1 import coordinator_pb2 as cpb

SAGA = cpb.PROTOCOL_SAGA


def _http(
    cluster: Cluster,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str = "",
    content_type: str = "application/json",
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://{cluster.admin_address}{path}", data, method=method)
    if data is not None:
        request.add_header("Content-Type", content_type)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read()), dict(reply.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def _secured(make_cluster) -> tuple[Cluster, Books, str, str]:
    cluster, books = make_cluster(coordinator_args=["--compensation-give-up", "2"])
    return (cluster, books, *with_secrets(cluster))


def test_an_action_needs_an_operators_token_and_a_reason(make_cluster) -> None:
    cluster, books, operator_token, mesh_token = _secured(make_cluster)
    stuck = stuck_saga(cluster, books)
    cluster.services["hotel"].start(extra_env={"TRIPMESH_FAILPOINTS": ""})
    path = f"/api/trips/{stuck.trip_id}/compensate"
    before = _http(cluster, "GET", f"/api/trips/{stuck.trip_id}")[1]

    status, body, headers = _http(cluster, "POST", path, {"reason": "give it up"})
    assert status == 401 and "token" in body["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    for wrong in ("not-a-token", mesh_token):
        assert _http(cluster, "POST", path, {"reason": "x"}, token=wrong)[0] == 403
    refusals = {
        "no reason": _http(cluster, "POST", path, {}, token=operator_token),
        "reason not text": _http(cluster, "POST", path, {"reason": 7}, token=operator_token),
        "not JSON": _http(cluster, "POST", path, raw=b"{reason", token=operator_token),
        "form body": _http(
            cluster, "POST", path, raw=b"reason=x", content_type="text/plain", token=operator_token
        ),
        "huge body": _http(cluster, "POST", path, {"reason": "x" * 20_000}, token=operator_token),
        "unknown action": _http(
            cluster, "POST", f"/api/trips/{stuck.trip_id}/delete", {"reason": "x"}
        ),
    }
    assert {k: v[0] for k, v in refusals.items()} == {
        "no reason": 400,
        "reason not text": 400,
        "not JSON": 400,
        "form body": 415,
        "huge body": 413,
        "unknown action": 404,
    }
    assert "reason" in refusals["no reason"][1]["error"]
    assert [f["field"] for f in refusals["no reason"][1]["fields"]] == ["reason"]
    # Resolving while the flight is still confirmed is refused, naming the leg.
    status, body, _ = _http(
        cluster,
        "POST",
        f"/api/trips/{stuck.trip_id}/resolve",
        {"reason": "x"},
        token=operator_token,
    )
    assert status == 409 and "flight" in body["error"], body
    assert _http(cluster, "GET", f"/api/trips/{stuck.trip_id}")[1] == before  # nothing written
    missing = _http(
        cluster, "POST", "/api/trips/trip-nope/retry", {"reason": "x"}, token=operator_token
    )
    assert missing[0] == 404

    status, trip, _ = _http(cluster, "POST", path, {"reason": "give it up"}, token=operator_token)
    assert status == 200, trip
    assert trip["status"] == "TRIP_STATUS_ABORTED"
    acted = [e for e in trip["events"] if e["kind"] == "operator-compensation"]
    assert [(e["actor"], e["detail"]) for e in acted] == [("ada", "give it up")]
    assert books.totals("flight", "FX") == (0, 0) and books.totals("hotel", "H") == (0, 0)


def test_actions_are_off_without_operators(make_cluster) -> None:
    cluster, books = make_cluster(coordinator_args=["--compensation-give-up", "2"])
    stuck = stuck_saga(cluster, books)
    status, body, _ = _http(
        cluster, "POST", f"/api/trips/{stuck.trip_id}/retry", {"reason": "x"}, token="anything"
    )
    assert status == 403 and "no operators" in body["error"]
    assert _http(cluster, "GET", "/api/summary")[1]["actions"] is False


def _ids(reply: dict[str, Any]) -> list[str]:
    return [t["trip_id"] for t in reply["trips"]]


def test_trips_are_found_by_id_key_customer_and_time(make_cluster) -> None:
    cluster, books = make_cluster()
    booked = {}
    for key, customer in (("k-early", "ann"), ("k-mid", "bob"), ("k-late", "ann")):
        request = trip_request(key, SAGA, flight="FX", hotel="H", car="C")
        request.customer_id = customer
        booked[key] = books.coordinator.BookTrip(request, timeout=10).trip
        time.sleep(0.05)
    early, mid, late = (booked[k] for k in ("k-early", "k-mid", "k-late"))

    def found(query: str) -> list[str]:
        status, reply, _ = _http(cluster, "GET", f"/api/trips?{query}")
        assert status == 200, reply
        return _ids(reply)

    assert found(f"q={mid.trip_id}") == [mid.trip_id]
    assert found("q=k-late") == [late.trip_id]
    assert found("q=ann") == [late.trip_id, early.trip_id]
    assert found("q=nobody") == []
    mid_at = mid.created_at.ToDatetime().isoformat()
    assert found(f"since={mid_at}") == [late.trip_id, mid.trip_id]
    assert found(f"until={mid_at}") == [early.trip_id]
    assert found(f"q=ann&since={mid_at}") == [late.trip_id]
    for bad, field in (("since=yesterday", "since"), (f"since={mid_at}&until={mid_at}", "until")):
        status, reply, _ = _http(cluster, "GET", f"/api/trips?{bad}")
        assert status == 400 and reply["error"].startswith(field), reply
    assert _http(cluster, "GET", "/api/trips?q=" + "x" * 500)[0] == 400

    # gRPC ListTrips filters the same way.
    def listed(**filters: Any) -> list[str]:
        reply = books.coordinator.ListTrips(cpb.ListTripsRequest(**filters), timeout=5)
        return [t.trip_id for t in reply.trips]

    assert listed(customer_id="ann") == [late.trip_id, early.trip_id]
    assert listed(idempotency_key="k-mid") == [mid.trip_id]
    assert listed(customer_id="ann", created_after=mid.created_at) == [late.trip_id]
    assert listed(created_before=mid.created_at) == [early.trip_id]
    with pytest.raises(grpc.RpcError) as caught:
        listed(created_after=Timestamp(seconds=10**13))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "created_after" in (caught.value.details() or "")
