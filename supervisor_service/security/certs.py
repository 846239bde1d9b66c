"""A throwaway certificate authority and the certificates an mTLS deployment needs, for trying TLS
locally and for the tests (`supervisor-service certs`; docs/design.md §13).

Keys are ECDSA P-256 (fast to make, accepted by gRPC's BoringSSL and by etcd). A certificate's first
DNS subject alternative name is the caller's identity under mTLS, and its common name says the
same, so `datanode-1.pem` is the identity `datanode-1`. Server certificates name `localhost` and
127.0.0.1 besides what they are given, so a service on loopback verifies without a server-name
override. Not for production: a real deployment takes its certificates from its own CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DAYS = 30
_BACKDATE = dt.timedelta(minutes=5)  # a peer whose clock is a little behind still accepts a fresh certificate


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write `<name>.pem` and `<name>-key.pem` (the key readable by its owner only); returns both paths."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert_path.write_bytes(self.cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)
        os.chmod(key_path, 0o600)
        return cert_path, key_path


class Authority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, common_name: str = "region-supervisor test CA", *, days: int = DEFAULT_DAYS) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def as_issued(self) -> Issued:
        return Issued(self.cert_pem, _key_pem(self._key))

    def server(self, *names: str, ips: Iterable[str] = ("127.0.0.1",), days: int = DEFAULT_DAYS) -> Issued:
        """A server certificate for `names` (and `localhost`) and `ips`; usable as a client too (etcd
        members present theirs to each other)."""
        dns = list(dict.fromkeys([*names, "localhost"]))
        return self._issue(dns, ips, days, server=True, client=True)

    def client(self, identity: str, *, days: int = DEFAULT_DAYS, valid_from: dt.datetime | None = None) -> Issued:
        """A client certificate whose first DNS SAN and CN are `identity`."""
        return self._issue([identity], (), days, server=False, client=True, valid_from=valid_from)

    def _issue(self, dns: Sequence[str], ips: Iterable[str], days: int, *, server: bool, client: bool,
               valid_from: dt.datetime | None = None) -> Issued:
        if not dns or not all(dns):
            raise ValueError(f"a certificate needs at least one name, and no empty one: {list(dns)}")
        key = ec.generate_private_key(ec.SECP256R1())
        start = valid_from or dt.datetime.now(dt.UTC) - _BACKDATE
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def write_bundle(directory: Path, *, datanodes: int = 3, operators: Sequence[str] = ("alice",),
                 server_names: Sequence[str] = (), days: int = DEFAULT_DAYS) -> dict[str, Path]:
    """A CA (`ca.pem`, `ca-key.pem`), a server certificate (`server.pem`) and client certificates
    `datanode-1..N`, `metasrv`, `ops-<name>` and `admin` in `directory`; returns each file by name
    (`"server"`, `"server-key"`, `"datanode-1"`, ...)."""
    if datanodes < 0:
        raise ValueError(f"datanodes must be 0 or more, not {datanodes}")
    ca = Authority(days=days)
    files: dict[str, Path] = {}

    def put(name: str, issued: Issued) -> None:
        files[name], files[f"{name}-key"] = issued.write(directory, name)

    put("ca", ca.as_issued())
    put("server", ca.server("region-supervisor", *server_names, days=days))
    clients = [f"datanode-{n}" for n in range(1, datanodes + 1)] + ["metasrv"] + [f"ops-{o}" for o in operators] + ["admin"]
    for identity in clients:
        put(identity, ca.client(identity, days=days))
    return files
