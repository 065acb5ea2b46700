"""Our one door to the Toxiproxy server: toxiproxy-python, with its gaps filled here.

The project's Toxiproxy client is `toxiproxy-python`. Its gaps, and how this
module deals with them, so that the rest of the code never has to:

- It keeps the server's address in class attributes of `APIConsumer`, shared by
  the whole process. Each `Toxiproxy` here uses its own subclass of
  `APIConsumer` with its own host and port, so two meshes can be driven from
  one process (a test and a running `make up`).
- Its high-level objects call `requests` without a timeout, so a hung server
  hangs the caller. We go through its `APIConsumer`, which passes keyword
  arguments down to `requests`, and give every call a timeout.
- It cannot update a toxic, and it enables/disables proxies with POST where
  Toxiproxy 2.6+ prefers PATCH. Both are PATCH requests here, answered through
  the library's own response validation.
- Its exceptions (and `requests`') are translated into `ToxiproxyError` at
  this boundary; results are frozen dataclasses, not its mutable objects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import requests
from toxiproxy.api import APIConsumer, validate_response
from toxiproxy.exceptions import InvalidToxic, NotFound, ProxyExists

from tripmesh.mesh.errors import MeshError

DEFAULT_TIMEOUT = 5.0


class ToxiproxyError(MeshError):
    """Anything that went wrong talking to Toxiproxy."""


class ToxiproxyUnreachable(ToxiproxyError):
    """No answer from the API (not started yet, gone, or too slow)."""


class ToxiproxyNotFound(ToxiproxyError):
    """The proxy or toxic named does not exist."""


class ToxiproxyRejected(ToxiproxyError):
    """The server refused the request (bad toxic, name taken, other 4xx/5xx)."""


@dataclass(frozen=True)
class Toxic:
    """A toxic on one proxy, as the server reports it."""

    name: str
    type: str
    #: "downstream" (server -> client) or "upstream" (client -> server).
    stream: str
    #: Probability (0..1) that a new connection is affected; decided once per connection.
    toxicity: float
    attributes: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Toxic:
        return cls(
            name=data["name"],
            type=data["type"],
            stream=data.get("stream", "downstream"),
            toxicity=float(data.get("toxicity", 1.0)),
            attributes=MappingProxyType(dict(data.get("attributes") or {})),
        )


@dataclass(frozen=True)
class Proxy:
    """One proxy (one edge of the mesh) as the server reports it."""

    name: str
    listen: str
    upstream: str
    enabled: bool
    toxics: tuple[Toxic, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Proxy:
        return cls(
            name=data["name"],
            listen=data["listen"],
            upstream=data["upstream"],
            enabled=bool(data["enabled"]),
            toxics=tuple(Toxic.from_json(t) for t in data.get("toxics") or ()),
        )


class Toxiproxy:
    """A client for one Toxiproxy server's HTTP API."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 8474, *, timeout: float = DEFAULT_TIMEOUT
    ):
        self.host = host
        self.port = port
        self.timeout = timeout
        # Our own subclass: the library reads host and port from `cls`, so this
        # client's address never leaks into another client's calls.
        self._api: type[APIConsumer] = type(
            "APIConsumer", (APIConsumer,), {"host": host, "port": port}
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _call(self, what: str, send: Callable[[], requests.Response]) -> Any:
        try:
            response = send()
        except NotFound as exc:
            raise ToxiproxyNotFound(f"{what}: not found ({_text(exc)})") from exc
        except (ProxyExists, InvalidToxic) as exc:
            raise ToxiproxyRejected(f"{what}: {_text(exc)}") from exc
        except requests.RequestException as exc:
            raise ToxiproxyUnreachable(f"{what}: no answer from {self.url}: {exc}") from exc
        # The library only checks 400, 404 and 409.
        if not response.ok:
            raise ToxiproxyRejected(f"{what}: HTTP {response.status_code}: {response.text.strip()}")
        return response.json() if response.content else None

    def _get(self, path: str) -> Any:
        return self._call(f"GET {path}", lambda: self._api.get(path, timeout=self.timeout))

    def _post(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        return self._call(
            f"POST {path}", lambda: self._api.post(path, json=body, timeout=self.timeout)
        )

    def _delete(self, path: str) -> Any:
        return self._call(f"DELETE {path}", lambda: self._api.delete(path, timeout=self.timeout))

    def _patch(self, path: str, body: Mapping[str, Any]) -> Any:
        # Not in the library: PATCH with the same validation as its other verbs.
        return self._call(
            f"PATCH {path}",
            lambda: validate_response(
                requests.patch(self.url + path, json=body, timeout=self.timeout)
            ),
        )

    def version(self) -> str:
        """The server's version; raises ToxiproxyUnreachable while it is not up."""
        reply = self._get("/version")
        return str(reply.get("version", "")) if isinstance(reply, dict) else str(reply)

    def proxies(self) -> dict[str, Proxy]:
        """Every proxy on the server, by name."""
        return {name: Proxy.from_json(data) for name, data in self._get("/proxies").items()}

    def proxy(self, name: str) -> Proxy:
        """One proxy, with its toxics."""
        return Proxy.from_json(self._get(f"/proxies/{name}"))

    def create_proxy(self, name: str, listen: str, upstream: str) -> Proxy:
        """A new proxy, enabled: `listen` (host:port) forwards to `upstream`."""
        body = {"name": name, "listen": listen, "upstream": upstream, "enabled": True}
        return Proxy.from_json(self._post("/proxies", body))

    def delete_proxy(self, name: str) -> None:
        """Remove a proxy and close its connections."""
        self._delete(f"/proxies/{name}")

    def enable(self, name: str) -> Proxy:
        """Start listening again on the proxy's port."""
        return Proxy.from_json(self._patch(f"/proxies/{name}", {"enabled": True}))

    def disable(self, name: str) -> Proxy:
        """Stop listening and drop every open connection: a clean partition."""
        return Proxy.from_json(self._patch(f"/proxies/{name}", {"enabled": False}))

    @contextlib.contextmanager
    def disabled(self, name: str) -> Iterator[Proxy]:
        """Disable `name` for the duration of the block; re-enable it even on error."""
        proxy = self.disable(name)
        try:
            yield proxy
        finally:
            self.enable(name)

    def add_toxic(
        self,
        proxy: str,
        kind: str,
        *,
        name: str | None = None,
        stream: str = "downstream",
        toxicity: float = 1.0,
        attributes: Mapping[str, Any] | None = None,
    ) -> Toxic:
        """Add a toxic of `kind` (latency, timeout, reset_peer...), named KIND_STREAM by default."""
        body = {
            "name": name or f"{kind}_{stream}",
            "type": kind,
            "stream": stream,
            "toxicity": toxicity,
            "attributes": dict(attributes or {}),
        }
        return Toxic.from_json(self._post(f"/proxies/{proxy}/toxics", body))

    def update_toxic(
        self,
        proxy: str,
        name: str,
        *,
        toxicity: float | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> Toxic:
        """Change a toxic's toxicity or attributes in place (no gap without it)."""
        body: dict[str, Any] = {}
        if toxicity is not None:
            body["toxicity"] = toxicity
        if attributes is not None:
            body["attributes"] = dict(attributes)
        return Toxic.from_json(self._patch(f"/proxies/{proxy}/toxics/{name}", body))

    def remove_toxic(self, proxy: str, name: str) -> None:
        """Remove one toxic from a proxy."""
        self._delete(f"/proxies/{proxy}/toxics/{name}")

    def reset(self) -> None:
        """Heal everything: enable every proxy and remove every toxic."""
        self._post("/reset")


def _text(exc: Exception) -> str:
    arg = exc.args[0] if exc.args else ""
    return arg.decode(errors="replace").strip() if isinstance(arg, bytes) else str(arg)
