"""Operations (issue 6): metrics agree with the books, alerts name real metrics, logs
follow a trip across all four processes, and an operator finishes a stuck saga."""

from __future__ import annotations

import json
import re
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.books import eventually, trip_request
from tests.procs import stuck_saga
from tripmesh import PARTICIPANTS
from tripmesh.mesh import layout as layouts
from tripmesh.v1 import coordinator_pb2 as cpb
from tripmesh.v1 import coordinator_pb2_grpc
from tripmesh.v1 import participant_pb2 as ppb

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "coordinator" / "alert_rules.yml"
MONITORING = ROOT / "tripmesh" / "mesh" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
TWO_PC, SAGA = cpb.PROTOCOL_TWO_PHASE_COMMIT, cpb.PROTOCOL_SAGA


def scrape(address: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample on http://address/metrics, by sample name."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def declared(address: str) -> set[str]:
    """Every series name a process exports or declares (a histogram's _sum, _count, _bucket)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_sum", f"{name}_count", f"{name}_bucket"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for l, v in samples.get(name, []) if all(l.get(k) == x for k, x in labels.items()))


def metrics_address(cluster, kind: str) -> str:
    argv = cluster.services[kind].argv
    return argv[argv.index("--metrics-listen") + 1]


def _mixed_run(books) -> list[cpb.Trip]:
    trips = []
    for i, (protocol, car) in enumerate(
        [(TWO_PC, "C"), (SAGA, "C"), (TWO_PC, "C-SOLD-OUT"), (SAGA, "C-SOLD-OUT"), (SAGA, "C")]
    ):
        trips.append(
            books.coordinator.BookTrip(
                trip_request(f"m{i}", protocol, flight="FX", hotel="H", car=car), timeout=10
            ).trip
        )
    return trips


def test_metrics_agree_with_the_books(make_cluster) -> None:
    cluster, books = make_cluster()
    trips = _mixed_run(books)
    confirmed = [t for t in trips if t.status == cpb.TRIP_STATUS_CONFIRMED]
    aborted = [t for t in trips if t.status == cpb.TRIP_STATUS_ABORTED]
    assert (len(confirmed), len(aborted)) == (3, 2)

    coordinator = scrape(cluster.admin_address)
    assert total(coordinator, "tripmesh_trips_started_total") == 5
    assert total(coordinator, "tripmesh_trips_finished_total", outcome="confirmed") == 3
    assert total(coordinator, "tripmesh_trips_finished_total", outcome="aborted") == 2
    assert (
        total(coordinator, "tripmesh_trips_finished_total", protocol="saga", outcome="aborted") == 1
    )
    # Counts read from the log agree with the counters.
    assert total(coordinator, "tripmesh_trips", status="confirmed") == 3
    assert total(coordinator, "tripmesh_trips", status="pending") == 0
    assert total(coordinator, "tripmesh_trip_duration_seconds_count") == 5
    # The sold-out saga compensated hotel and flight.
    assert total(coordinator, "tripmesh_compensations_total") == 2
    # 2PC: three prepares per 2PC trip (two trips); saga: reserves only.
    assert total(coordinator, "tripmesh_step_duration_seconds_count", step="prepare") == 6

    for kind in ("flight", "hotel", "car"):
        participant = scrape(metrics_address(cluster, kind))
        summary = books.participants[kind].SummarizeInventory(
            ppb.SummarizeInventoryRequest(), timeout=5
        )
        assert total(participant, "tripmesh_participant_units", state="confirmed") == sum(
            r.confirmed for r in summary.resources
        )
        assert total(participant, "tripmesh_participant_units", state="held") == 0
        assert total(participant, "tripmesh_participant_votes_total") == 2
    car = scrape(metrics_address(cluster, "car"))
    assert total(car, "tripmesh_participant_votes_total", vote="no") == 1  # the sold-out 2PC car
    # One label name per concept: `participant`, in the coordinator and the services alike.
    assert total(car, "tripmesh_participant_votes_total", participant="car") == 2
    assert total(coordinator, "tripmesh_step_duration_seconds_count", participant="car") > 0
    # Trip durations by how the trip ended.
    assert total(coordinator, "tripmesh_trip_duration_seconds_count", outcome="aborted") == 2
    # Process and runtime collectors everywhere, and no `_created` series anywhere.
    for address in (cluster.admin_address, *(metrics_address(cluster, k) for k in PARTICIPANTS)):
        exported = declared(address)
        assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= exported
        assert "python_info" in exported
        assert not [name for name in exported if name.endswith("_created")], address
        # Start-up's heap is out of the garbage collector's walk, and its pauses are timed.
        runtime = scrape(address)
        assert total(runtime, "tripmesh_gc_frozen_objects") > 10_000, address
        assert total(runtime, "tripmesh_gc_pause_seconds_count", generation="0") > 0, address


PROMQL_WORDS = {
    "sum",
    "max",
    "rate",
    "increase",
    "by",
    "on",
    "and",
    "or",
    "unless",
    "without",
    "ignoring",
    "m",
    "d",
    "h",
    "s",
    "status",
    "outcome",
    "state",
    "participant",
    "histogram_quantile",
    "le",
    "protocol",
    "step",
    "decision",
    "action",
    "process",
    "pending",
    "needs_attention",
    "confirmed",
    "held",
}


def test_alert_rules_load_and_name_only_exported_metrics(make_cluster) -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {
        "TripSuccessRateLow",
        "CompensationFailures",
        "TripDurationHigh",
        "TooManyPendingTrips",
        "TripNeedsAttention",
        "ChoreographyStuck",
        "OutboxBacklog",
    } <= names
    assert all(r["labels"]["severity"] in ("critical", "warning") for r in rules)

    cluster, books = make_cluster()
    _mixed_run(books)
    exported = declared(cluster.admin_address)
    for kind in ("flight", "hotel", "car"):
        exported |= declared(metrics_address(cluster, kind))
    # A counter nothing has incremented yet is declared all the same.
    assert "tripmesh_compensation_failures_total" in exported
    # So are the choreographed saga's, with no broker at all in this cluster.
    assert {"tripmesh_choreography_stuck_total", "tripmesh_outbox_depth"} <= exported
    # Every alert says what to do, and so does nothing else: a runbook line each.
    assert all(r["annotations"]["runbook"].strip() for r in rules)
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [(r["alert"], r["expr"]) for r in rules]
    exprs += [(p["title"], t["expr"]) for p in panels for t in p["targets"]]
    assert len(panels) >= 10
    for name, text in exprs:
        expr = re.sub(r'"[^"]*"', "", text)  # drop label values
        words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)) - PROMQL_WORDS
        unknown = {w for w in words if w not in exported}
        assert not unknown, f"{name} names metrics nobody exports: {unknown}"
        assert words, name


def test_the_scrape_configuration_scrapes_every_declared_metrics_port() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    declared_layout = layouts.load(environ={})
    assert targets == {
        declared_layout.address(layouts.admin_name(p)) for p in ("coordinator", *PARTICIPANTS)
    }
    # Its rule file is the one the alert test checks.
    (rule_file,) = config["rule_files"]
    assert (MONITORING / rule_file).resolve() == RULES.resolve()


def test_one_grep_finds_a_trip_in_all_four_logs(make_cluster) -> None:
    cluster, books = make_cluster()
    reply = books.coordinator.BookTrip(
        trip_request("traced", TWO_PC, flight="FX", hotel="H", car="C"),
        timeout=10,
        metadata=(("x-correlation-id", "support-ticket-4711"),),
    )
    trip_id = reply.trip.trip_id

    def lines_in_every_log() -> dict[str, list[dict]]:
        found = {}
        for name, proc in [("coordinator", cluster.coordinator), *cluster.services.items()]:
            hits = [json.loads(l) for l in proc.log_text().splitlines() if trip_id in l]
            assert hits, f"no line for {trip_id} in the {name} log"
            found[name] = hits
        return found

    found = eventually(lines_in_every_log, timeout=5)
    for name, hits in found.items():
        tagged = [h for h in hits if h.get("trip_id") == trip_id]
        assert tagged, name
        assert {h["correlation_id"] for h in tagged} == {"support-ticket-4711"}, name
    # Each participant logged where its leg ended, once; the prepare on the way is DEBUG.
    for kind in PARTICIPANTS:
        steps = [h["msg"] for h in found[kind]]
        assert steps == [f"commit {trip_id}-{kind}: confirmed"], (kind, steps)


def _stuck_saga(make_cluster):
    cluster, books = make_cluster(coordinator_args=["--compensation-give-up", "2"])
    return cluster, books, stuck_saga(cluster, books)


def test_a_stuck_saga_needs_attention_and_an_operator_retry_finishes_it(make_cluster) -> None:
    cluster, books, trip = _stuck_saga(make_cluster)
    assert trip.attention == cpb.ATTENTION_COMPENSATION_FAILED
    assert "compensation of hotel failed" in trip.attention_detail
    assert trip.failure_reason.startswith("car: ")  # the cause, apart from the attention
    assert books.totals("flight", "FX") == (0, 1)  # still confirmed: a person must look
    metrics = scrape(cluster.admin_address)
    assert total(metrics, "tripmesh_compensation_failures_total", participant="hotel") == 1
    assert total(metrics, "tripmesh_trips", status="needs_attention") == 1

    operator = coordinator_pb2_grpc.OperatorStub(grpc.insecure_channel(cluster.operator_address))
    with pytest.raises(grpc.RpcError) as caught:
        operator.RetryTrip(
            cpb.OperatorActionRequest(trip_id=trip.trip_id, operator="alice"), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reason" in caught.value.details()

    cluster.services["hotel"].start(extra_env={"TRIPMESH_FAILPOINTS": ""})
    done = operator.RetryTrip(
        cpb.OperatorActionRequest(trip_id=trip.trip_id, operator="alice", reason="hotel is back"),
        timeout=15,
    )
    assert done.status == cpb.TRIP_STATUS_ABORTED
    books.assert_all_or_nothing(done)
    assert books.totals("flight", "FX") == (0, 0)
    # Retries are noted too (how many depends on backoff timing): all of the hotel's cancel.
    retried = [e for e in done.events if e.kind == "retry"]
    assert retried and {(e.leg, e.detail.split()[0]) for e in retried} == {("hotel", "cancel")}
    timeline = [(e.kind, e.leg) for e in done.events if e.kind != "retry"]
    assert timeline == [
        ("created", ""),
        ("step", "flight"),
        ("outcome", "flight"),
        ("step", "hotel"),
        ("outcome", "hotel"),
        ("step", "car"),
        ("outcome", "car"),
        ("decision", ""),
        ("attention", "hotel"),
        ("operator-retry", ""),
        ("recovery", ""),
        ("compensation", "hotel"),
        ("compensation", "flight"),
        ("finished", ""),
    ], timeline
    retry = next(e for e in done.events if e.kind == "operator-retry")
    assert (retry.actor, retry.detail) == ("alice", "hotel is back")
    # The cause stays; the compensation failure that was mended does not.
    assert done.failure_reason.startswith("car: sold out")
    assert "compensation" not in done.failure_reason
    stamps = [e.at.ToNanoseconds() for e in done.events]
    assert stamps == sorted(stamps)


def test_operator_cannot_compensate_a_committed_2pc_trip_and_can_resolve(make_cluster) -> None:
    cluster, books, trip = _stuck_saga(make_cluster)
    operator = coordinator_pb2_grpc.OperatorStub(grpc.insecure_channel(cluster.operator_address))
    confirmed = books.coordinator.BookTrip(
        trip_request("fine", TWO_PC, flight="FX", hotel="H", car="C"), timeout=10
    ).trip
    with pytest.raises(grpc.RpcError) as caught:
        operator.ForceCompensation(
            cpb.OperatorActionRequest(trip_id=confirmed.trip_id, operator="bob", reason="x"),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Resolving now would hide a confirmed seat nobody gives back: refused, legs named.
    ask = cpb.OperatorActionRequest(trip_id=trip.trip_id, operator="bob", reason="refunded")
    with pytest.raises(grpc.RpcError) as refused:
        operator.MarkResolved(ask, timeout=15)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "the hotel books could not be read" in refused.value.details()  # hotel is down
    assert f"flight still confirmed (1 units, {trip.trip_id}-flight)" in refused.value.details()
    cluster.services["hotel"].start(extra_env={"TRIPMESH_FAILPOINTS": ""})

    def refused_naming_both() -> str:
        with pytest.raises(grpc.RpcError) as still:
            operator.MarkResolved(ask, timeout=15)
        why = still.value.details()
        # Once the coordinator's channel to the hotel is back from its backoff:
        assert "hotel still confirmed" in why, why
        return why

    assert "flight still confirmed" in eventually(refused_naming_both, timeout=20)
    assert books.coordinator.GetTrip(
        cpb.GetTripRequest(trip_id=trip.trip_id), timeout=5
    ).status == (cpb.TRIP_STATUS_NEEDS_ATTENTION)
    assert books.totals("flight", "FX") == (0, 1)
    # Forced, it is resolved, and the timeline says what was left.
    ask.force = True
    resolved = operator.MarkResolved(ask, timeout=15)
    assert resolved.status == cpb.TRIP_STATUS_RESOLVED
    assert resolved.events[-1].kind == "operator-resolved" and resolved.events[-1].actor == "bob"
    assert resolved.events[-1].detail.startswith("refunded (forced; left: ")
    assert f"flight still confirmed (1 units, {trip.trip_id}-flight)" in resolved.events[-1].detail
    # Resolving is final: it cannot be resolved again, and the trip is still there.
    with pytest.raises(grpc.RpcError) as again:
        operator.MarkResolved(
            cpb.OperatorActionRequest(
                trip_id=trip.trip_id, operator="bob", reason="twice", force=True
            ),
            timeout=5,
        )
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert books.coordinator.GetTrip(cpb.GetTripRequest(trip_id=trip.trip_id), timeout=5).trip_id
