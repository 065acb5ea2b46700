"""TLS for every gRPC hop (`make up TLS=1`): a local CA, a certificate per process, mTLS.

`ensure_certificates` makes, with the `cryptography` package, a private CA and
one key and certificate per identity in DATA_DIR/secrets/tls/ (0700, keys
0600): `coordinator`, `flight`, `hotel`, `car`, and `client` (the CLI, the
operators' tools, audits and tests). Each certificate names its identity as its
common name and the mesh's host (127.0.0.1) and `localhost` as its subject
alternative names, and serves as server and client certificate alike.

With TLS on:

- a participant's listener requires a client certificate signed by the CA
  (nobody without one gets past the handshake), and its protocol steps accept
  only the `coordinator` certificate (`auth.Credentials.peers`): anyone else,
  even holding the mesh's token, gets PERMISSION_DENIED;
- the coordinator's decisions plane requires a participant's certificate; its
  client and operator planes ask for none (clients are customers; operators
  present their token), but speak only TLS;
- every channel verifies the server's certificate against the CA.

Toxiproxy forwards the TLS bytes as TCP: the handshake is end to end, so a cut
or slowed edge behaves as without TLS.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tripmesh import PARTICIPANTS
from tripmesh.runtime import rpc

FOLDER = "tls"  # under DATA_DIR/secrets
CA = "ca"
COORDINATOR = "coordinator"
CLIENT = "client"
IDENTITIES = (COORDINATOR, *PARTICIPANTS, CLIENT)
VALID_FOR = dt.timedelta(days=365)


def folder_of(data_dir: Path) -> Path:
    """Where a mesh's CA and certificates live."""
    return data_dir / "secrets" / FOLDER


@dataclass(frozen=True)
class Identity:
    """One identity's key and certificate, and the CA that every peer must be signed by."""

    name: str
    ca: bytes
    certificate: bytes
    key: bytes

    @classmethod
    def load(cls, folder: Path, name: str) -> Identity:
        try:
            return cls(
                name,
                (folder / f"{CA}.pem").read_bytes(),
                (folder / f"{name}.pem").read_bytes(),
                (folder / f"{name}.key").read_bytes(),
            )
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"no TLS identity {name!r} in {folder} ({exc.filename} is missing):"
                " `make up TLS=1` creates them"
            ) from None

    def server_credentials(self, *, require_client_certificate: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.certificate)],
            root_certificates=self.ca,
            require_client_auth=require_client_certificate,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Verify the server against the CA, and present this identity's certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.certificate
        )


def client_credentials(data_dir: Path) -> grpc.ChannelCredentials:
    """What a client of a TLS mesh (the CLI, tests, audits) presents: the `client` identity."""
    return Identity.load(folder_of(data_dir), CLIENT).channel_credentials()


def dial(addresses: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A blocking channel to `addresses` (one host:port, or several replicas, comma-separated:
    round robin over the healthy ones): TLS with `credentials`, else plaintext."""
    target, options = rpc.target(addresses), rpc.channel_options(addresses)
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def peer_names(context: grpc.aio.ServicerContext) -> list[str]:
    """The common names of the caller's verified certificate ([] without TLS)."""
    names = (context.auth_context() or {}).get("x509_common_name", [])
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def ensure_certificates(data_dir: Path, host: str = "127.0.0.1") -> Path:
    """A CA and every identity's certificate in the data folder, made once; their folder."""
    folder = folder_of(data_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if not (folder / f"{CA}.pem").exists() or not (folder / f"{CA}.key").exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tripmesh local CA")])
        now = dt.datetime.now(dt.UTC)
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(folder / f"{CA}.key", _key_bytes(ca_key), private=True)
        _write(folder / f"{CA}.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
        for identity in IDENTITIES:  # a new CA: the old certificates are worthless
            (folder / f"{identity}.pem").unlink(missing_ok=True)
    signer = serialization.load_pem_private_key((folder / f"{CA}.key").read_bytes(), None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{folder / f'{CA}.key'} is not the EC key tripmesh made")
    ca_cert = x509.load_pem_x509_certificate((folder / f"{CA}.pem").read_bytes())
    for identity in IDENTITIES:
        if not (folder / f"{identity}.pem").exists() or not (folder / f"{identity}.key").exists():
            key, cert = _issue(identity, host, signer, ca_cert)
            _write(folder / f"{identity}.key", _key_bytes(key), private=True)
            _write(folder / f"{identity}.pem", cert.public_bytes(serialization.Encoding.PEM))
    return folder


def _issue(
    identity: str, host: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(identity)]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600 if private else 0o644)
