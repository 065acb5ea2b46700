"""The coordinator's admin HTTP port: Prometheus metrics, a small JSON API, and the operator page.

    GET /metrics                      Prometheus exposition
    GET /                             the operator page (operator_page.html)
    GET /api/summary                  trips by status, and units held (of them pending under
                                      a semantic lock) and confirmed per service
    GET /api/trips?status=&protocol=&limit=&page_token=   trips, newest first
    GET /api/trips/<trip_id>          one trip with its timeline

Trips are the same JSON as the gRPC API's (protobuf's JSON mapping). Requests
are served on the HTTP server's own threads; they read the trip store through
its port (`TripStore`, whose reads never wait for a write), handing each read
to the coordinator's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Coroutine
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import grpc
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coordinator.convert import trip_to_proto
from coordinator.domain import LegKind, Protocol, TripStatus
from coordinator.metrics import CoordinatorMetrics
from coordinator.store import TripStore
from tripmesh.runtime import tls
from tripmesh.runtime.paging import position_from_token
from tripmesh.v1 import participant_pb2, participant_pb2_grpc

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("operator_page.html")
T = TypeVar("T")
_MAX_LIMIT = 500


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
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """Start serving; call from the coordinator's event loop (reads are handed to it).
        `credentials`: TLS to the participants."""
        self.store = store
        self.metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._channels = {k: tls.dial(a, credentials) for k, a in participants.items()}
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
        for channel in self._channels.values():
            channel.close()

    def _read(self, query: Coroutine[Any, Any, T]) -> T:
        """Run a store read on the event loop, from an HTTP thread."""
        return asyncio.run_coroutine_threadsafe(query, self._loop).result(timeout=10)

    # -- the JSON API ---------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        counts = self._read(self.store.counts())
        services: dict[str, Any] = {}
        for kind, channel in self._channels.items():
            try:
                reply = participant_pb2_grpc.ParticipantStub(channel).SummarizeInventory(
                    participant_pb2.SummarizeInventoryRequest(), timeout=2
                )
            except grpc.RpcError as exc:
                services[kind.value] = {"error": exc.code().name}
                continue
            services[kind.value] = {
                "held": sum(r.held for r in reply.resources),
                "pending": sum(r.pending for r in reply.resources),
                "confirmed": sum(r.confirmed for r in reply.resources),
                "resources": [_json(r) for r in reply.resources],
            }
        return {
            "trips": {s.value: counts.get(s, 0) for s in TripStatus},
            "in_doubt": self._read(self.store.in_doubt()),
            "services": services,
        }

    def trips(self, query: dict[str, str]) -> dict[str, Any]:
        status = _choice(query.get("status", ""), {s.value: s for s in TripStatus}, "status")
        protocol = _choice(query.get("protocol", ""), {p.value: p for p in Protocol}, "protocol")
        limit = min(int(query.get("limit", "50") or 50), _MAX_LIMIT)
        before = position_from_token(query.get("page_token", ""))
        found, last = self._read(
            self.store.list_trips(status=status, protocol=protocol, before=before, limit=limit)
        )
        return {
            "trips": [_json(trip_to_proto(t)) for t in found],
            "next_page_token": str(last) if last is not None else "",
        }

    def trip(self, trip_id: str) -> dict[str, Any] | None:
        found = self._read(self.store.get(trip_id))
        if found is None:
            return None
        return _json(trip_to_proto(found, self._read(self.store.events(trip_id))))

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
                except Exception:
                    log.exception("admin request %s failed", self.path)
                    self._send_json(500, {"error": "internal error; see the coordinator log"})

        return Handler


def _choice(value: str, options: dict[str, Any], field: str) -> Any:
    if not value:
        return None
    if value not in options:
        raise ValueError(f"{field}: {value!r} is not one of {', '.join(sorted(options))}")
    return options[value]
