"""The Prometheus /metrics endpoint: one thread, a connection cap, deadlines, a cached render.

prometheus_client's `start_http_server` runs a thread per connection with no
cap and no timeout: a few thousand idle or slow connections become a few
thousand threads rendering the registry at once, and the supervisor's own
heartbeat handling starves. This server is one selector loop on one thread:

- at most `max_connections` connections are open. At the cap, a new
  connection takes the place of the oldest one that has not sent its
  request yet (a scraper sends its request as soon as it connects, so a
  flood of idle connections evicts itself, not the scraper); when every
  open connection is being answered, the new one gets 503 and is closed.
  Both are counted and logged once per interval;
- a connection must deliver its request within `timeout_s` and take its
  answer within `timeout_s` more, or it is closed (idle ones too);
- one request per connection (`Connection: close`), headers of at most
  8 KiB;
- the registry is rendered at most once per `cache_s` per format, so any
  number of concurrent scrapes cost one render.

With an `ssl_context` it speaks HTTPS only: each connection's handshake runs
non-blocking in the same loop (a client that fails it is counted as
`tls_failed` and closed), within the same deadline as its request.

Formats are those of prometheus_client (text 0.0.4, or OpenMetrics when the
scraper asks for it in `Accept`), gzip when accepted, on `/metrics` and `/`.
"""

from __future__ import annotations

import gzip
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from supervisor_service.core import log_event

log = logging.getLogger("supervisor_service.metrics_http")

_MAX_REQUEST_BYTES = 8192
_LOG_EVERY_S = 10.0
_OVER_LIMIT = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 37\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\ntoo many connections to the endpoint\n"
)


class _Conn:
    __slots__ = ("sock", "fd", "inbuf", "out", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = b""
        self.out: list[memoryview] = []  # the answer's head and body (the cached render, not a copy)
        self.deadline = deadline


class MetricsHTTPServer:
    """Serves `registry` on host:port until `stop()`; `server_port` is the bound port."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        max_connections: int = 256,
        timeout_s: float = 5.0,
        cache_s: float = 1.0,
        on_drop: Callable[[str], None] | None = None,
        on_open: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._registry = registry
        self._ssl = ssl_context
        self._max = max_connections
        self._timeout = timeout_s
        self._cache_s = cache_s
        self._on_drop = on_drop or (lambda reason: None)
        self._on_open = on_open or (lambda n: None)
        self._clock = clock
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._listener = socket.create_server((host, port), family=family, backlog=1024)
        self._listener.setblocking(False)
        self.server_port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._conns: dict[int, _Conn] = {}
        self._waiting: dict[int, _Conn] = {}  # connections that have not sent their request, oldest first
        # Accepted per loop pass: far below the cap, so a scraper that connected is read before
        # enough newer connections arrive to evict it.
        self._accept_batch = max(1, min(32, max_connections // 4))
        self._cache: dict[tuple[str, bool], tuple[float, str, bytes]] = {}
        self.renders = 0
        self._logged: dict[str, tuple[float, int]] = {}
        self._stopping = False
        self._accept_paused_until: float | None = None
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)

    def start(self) -> MetricsHTTPServer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Idempotent: close every connection and the listening socket."""
        if self._stopping:
            return
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout)
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        self._waiting.clear()
        self._on_open(0)
        self._selector.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    # ------------------------------------------------------------ loop

    def _run(self) -> None:
        while not self._stopping:
            now = self._clock()
            if self._accept_paused_until is not None and now >= self._accept_paused_until:
                self._accept_paused_until = None
                self._selector.register(self._listener, selectors.EVENT_READ, "accept")
            wait = min((c.deadline for c in self._conns.values()), default=now + 1.0) - now
            if self._accept_paused_until is not None:
                wait = min(wait, self._accept_paused_until - now)
            try:
                events = self._selector.select(max(0.0, min(wait, 1.0)))
            except OSError:
                if self._stopping:
                    return
                raise
            for key, mask in events:
                try:
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        return
                    elif mask & selectors.EVENT_WRITE:
                        self._write(key.data)
                    else:
                        self._read(key.data)
                except Exception as exc:  # noqa: BLE001 - one connection's fault must not end the endpoint
                    log_event(log, logging.ERROR, "metrics_http_error", error=repr(exc))
                    if isinstance(key.data, _Conn):
                        self._close(key.data)
            now = self._clock()
            for conn in [c for c in self._conns.values() if c.deadline <= now]:
                self._drop(conn, "timeout")

    def _accept(self) -> None:
        for _ in range(self._accept_batch):  # then let the open connections have their turn
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: say so, keep serving the open ones
                self._note("accept_failed", error=str(exc))
                # The listener stays readable: leave it alone a moment rather than spin on it.
                self._selector.unregister(self._listener)
                self._accept_paused_until = self._clock() + 0.5
                return
            sock.setblocking(False)
            if len(self._conns) >= self._max:
                if self._waiting:
                    self._drop(next(iter(self._waiting.values())), "idle_evicted")
                    self._note("idle_evicted", max_connections=self._max)
                else:
                    self._on_drop("over_limit")
                    try:
                        if self._ssl is None:  # over TLS the answer would need a handshake first
                            sock.send(_OVER_LIMIT)
                    except OSError:
                        pass
                    sock.close()
                    self._note("over_limit", max_connections=self._max)
                    continue
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            conn = _Conn(sock, self._clock() + self._timeout)
            self._conns[conn.fd] = conn
            self._waiting[conn.fd] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._on_open(len(self._conns))

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)  # over TLS: the handshake first, then the request
            while data and isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending():
                data += conn.sock.recv(conn.sock.pending())  # decrypted already: no readiness event for it
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except ssl.SSLError as exc:
            self._note("tls_failed", error=exc.reason or str(exc))
            self._drop(conn, "tls_failed")
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.inbuf += data
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = conn.inbuf.find(b"\n\n")  # a hand-typed request (nc) ends lines with \n
        if end < 0:
            if len(conn.inbuf) > _MAX_REQUEST_BYTES:
                self._on_drop("bad_request")
                self._respond(conn, 431, "text/plain", b"request headers too large\n")
            return
        self._handle(conn, conn.inbuf[:end].decode("latin-1").replace("\r\n", "\n"))

    def _handle(self, conn: _Conn, head: str) -> None:
        lines = head.split("\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._on_drop("bad_request")
            self._respond(conn, 400, "text/plain", b"bad request\n")
            return
        method, target = parts[0], parts[1]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            self._respond(conn, 405, "text/plain", b"only GET and HEAD\n", extra=("Allow: GET, HEAD",))
            return
        path, _, query = target.partition("?")
        if path not in ("/metrics", "/"):
            self._respond(conn, 404, "text/plain", b"not found: the metrics are at /metrics\n")
            return
        names = parse_qs(query).get("name[]", [])  # prometheus_client's filter: only these families
        try:
            content_type, body, gzipped = self._render(
                headers.get("accept", ""), headers.get("accept-encoding", ""), names
            )
        except Exception as exc:  # noqa: BLE001 - a collector's bug is a 500, not a dead endpoint
            log_event(log, logging.ERROR, "metrics_render_failed", error=repr(exc))
            self._respond(conn, 500, "text/plain", b"rendering the metrics failed\n")
            return
        extra = ("Content-Encoding: gzip",) if gzipped else ()
        self._respond(conn, 200, content_type, body, extra=extra, head_only=method == "HEAD")

    def _render(self, accept: str, accept_encoding: str, names: list[str] = ()) -> tuple[str, bytes, bool]:
        """The registry in the format `accept` asks for, rendered at most once per cache interval
        (a render filtered by `names` is small and not cached)."""
        encoder, content_type = choose_encoder(accept)
        gzipped = "gzip" in accept_encoding.lower()
        key = (content_type, gzipped)
        now = self._clock()
        cached = self._cache.get(key)
        if not names and cached is not None and now - cached[0] < self._cache_s:
            return cached[1], cached[2], gzipped
        body = encoder(self._registry.restricted_registry(names) if names else self._registry)
        self.renders += 1
        if gzipped:
            body = gzip.compress(body, compresslevel=6)
        if not names:
            self._cache[key] = (now, content_type, body)
        return content_type, body, gzipped

    def _respond(
        self, conn: _Conn, status: int, content_type: str, body: bytes, *, extra: tuple[str, ...] = (),
        head_only: bool = False,
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 431:
                  "Request Header Fields Too Large", 500: "Internal Server Error"}[status]
        head = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
                "Connection: close", *extra]
        conn.out = [memoryview(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))]
        if body and not head_only:
            conn.out.append(memoryview(body))
        self._waiting.pop(conn.fd, None)
        conn.deadline = self._clock() + self._timeout  # the answer must be taken within the timeout too
        self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out[0])
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError:
                self._close(conn)
                return
            conn.out[0] = conn.out[0][sent:]
            if len(conn.out[0]):
                return
            conn.out.pop(0)
        self._close(conn)

    def _drop(self, conn: _Conn, reason: str) -> None:
        self._on_drop(reason)
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn.fd, None) is None:
            return
        self._waiting.pop(conn.fd, None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self._on_open(len(self._conns))

    def _note(self, event: str, **fields: object) -> None:
        """A WARNING once per interval per kind, with how many were not logged in between."""
        now = self._clock()
        last, skipped = self._logged.get(event, (None, 0))
        if last is not None and now - last < _LOG_EVERY_S:
            self._logged[event] = (last, skipped + 1)
            return
        self._logged[event] = (now, 0)
        log_event(log, logging.WARNING, f"metrics_http_{event}", not_logged=skipped, **fields)
