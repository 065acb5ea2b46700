"""Who may call what: bearer tokens for the operator plane and for the mesh's own calls.

Two kinds of caller are told apart from a client:

- an *operator*, who may act on trips (the coordinator's `Operator` service).
  Operators are listed in DATA_DIR/secrets/operators, one `NAME TOKEN` a line;
  the name is the identity the timeline records. `make up` creates the file
  with one operator (the user who ran it) and writes that operator's own token
  to DATA_DIR/secrets/operator.token, which the CLI reads.
- the *mesh*: the coordinator calling a participant's protocol steps
  (Prepare, Commit, Reserve, Cancel...), and a participant asking the
  coordinator for a decision (`Decisions`). They share DATA_DIR/secrets/mesh.token.

With TLS on (tripmesh.runtime.tls), a guarded method also checks the
caller's certificate: a participant's steps accept only the coordinator's,
the coordinator's decisions only a participant's.

Every secret file is created owner-only (0600, in a 0700 folder). A call to a
guarded method without credentials gets UNAUTHENTICATED, with credentials that
are not valid PERMISSION_DENIED, and its handler never runs, so nothing is
written. Reads (trips, inventory, search, health, reflection) stay open.

A server whose data folder has no secrets folder enforces nothing, and says
so at start-up: the tests that run a bare process rely on that; `make up`
and the chaos lab always create the secrets.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from tripmesh.runtime.rpc import MethodWrapper
from tripmesh.runtime.tls import peer_names

log = logging.getLogger(__name__)

HEADER = "authorization"
SCHEME = "Bearer "
SECRETS = "secrets"
MESH_TOKEN = "mesh.token"
OPERATORS = "operators"
OPERATOR_TOKEN = "operator.token"

#: The identity of the caller of the method now running ("" when it is not guarded).
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("tripmesh_caller", default="")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that presents `token`."""
    return ((HEADER, SCHEME + token),)


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)


def ensure_secrets(data_dir: Path, operator: str) -> None:
    """Create the mesh token and one operator (`operator`) if the folder has none."""
    folder = data_dir / SECRETS
    if not (folder / MESH_TOKEN).exists():
        _write_secret(folder / MESH_TOKEN, secrets.token_urlsafe(32) + "\n")
    if not (folder / OPERATORS).exists():
        token = secrets.token_urlsafe(32)
        _write_secret(folder / OPERATORS, f"{_identity(operator)} {token}\n")
        _write_secret(folder / OPERATOR_TOKEN, token + "\n")


def _identity(name: str) -> str:
    cleaned = "".join(c for c in name if c.isalnum() or c in "._-@")
    return cleaned or "operator"


@dataclass(frozen=True)
class Credentials:
    """The tokens a server accepts, by the identity each one stands for; with TLS, also
    the certificates (common names) the caller must present (empty: any the CA signed)."""

    by_token: Mapping[str, str]
    peers: frozenset[str] = frozenset()

    def requiring_peers(self, peers: Iterable[str]) -> Credentials:
        return replace(self, peers=frozenset(peers))

    def who(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """The caller's identity; "" without credentials; None with invalid ones."""
        presented = next((str(v) for k, v in metadata or () if k == HEADER), "")
        if not presented:
            return ""
        token = presented.removeprefix(SCHEME).strip()
        for known, identity in self.by_token.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return identity
        return None


def mesh_credentials(data_dir: Path) -> Credentials | None:
    """The mesh's own token, if its data folder has one."""
    token = read_mesh_token(data_dir)
    return None if token is None else Credentials({token: "mesh"})


def read_mesh_token(data_dir: Path) -> str | None:
    path = data_dir / SECRETS / MESH_TOKEN
    return path.read_text().strip() if path.exists() else None


def operator_credentials(data_dir: Path) -> Credentials | None:
    """Every operator's token, if the data folder lists operators."""
    path = data_dir / SECRETS / OPERATORS
    if not path.exists():
        return None
    by_token = {}
    for line in path.read_text().splitlines():
        name, _, token = line.strip().partition(" ")
        if name and token.strip():
            by_token[token.strip()] = name
    return Credentials(by_token)


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class Guard(MethodWrapper):
    """Refuses the guarded methods to callers without valid credentials.

    `rules` maps a full service name (tripmesh.v1.Operator) or method path
    (/tripmesh.v1.Participant/Prepare) to the credentials it needs. Unary
    methods only (every guarded method is one). The check itself is a
    metadata scan and a constant-time compare.
    """

    def __init__(self, rules: Mapping[str, Credentials]) -> None:
        super().__init__()
        self.rules = dict(rules)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service = method.strip("/").partition("/")[0]
        credentials = self.rules.get(method) or self.rules.get(service)
        if credentials is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _guarded(handler.unary_unary, credentials, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _guarded(inner: Handler, credentials: Credentials, method: str) -> Handler:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        identity = credentials.who(context.invocation_metadata())
        if identity == "":
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs credentials: metadata '{HEADER}: {SCHEME}<token>'",
            )
        if identity is None:
            log.warning("refused %s: credentials not valid here", method)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"not allowed to call {method}")
        if credentials.peers and not credentials.peers.intersection(peer_names(context)):
            log.warning("refused %s: certificate %s", method, peer_names(context) or "none")
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} accepts only the certificate of {', '.join(sorted(credentials.peers))}",
            )
        token = CALLER.set(identity or "")
        try:
            return await inner(request, context)
        finally:
            CALLER.reset(token)

    return guarded
