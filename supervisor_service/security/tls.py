"""TLS credentials: the gRPC server's (re-read when its files change), and a client's (docs/design.md §14.1).

The server's certificate, key and client CA are PEM files. grpcio's dynamic server credentials ask
`ServerCertificates.fetch` before each handshake; `fetch` looks at the files' (inode, size, mtime)
and re-reads them only when one changed. A new set that does not load (a half-written file, a key
that does not match the certificate, garbage) leaves the set in force serving, says so once in the
log and counts it (`outcome="rejected"`): a bad file never takes the port down. Connections already
open keep the certificate they were made with; the server's connection max age makes every client
handshake again within a bounded time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from supervisor_service.core import log_event

log = logging.getLogger("supervisor_service.tls")

_MAX_PEM_BYTES = 1024 * 1024  # a chain of a few certificates is a few KiB; a bigger file is a mistake


class TLSFileError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file and why."""


def _read(path: str | Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise TLSFileError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if len(data) > _MAX_PEM_BYTES:
        raise TLSFileError(f"{what} {str(path)!r} is larger than {_MAX_PEM_BYTES} bytes: not a PEM file")
    return data


def _certificates(data: bytes, path: str | Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TLSFileError(f"{what} {str(path)!r} holds no PEM certificate")
    return certs


def read_ca(path: str | Path, what: str = "CA file") -> bytes:
    """The PEM of a CA file that holds at least one certificate; TLSFileError otherwise."""
    data = _read(path, what)
    _certificates(data, path, what)
    return data


def read_pair(cert_path: str | Path, key_path: str | Path) -> tuple[bytes, bytes]:
    """(certificate chain PEM, key PEM), checked: both parse and the key is the certificate's."""
    cert_pem, key_pem = _read(cert_path, "certificate file"), _read(key_path, "key file")
    leaf = _certificates(cert_pem, cert_path, "certificate file")[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: an encrypted key
        raise TLSFileError(f"key file {str(key_path)!r} holds no unencrypted PEM private key ({exc})") from None
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise TLSFileError(f"key file {str(key_path)!r} does not match the certificate in {str(cert_path)!r}")
    return cert_pem, key_pem


_Stamp = tuple[int, int, int, int] | None  # inode, device, size, mtime in ns; None: cannot stat
_Options = list[tuple[str, Any]] | tuple[tuple[str, Any], ...]


_SETTLE_NS = 2_000_000_000  # file timestamps move in clock ticks (a few ms); two seconds is well past one


def _recent(stamps: tuple[_Stamp, ...]) -> bool:
    now = time.time_ns()
    return any(s is not None and now - s[3] < _SETTLE_NS for s in stamps)


def _stamp(path: str) -> _Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


class ServerCertificates:
    """The gRPC server's certificate, key and (for mTLS) client CA; `credentials()` serves them and
    `fetch` hands grpc a new set when the files changed and the new set loads."""

    def __init__(
        self, cert_file: str, key_file: str, client_ca_file: str = "",
        *, on_reload: Callable[[str], None] | None = None,
    ) -> None:
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._on_reload = on_reload or (lambda outcome: None)
        self._lock = threading.Lock()  # grpc may ask from several of its threads at once
        self._stamps = self._stamps_now()  # before the read: a change during it is seen next time
        self._pems = self._read()  # raises TLSFileError: at start, a bad file is a settings error
        self._settling = _recent(self._stamps)
        self._rejected: tuple[_Stamp, ...] | None = None  # the stamps of a set already refused (logged once)

    def _stamps_now(self) -> tuple[_Stamp, ...]:
        return tuple(_stamp(p) for p in (self.cert_file, self.key_file, self.client_ca_file) if p)

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        cert_pem, key_pem = read_pair(self.cert_file, self.key_file)
        ca = read_ca(self.client_ca_file, "client CA file") if self.client_ca_file else None
        return cert_pem, key_pem, ca

    @staticmethod
    def _config(pems: tuple[bytes, bytes, bytes | None]) -> grpc.ServerCertificateConfiguration:
        cert_pem, key_pem, ca = pems
        return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config(self._pems), self.fetch, require_client_authentication=bool(self.client_ca_file))

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed and load, else None (keep the one in force).

        Called by grpc before every handshake: a stat of each file, nothing more when none changed.
        A file written within the last seconds may change again under the same stamps (an in-place
        rewrite of the same size within the clock's granularity): until its stamps are that old, the
        bytes are compared too."""
        with self._lock:
            stamps = self._stamps_now()
            changed = stamps != self._stamps and stamps != self._rejected
            if not changed and not self._settling:
                return None
            self._settling = _recent(stamps)
            try:
                pems = self._read()
            except Exception as exc:  # noqa: BLE001 - whatever a new file holds, the old set keeps serving
                if changed:
                    self._rejected = stamps
                    log_event(log, logging.WARNING, "tls_reload_rejected", error=str(exc),
                              kept="the certificate in force")
                    self._on_reload("rejected")
                return None
            if pems == self._pems:
                self._stamps, self._rejected = stamps, None
                return None
            self._stamps, self._pems, self._rejected = stamps, pems, None
            log_event(log, logging.INFO, "tls_reloaded", cert_file=self.cert_file,
                      client_ca_file=self.client_ca_file or None)
            self._on_reload("reloaded")
            return self._config(pems)


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """TLS of a client: the CA that signs the server (empty: the system's roots), an optional client
    certificate and key (mTLS), and the name to verify the server's certificate against (empty: the
    host of the address)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    def check(self, setting: str = "") -> None:
        """Raise TLSFileError if the files are half given or do not load; `setting` prefixes the message."""
        where = f"{setting}: " if setting else ""
        if bool(self.cert_file) != bool(self.key_file):
            given, missing = ("certificate", "key") if self.cert_file else ("key", "certificate")
            raise TLSFileError(f"{where}a client {given} file is given without its {missing} file")
        try:
            self.pems()
        except TLSFileError as exc:
            raise TLSFileError(f"{where}{exc}") from None

    def pems(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        ca = read_ca(self.ca_file) if self.ca_file else None
        if self.cert_file:
            cert, key = read_pair(self.cert_file, self.key_file)
            return ca, key, cert
        return ca, None, None

    def credentials(self) -> grpc.ChannelCredentials:
        ca, key, cert = self.pems()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def channel(addr: str, tls: ClientTLS | None, options: _Options = ()) -> grpc.Channel:
    """A synchronous channel to `addr`: TLS when `tls` is given, plaintext otherwise."""
    if tls is None:
        return grpc.insecure_channel(addr, options=list(options))
    return grpc.secure_channel(addr, tls.credentials(), options=[*options, *tls.options()])


def aio_channel(addr: str, tls: ClientTLS | None, options: _Options = ()) -> grpc.aio.Channel:
    """The same for grpc.aio."""
    if tls is None:
        return grpc.aio.insecure_channel(addr, options=list(options))
    return grpc.aio.secure_channel(addr, tls.credentials(), options=[*options, *tls.options()])
