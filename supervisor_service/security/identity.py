"""Who is calling: the identity of a client certificate (first DNS SAN, else CN) or of a named bearer
token (docs/design.md §14.2), and files re-read when they change on disk (`WatchedFile`).

Tokens are kept as sha256 digests only (the tokens file holds `name = "sha256:<hex>"`); a presented
token is hashed and compared with every stored digest in constant time, so neither the answer's
time nor the file tells a token. The single `auth_token` setting is the identity `token`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from supervisor_service.core import log_event
from supervisor_service.security.policy import PolicyError, read_security_file

log = logging.getLogger("supervisor_service.security")

ANONYMOUS = "anonymous"
"""The identity of a caller when the service asks for no credential at all."""
LEGACY_TOKEN_IDENTITY = "token"
"""The identity of a caller that presents the `auth_token` setting's token."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,252}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
MAX_TOKENS = 10_000
MAX_TOKEN_CHARS = 4096  # longer than any real bearer token; hashing more is work for an attacker's bytes


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True, slots=True)
class Tokens:
    """Named token digests. `name_of(token)` compares with all of them (no early exit)."""

    digests: tuple[tuple[bytes, str], ...] = ()

    def name_of(self, token: str) -> str | None:
        if len(token) > MAX_TOKEN_CHARS:
            return None
        digest = token_digest(token)
        found = None
        for stored, name in self.digests:
            if hmac.compare_digest(stored, digest) and found is None:
                found = name
        return found

    def with_legacy(self, auth_token: str) -> Tokens:
        """These tokens and the `auth_token` setting's one, as the identity `token`."""
        if not auth_token:
            return self
        return Tokens(self.digests + ((token_digest(auth_token), LEGACY_TOKEN_IDENTITY),))


def parse_tokens(text: str, source: str) -> Tokens:
    """`[tokens]` `name = "sha256:<64 hex>"` (lower case hex of the token's sha256)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"tokens file {source}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"tokens"})
    if unknown:
        raise PolicyError(f"tokens file {source}: unknown key {unknown[0]!r} (expected a [tokens] table)")
    table = doc.get("tokens")
    if not isinstance(table, dict):
        raise PolicyError(f"tokens file {source}: no [tokens] table (e.g. [tokens] ops-alice = \"sha256:<hex>\")")
    if len(table) > MAX_TOKENS:
        raise PolicyError(f"tokens file {source}: {len(table)} tokens, at most {MAX_TOKENS}")
    digests: list[tuple[bytes, str]] = []
    seen: dict[bytes, str] = {}
    for name, value in table.items():
        if not isinstance(value, str):
            raise PolicyError(f"tokens file {source}: entry {name!r}: expected \"sha256:<hex>\", got a "
                              f"{type(value).__name__} (quote a name with dots)")
        if not _NAME.fullmatch(name):
            raise PolicyError(f"tokens file {source}: entry {name!r}: not a valid identity name")
        match = _DIGEST.fullmatch(value)
        if match is None:
            raise PolicyError(f"tokens file {source}: entry {name!r}: expected \"sha256:\" and 64 lower-case hex "
                              "digits (`printf %s TOKEN | sha256sum`), never the token itself")
        digest = bytes.fromhex(match.group(1))
        if digest in seen:
            raise PolicyError(f"tokens file {source}: entry {name!r} has the same token as {seen[digest]!r}")
        seen[digest] = name
        digests.append((digest, name))
    return Tokens(tuple(digests))


def load_tokens(path: str | Path) -> Tokens:
    return parse_tokens(read_security_file(path, "tokens"), str(path))


def certificate_identity(auth_context: dict[str, list[bytes]]) -> str | None:
    """The client certificate's first DNS SAN, else its CN; None without a verified certificate.

    grpc's auth context lists the DNS SANs alone, in the certificate's order, under `peer_dns`
    (`x509_subject_alternative_name` mixes in IP, URI and e-mail names)."""
    for key in ("peer_dns", "x509_common_name"):
        values = auth_context.get(key) or ()
        for value in values:
            name = value.decode("utf-8", "replace")
            if name:
                return name
    return None


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` header; '' for another scheme; None without one."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value if isinstance(value, str) else value.decode("latin-1")
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


T = TypeVar("T")


class WatchedFile(Generic[T]):
    """The parsed content of a file, re-read when its mtime, size or inode changes (checked at most
    every `check_interval_s`). A change that does not parse keeps the last good content in force,
    logged and reported through `on_reload(False)`; the first read raises (a start with a bad file
    is a settings error)."""

    def __init__(self, path: str | Path, parse: Callable[[Path], T], *, what: str,
                 check_interval_s: float = 1.0, on_reload: Callable[[bool], None] | None = None) -> None:
        self.path = Path(path)
        self._parse = parse
        self._what = what
        self._interval = check_interval_s
        self._on_reload = on_reload
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.value: T = parse(self.path)
        self._next_check = time.monotonic() + check_interval_s

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> T:
        # The check interval is an operator's expectation (a minute at most), not logic: the real
        # monotonic clock, so that the edge needs no clock to read a file.
        now = time.monotonic()
        if now < self._next_check or not self._lock.acquire(blocking=False):
            return self.value
        try:
            self._next_check = now + self._interval
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp
                self._reload()
        finally:
            self._lock.release()
        return self.value

    def _reload(self) -> None:
        try:
            self.value = self._parse(self.path)
        except PolicyError as exc:
            log_event(log, logging.ERROR, "security_file_rejected", file=str(self.path), kind=self._what,
                      error=str(exc), kept="the last valid content")
            if self._on_reload is not None:
                self._on_reload(False)
            return
        log_event(log, logging.INFO, "security_file_reloaded", file=str(self.path), kind=self._what)
        if self._on_reload is not None:
            self._on_reload(True)
