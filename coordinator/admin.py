"""The coordinator's admin HTTP port: Prometheus metrics, a small JSON API, and the operator page.

    GET /metrics                      Prometheus exposition
    GET /                             the operator page (operator_page.html)
    GET /api/summary                  trips by status, and units held (of them pending under
                                      a semantic lock) and confirmed per service
    GET /api/trips?status=&protocol=&q=&since=&until=&limit=&page_token=
                                      trips, newest first; q: a trip id, idempotency key
                                      or customer id; since/until: ISO 8601 (UTC if bare)
    GET /api/trips/<trip_id>          one trip with its timeline
    POST /api/trips/<trip_id>/retry|compensate|resolve   {"reason": "...", "force": false}
                                      an operator action; `Authorization: Bearer <token>`

Trips are the same JSON as the gRPC API's (protobuf's JSON mapping). Requests
are served on the HTTP server's own threads; they read the trip store through
its port (`TripStore`, whose reads never wait for a write), handing each read
to the coordinator's event loop.

The summary says, per service, whether it answered through its edge (the
`coordinator-to-<kind>` proxy) and, when it did not, whether it answers
directly: a cut edge is not a dead service. The edges' own state (enabled,
toxics) comes from Toxiproxy's API, when the coordinator is told where it is
(`--toxiproxy-api`, as `make up` does).

An action needs an operator's token (DATA_DIR/secrets/operators, as on the
gRPC operator plane): without one it gets 401, with one that is not valid 403,
and nothing is done; the timeline records the operator the token names. The
token travels in a header, never a cookie, so another site cannot make a
browser act on an operator's behalf.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
import threading
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import grpc
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coordinator.convert import trip_to_proto
from coordinator.domain import LegKind, Protocol, Trip, TripStatus
from coordinator.metrics import CoordinatorMetrics
from coordinator.operations import OperatorActions
from coordinator.store import TripQuery, TripStore
from tripmesh.mesh.toxiproxy import Toxiproxy, ToxiproxyError
from tripmesh.runtime import auth, tls
from tripmesh.runtime.errors import ErrorKind, TripmeshError
from tripmesh.runtime.fields import MAX_ID, quote
from tripmesh.runtime.paging import position_from_token
from tripmesh.v1 import participant_pb2, participant_pb2_grpc

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("operator_page.html")
T = TypeVar("T")
_MAX_LIMIT = 500
_MAX_BODY = 16_384
_ACTION = re.compile(r"/api/trips/([^/]+)/(retry|compensate|resolve)")
_ACTION_WAIT = 5.0  # seconds an action waits for the trip to end before answering
_HTTP_STATUS = {
    ErrorKind.INVALID: HTTPStatus.BAD_REQUEST,
    ErrorKind.NOT_FOUND: HTTPStatus.NOT_FOUND,
    ErrorKind.CONFLICT: HTTPStatus.CONFLICT,
    ErrorKind.PRECONDITION: HTTPStatus.CONFLICT,
    ErrorKind.EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    ErrorKind.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
}


class HttpError(Exception):
    """An answer other than 200, with the JSON body to send."""

    def __init__(
        self, status: HTTPStatus, message: str, *, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **(extra or {})}


def _json(message: Any) -> dict[str, Any]:
    found: dict[str, Any] = MessageToDict(message, preserving_proto_field_name=True)
    return found


class AdminServer:
    """Serves the admin port on a background thread until `close`."""

    def __init__(
        self,
        address: str,
        store: TripStore,
        metrics: CoordinatorMetrics,
        participants: dict[LegKind, str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        actions: OperatorActions | None = None,
        operators: auth.Credentials | None = None,
        toxiproxy_api: str = "",
    ) -> None:
        """Start serving; call from the coordinator's event loop (reads are handed to it).

        `credentials`: TLS to the participants; `actions` and `operators`: the
        operator actions and who may take them (None: no actions here);
        `toxiproxy_api`: host:port of Toxiproxy's API, for the edges' state.
        """
        self.store = store
        self.metrics = metrics
        self.actions = actions
        self.operators = operators
        self._loop = asyncio.get_running_loop()
        self._credentials = credentials
        self._channels = {k: tls.dial(a, credentials) for k, a in participants.items()}
        self._direct: dict[str, grpc.Channel] = {}  # by address, made on first need
        self._direct_lock = threading.Lock()
        host, _, api_port = toxiproxy_api.rpartition(":")
        self._toxiproxy = Toxiproxy(host, int(api_port), timeout=1.0) if toxiproxy_api else None
        metrics.watch_store(
            lambda: self._read(store.counts()), lambda: self._read(store.in_doubt())
        )
        host, _, port = address.rpartition(":")
        self.httpd = ThreadingHTTPServer((host, int(port)), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="admin", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for channel in [*self._channels.values(), *self._direct.values()]:
            channel.close()

    def _read(self, query: Coroutine[Any, Any, T]) -> T:
        """Run a store read on the event loop, from an HTTP thread."""
        return asyncio.run_coroutine_threadsafe(query, self._loop).result(timeout=10)

    # -- the JSON API ---------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        counts = self._read(self.store.counts())
        edges = self._edges()
        services: dict[str, Any] = {}
        for kind, channel in self._channels.items():
            edge = f"coordinator-to-{kind.value}"
            try:
                services[kind.value] = {**self._figures(channel), "via": edge}
                continue
            except grpc.RpcError as exc:
                entry: dict[str, Any] = {"error": exc.code().name, "edge": edge}
            # Not through its edge: is it the edge or the service?
            proxy = (edges or {}).get(edge)
            if proxy is not None:
                try:
                    entry |= {**self._figures(self._direct_channel(proxy["upstream"])), "via": ""}
                except grpc.RpcError as exc:
                    entry["direct_error"] = exc.code().name
            services[kind.value] = entry
        return {
            "trips": {s.value: counts.get(s, 0) for s in TripStatus},
            "in_doubt": self._read(self.store.in_doubt()),
            "services": services,
            "edges": list(edges.values()) if edges is not None else None,
            "actions": self.actions is not None and self.operators is not None,
        }

    @staticmethod
    def _figures(channel: grpc.Channel) -> dict[str, Any]:
        reply = participant_pb2_grpc.ParticipantStub(channel).SummarizeInventory(
            participant_pb2.SummarizeInventoryRequest(), timeout=2
        )
        return {
            "held": sum(r.held for r in reply.resources),
            "pending": sum(r.pending for r in reply.resources),
            "confirmed": sum(r.confirmed for r in reply.resources),
            "resources": [_json(r) for r in reply.resources],
        }

    def _direct_channel(self, address: str) -> grpc.Channel:
        with self._direct_lock:
            if address not in self._direct:
                self._direct[address] = tls.dial(address, self._credentials)
            return self._direct[address]

    def _edges(self) -> dict[str, dict[str, Any]] | None:
        """Every Toxiproxy proxy by name, as JSON; None when Toxiproxy is unknown or silent."""
        if self._toxiproxy is None:
            return None
        try:
            proxies = self._toxiproxy.proxies()
        except ToxiproxyError as exc:
            log.debug("toxiproxy did not answer: %s", exc.message)
            return None
        return {
            name: {
                "name": name,
                "listen": p.listen,
                "upstream": p.upstream,
                "enabled": p.enabled,
                "toxics": [f"{t.type} ({t.stream})" for t in p.toxics],
            }
            for name, p in sorted(proxies.items())
        }

    def trips(self, query: dict[str, str]) -> dict[str, Any]:
        text = query.get("q", "").strip()
        if len(text) > MAX_ID or not text.isprintable():
            raise ValueError(f"q: {quote(text)} is not a trip id, key or customer id")
        since, until = (
            _time(query.get("since", ""), "since"),
            _time(query.get("until", ""), "until"),
        )
        if since is not None and until is not None and until <= since:
            raise ValueError("until: must be after since")
        trip_query = TripQuery(
            status=_choice(query.get("status", ""), {s.value: s for s in TripStatus}, "status"),
            protocol=_choice(query.get("protocol", ""), {p.value: p for p in Protocol}, "protocol"),
            text=text,
            created_after=since,
            created_before=until,
        )
        try:
            limit = min(int(query.get("limit", "50") or 50), _MAX_LIMIT)
        except ValueError:
            raise ValueError(f"limit: {quote(query['limit'])} is not a number") from None
        if limit < 1:
            raise ValueError("limit: must be at least 1")
        before = position_from_token(query.get("page_token", ""))
        found, last = self._read(self.store.list_trips(trip_query, before=before, limit=limit))
        return {
            "trips": [_json(trip_to_proto(t)) for t in found],
            "next_page_token": str(last) if last is not None else "",
        }

    def trip(self, trip_id: str) -> dict[str, Any] | None:
        found = self._read(self.store.get(trip_id))
        if found is None:
            return None
        return _json(trip_to_proto(found, self._read(self.store.events(trip_id))))

    def act(
        self, trip_id: str, action: str, authorization: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Take an operator action for the operator `authorization` names; the trip after it."""
        actions = self.actions
        if actions is None or self.operators is None:
            raise HttpError(
                HTTPStatus.FORBIDDEN,
                "operator actions are off here: the coordinator has no operators"
                " (DATA_DIR/secrets/operators, which `make up` creates)",
            )
        operator = self.operators.who([(auth.HEADER, authorization)] if authorization else [])
        if operator == "":
            raise HttpError(
                HTTPStatus.UNAUTHORIZED,
                f"{action} needs an operator's token: 'Authorization:"
                f" {auth.SCHEME}<token>' (DATA_DIR/secrets/operator.token)",
            )
        if operator is None:
            log.warning("admin: refused %s of %s: token not valid", action, quote(trip_id))
            raise HttpError(HTTPStatus.FORBIDDEN, "that token is not an operator's")
        reason, force = body.get("reason", ""), body.get("force", False)
        if not isinstance(reason, str):
            raise HttpError(HTTPStatus.BAD_REQUEST, "reason: must be text")
        if not isinstance(force, bool):
            raise HttpError(HTTPStatus.BAD_REQUEST, "force: must be true or false")
        work: dict[str, Callable[[], Coroutine[Any, Any, Trip]]] = {
            "retry": lambda: actions.retry(trip_id, operator, reason, wait=_ACTION_WAIT),
            "compensate": lambda: actions.force_compensation(
                trip_id, operator, reason, wait=_ACTION_WAIT
            ),
            "resolve": lambda: actions.mark_resolved(trip_id, operator, reason, force=force),
        }
        log.info("admin: %s %s trip %s (%s)", operator, action, trip_id, quote(reason))
        try:
            asyncio.run_coroutine_threadsafe(work[action](), self._loop).result(
                timeout=_ACTION_WAIT + 10
            )
        except TripmeshError as exc:
            fields = [{"field": v.field, "description": v.description} for v in exc.violations]
            raise HttpError(_HTTP_STATUS[exc.kind], exc.message, extra={"fields": fields}) from None
        found = self.trip(trip_id)
        assert found is not None  # the action found it
        return found

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        admin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("admin %s", format % args)

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                if status == HTTPStatus.UNAUTHORIZED:
                    self.send_header("WWW-Authenticate", 'Bearer realm="tripmesh operators"')
                self.end_headers()
                self.wfile.write(body)

            def _send_json(self, status: int, data: Any) -> None:
                self._send(status, json.dumps(data).encode(), "application/json")

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                try:
                    if url.path == "/metrics":
                        self._send(
                            200, generate_latest(admin.metrics.registry), CONTENT_TYPE_LATEST
                        )
                    elif url.path in ("/", "/index.html"):
                        self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
                    elif url.path == "/api/summary":
                        self._send_json(200, admin.summary())
                    elif url.path == "/api/trips":
                        self._send_json(200, admin.trips(query))
                    elif url.path.startswith("/api/trips/"):
                        found = admin.trip(url.path.removeprefix("/api/trips/"))
                        if found is None:
                            self._send_json(404, {"error": "no such trip"})
                        else:
                            self._send_json(200, found)
                    else:
                        self._send_json(404, {"error": f"no route {url.path}"})
                except ValueError as exc:
                    self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
                except TripmeshError as exc:
                    self._send_json(_HTTP_STATUS[exc.kind], {"error": exc.message})
                except Exception:
                    log.exception("admin request %s failed", self.path)
                    self._send_json(500, {"error": "internal error; see the coordinator log"})

            def do_POST(self) -> None:
                url = urlsplit(self.path)
                try:
                    matched = _ACTION.fullmatch(url.path)
                    if matched is None:
                        raise HttpError(HTTPStatus.NOT_FOUND, f"no route POST {url.path[:80]}")
                    body = self._json_body()
                    trip = admin.act(
                        matched.group(1),
                        matched.group(2),
                        self.headers.get("Authorization", ""),
                        body,
                    )
                    self._send_json(200, trip)
                except HttpError as exc:
                    self._send_json(exc.status, exc.body)
                except Exception:
                    log.exception("admin request POST %s failed", self.path)
                    self._send_json(500, {"error": "internal error; see the coordinator log"})

            def _json_body(self) -> dict[str, Any]:
                if self.headers.get_content_type() != "application/json":
                    raise HttpError(
                        HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send a JSON body (application/json)"
                    )
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    raise HttpError(
                        HTTPStatus.BAD_REQUEST, "Content-Length: not a number"
                    ) from None
                if not 0 <= length <= _MAX_BODY:
                    raise HttpError(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body: at most {_MAX_BODY} bytes"
                    )
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except (ValueError, UnicodeDecodeError):
                    raise HttpError(HTTPStatus.BAD_REQUEST, "body: not JSON") from None
                if not isinstance(body, dict):
                    raise HttpError(HTTPStatus.BAD_REQUEST, "body: must be a JSON object")
                return body

        return Handler


def _time(value: str, field: str) -> float | None:
    """An ISO 8601 time (UTC unless it says otherwise) as seconds since the epoch."""
    if not value:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{field}: {quote(value)} is not a time (YYYY-MM-DDTHH:MM)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _choice(value: str, options: dict[str, Any], field: str) -> Any:
    if not value:
        return None
    if value not in options:
        raise ValueError(f"{field}: {value!r} is not one of {', '.join(sorted(options))}")
    return options[value]
