"""Locust: customers booking trips over gRPC through the client-to-coordinator proxy.

    locust -f loadtest/locustfile.py --host 127.0.0.1:16050 --protocol saga --shape black-friday

Each user is a customer with one long-lived channel. It books a trip from the
seeded mix in `loadtest.trips` (hot deal, spread-out trips, doomed trips that
must be refused), retries with the same idempotency key after
DEADLINE_EXCEEDED, UNAVAILABLE or RESOURCE_EXHAUSTED (the first trip comes
back, replayed), and polls GetTrip while the trip is PENDING.

Locust's tables have a row per RPC, named `METHOD PROTOCOL` (`BookTrip saga`),
reported by a client interceptor with the RPC's status code
(`DEADLINE_EXCEEDED`) as the failure text: its Aggregated row counts each
request once.

The trips are tallied apart (`TripTally`), each booking from its first attempt
to its settled outcome, by `PROTOCOL KIND OUTCOME` (`2pc hot aborted`), so
confirmed and aborted trips (sold out, compensated) are counted apart. A trip
still PENDING or NEEDS_ATTENTION when the user gives up, or never booked, is a
failed trip. At the end the tally is printed, and with TRIPMESH_LOAD_OUT (which
`make load` sets) written to OUT/trips.json, with every trip the coordinator
answered in OUT/history.jsonl (chaos.history's format, for the checker's
audit). Locust exits 1 when the share of failed trips exceeds
--max-failure-ratio (a refused, sold-out trip is not a failure: it is the
right answer).

Distributed (Locust's own --master and --worker, `make load WORKERS=N`): each
worker tallies its own users and writes OUT/tally-<pid>.json when it quits,
its users named w<index>u<n> so that workers never share a customer or a key,
and all append to one OUT/history.jsonl; `loadtest.run` merges the tallies
into trips.json (`merge_tallies`) once every process has exited, and judges
the failure ratio there.

Options (also in the web UI; env var in brackets): --protocol 2pc|3pc|saga|saga-lock|mixed
[TRIPMESH_LOAD_PROTOCOL], --shape steady|black-friday [TRIPMESH_LOAD_SHAPE],
--deadline seconds per BookTrip [TRIPMESH_LOAD_DEADLINE], --think-time mean
seconds between a user's trips, --hot-share, --doomed-share, --seed, --last-offset
(latest departure, in days from today), --max-failure-ratio [TRIPMESH_LOAD_MAX_FAILURES]. The
shape reads Locust's own --users (the peak), --spawn-rate and --run-time.
"""

from __future__ import annotations

import grpc
import grpc.experimental.gevent as grpc_gevent

# gRPC's own threads must cooperate with gevent's monkey-patched world: this has
# to run before the first channel is created.
grpc_gevent.init_gevent()

import collections
import itertools
import json
import os
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
from locust import LoadTestShape, User, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner
from locust.util.timespan import parse_timespan

from loadtest.shapes import black_friday, steady
from loadtest.tally import TripTally, judge
from loadtest.trips import CHOICES, TripMix
from tripmesh.mesh import layout as layouts
from tripmesh.runtime import tls
from tripmesh.runtime.names import TRIP_STATUS_NAMES
from tripmesh.v1 import coordinator_pb2 as pb
from tripmesh.v1 import coordinator_pb2_grpc

LABEL = "x-locust-protocol"  # metadata the interceptor reads and strips
RETRYABLE = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
MAX_ATTEMPTS = 5
POLL_EVERY = 0.25
POLL_FOR = 30.0
STATUS = TRIP_STATUS_NAMES
RUN_TAG = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
_user_numbers = itertools.count()


def _options(parser: Any) -> None:
    env = os.environ.get
    parser.add_argument(
        "--protocol",
        choices=CHOICES,
        default=env("TRIPMESH_LOAD_PROTOCOL", "mixed"),
        help="2pc, 3pc, saga, saga-lock (the saga with its semantic lock), or mixed (each"
        " trip picks 2pc or saga)",
    )
    parser.add_argument(
        "--shape",
        choices=("steady", "black-friday"),
        default=env("TRIPMESH_LOAD_SHAPE", "steady"),
        help="steady: --users for --run-time; black-friday: ramp, hold, spike, ramp down",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=float(env("TRIPMESH_LOAD_DEADLINE", "3")),
        help="seconds each BookTrip may take before it is retried with the same key",
    )
    parser.add_argument("--think-time", type=float, default=1.0, help="mean seconds between trips")
    parser.add_argument("--hot-share", type=float, default=TripMix.hot_share)
    parser.add_argument("--doomed-share", type=float, default=TripMix.doomed_share)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--max-failure-ratio",
        type=float,
        default=float(env("TRIPMESH_LOAD_MAX_FAILURES", "0.01")),
        help="exit 1 when more than this share of trips failed (not booked, or not settled)",
    )
    parser.add_argument(
        "--last-offset",
        type=int,
        default=TripMix.last_offset,
        help="latest departure booked, in days from today (inside the dates on sale)",
    )


events.init_command_line_parser.add_listener(_options)


# TRIPMESH_LOAD_OUT: where `make load` keeps the run's trips (trips.json, history.jsonl).
TALLY = TripTally(
    Path(os.environ["TRIPMESH_LOAD_OUT"]) if os.environ.get("TRIPMESH_LOAD_OUT") else None
)


def _judge(environment: Environment, **_: Any) -> None:
    """Print the trips, keep them, and fail the run above the failure ratio (a worker only
    keeps its tally, and the master has none: `loadtest.run` merges and judges)."""
    if TALLY.history is not None:
        TALLY.history.close()
    if isinstance(environment.runner, MasterRunner):
        return
    if isinstance(environment.runner, WorkerRunner):
        if TALLY.out is not None:
            TALLY.save(TALLY.out / f"tally-{os.getpid()}.json")
        return
    summary = TALLY.summary()
    options = environment.parsed_options
    summary = judge(summary, float(getattr(options, "max_failure_ratio", 0.01)))
    if TALLY.out is not None:
        (TALLY.out / "trips.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not summary["passed"]:
        environment.process_exit_code = 1


events.quitting.add_listener(_judge)


class RpcStatus(Exception):
    """A failed RPC, shown in Locust's failure table by its status code alone."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self.code = code

    def __repr__(self) -> str:
        return str(self.code.name)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Reports every unary RPC to Locust: name `METHOD PROTOCOL`, status code on failure."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        label, metadata = "", []
        for key, value in details.metadata or ():
            if key == LABEL:
                label = value
            else:
                metadata.append((key, value))
        details = _CallDetails(
            details.method,
            details.timeout,
            metadata or None,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )
        started = time.perf_counter()
        call = continuation(details, request)
        code = call.code()  # waits for the outcome
        elapsed = (time.perf_counter() - started) * 1000
        ok = code is grpc.StatusCode.OK
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"{details.method.rsplit('/', 1)[-1]} {label}".strip(),
            response_time=elapsed,
            response_length=call.result().ByteSize() if ok else 0,
            response=None,
            context={},
            exception=None if ok else RpcStatus(code),
        )
        return call


def _think(user: User) -> float:
    mean = float(user.environment.parsed_options.think_time)
    return random.uniform(0.5 * mean, 1.5 * mean)


class TripCustomer(User):
    """A customer: one channel for its life, a trip at a time."""

    host = os.environ.get("TRIPMESH_COORDINATOR") or layouts.load().client_address
    wait_time = _think

    def on_start(self) -> None:
        options = self.environment.parsed_options
        number = next(_user_numbers)
        runner = self.environment.runner
        worker = runner.worker_index if isinstance(runner, WorkerRunner) else -1
        # Workers' users apart: their own names (and keys), numbers and random streams.
        self.number = number + (worker + 1) * 1_000_000
        self.name = f"w{worker}u{number}" if worker >= 0 else f"u{number}"
        self.rng = random.Random(int(options.seed) * 1_000_003 + self.number)
        self.trips = itertools.count()
        self.mix = TripMix(
            hot_share=float(options.hot_share),
            doomed_share=float(options.doomed_share),
            last_offset=int(options.last_offset),
        )
        # A mesh started with TLS=1: `make load` says where its certificates are.
        folder = os.environ.get("TRIPMESH_TLS_DIR")
        credentials = None
        if folder:
            credentials = tls.Identity.load(Path(folder), tls.CLIENT).channel_credentials()
        self.channel = grpc.intercept_channel(
            tls.dial(self.host, credentials), LocustInterceptor(self.environment)
        )
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def book_trip(self) -> None:
        options = self.environment.parsed_options
        key = f"locust-{RUN_TAG}-{self.name}-{next(self.trips)}"
        planned = self.mix.plan(self.rng, options.protocol, key, f"customer-{self.name}")
        label = ((LABEL, planned.protocol),)
        started = time.perf_counter()
        trip: pb.Trip | None = None
        failure: str | None = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                reply = self.stub.BookTrip(
                    planned.request, timeout=float(options.deadline), metadata=label
                )
                trip = reply.trip
                break
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                failure = code.name
                if code not in RETRYABLE:
                    break
                # Same key again: the coordinator answers with the first trip.
                gevent.sleep(self.rng.uniform(0, 0.2 * 2**attempt))
        if trip is not None:
            trip = self._settle(trip, label)
            settled = trip.status in (pb.TRIP_STATUS_CONFIRMED, pb.TRIP_STATUS_ABORTED)
            failure = None if settled else STATUS[trip.status].upper()
        outcome = STATUS.get(trip.status, "?") if trip is not None else f"not booked ({failure})"
        TALLY.add(
            f"{planned.protocol} {planned.kind} {outcome}",
            (time.perf_counter() - started) * 1000,
            failed=failure is not None,
        )
        if trip is not None:
            TALLY.record(self.number, planned, trip)

    def _settle(self, trip: pb.Trip, label: tuple[tuple[str, str], ...]) -> pb.Trip:
        """Poll GetTrip while the trip is PENDING, for up to POLL_FOR seconds."""
        give_up = time.monotonic() + POLL_FOR
        while trip.status == pb.TRIP_STATUS_PENDING and time.monotonic() < give_up:
            gevent.sleep(POLL_EVERY)
            try:
                trip = self.stub.GetTrip(
                    pb.GetTripRequest(trip_id=trip.trip_id), timeout=2.0, metadata=label
                )
            except grpc.RpcError:
                continue  # reported by the interceptor; ask again
        return trip


class TripShape(LoadTestShape):
    """`steady` or `black-friday` (option --shape), sized by --users, --spawn-rate, --run-time."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        options = self.runner.environment.parsed_options
        assert options is not None
        peak = int(options.num_users or 10)
        run_time = options.run_time
        if isinstance(run_time, str):
            run_time = parse_timespan(run_time)
        now = self.get_run_time()
        if options.shape == "black-friday":
            return black_friday(now, float(run_time or 300), peak)
        return steady(now, float(run_time) if run_time else None, peak, options.spawn_rate)
