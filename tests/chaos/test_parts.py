"""The chaos suite's own parts: the fault-injecting proxy and the clock shim do what they say
(a nemesis whose faults do nothing would report every invariant held)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.chaos.cluster import compile_clock_shim
from tests.chaos.netproxy import FaultProxy
from tests.support.servers import require_binary


class _Echo:
    """A TCP echo server on 127.0.0.1 that remembers the peer address of each connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.peers: list[str] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer[0])
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept loop (close alone does not)
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def echo():
    server = _Echo()
    yield server
    server.close()


def _connect(proxy: FaultProxy) -> socket.socket:
    host, _, port = proxy.endpoint.rpartition(":")
    s = socket.create_connection((host, int(port)), timeout=2)
    s.settimeout(0.4)
    return s


def _round_trip(s: socket.socket, data: bytes = b"ping") -> bytes | None:
    s.sendall(data)
    try:
        return s.recv(4096)
    except TimeoutError:
        return None


def test_proxy_forwards_from_its_source_address(echo):
    proxy = FaultProxy(echo.endpoint, source_ip="127.0.1.9")
    try:
        with _connect(proxy) as s:
            assert _round_trip(s) == b"ping"
        assert echo.peers == ["127.0.1.9"]
    finally:
        proxy.stop()


@pytest.mark.parametrize("up", [True, False])
def test_a_one_way_hold_stops_one_direction_and_delivers_late(echo, up):
    proxy = FaultProxy(echo.endpoint)
    try:
        with _connect(proxy) as s:
            assert _round_trip(s) == b"ping"
            proxy.hold(up=up, down=not up)
            assert _round_trip(s, b"held") is None
            proxy.heal()
            s.settimeout(2)
            assert s.recv(4096) == b"held"  # what was held arrives once the link heals
    finally:
        proxy.stop()


def test_a_reset_closes_connections_and_refuses_new_ones(echo):
    proxy = FaultProxy(echo.endpoint)
    try:
        s = _connect(proxy)
        assert _round_trip(s) == b"ping"
        proxy.reset(refuse=True)
        time.sleep(0.1)
        with pytest.raises(OSError):
            s.sendall(b"x" * 100_000)
            if not s.recv(1):
                raise ConnectionResetError
        s.close()
        with _connect(proxy) as t:
            with pytest.raises(OSError):
                t.sendall(b"y")
                if not t.recv(1):
                    raise ConnectionResetError
        proxy.heal()
        with _connect(proxy) as u:
            assert _round_trip(u) == b"ping"
    finally:
        proxy.stop()


def test_delay_slows_every_chunk(echo):
    proxy = FaultProxy(echo.endpoint)
    try:
        with _connect(proxy) as s:
            s.settimeout(3)
            proxy.delay_s = 0.3
            started = time.monotonic()
            assert _round_trip(s) == b"ping"
            assert time.monotonic() - started >= 0.55  # both directions
            assert proxy.faulty
            proxy.heal()
            assert not proxy.faulty
    finally:
        proxy.stop()


def test_clock_shim_shifts_the_wall_clock_only(tmp_path):
    require_binary("gcc", "gcc")
    shim = compile_clock_shim(str(tmp_path))
    offset = tmp_path / "offset"
    offset.write_text("-3600000\n")
    code = ("import time, threading; w = time.time(); m = time.monotonic(); "
            "threading.Event().wait(0.2); print(w, m, time.monotonic() - m)")
    env = dict(os.environ, LD_PRELOAD=shim, CLOCKSHIFT_FILE=str(offset))
    before = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30,
                         check=True).stdout.split()
    wall, mono, waited = map(float, out)
    assert abs(wall - (before - 3600)) < 5, (wall, before)
    assert abs(mono - time.monotonic()) < 5  # CLOCK_MONOTONIC untouched
    assert 0.15 < waited < 2.0  # Event.wait neither hangs nor returns at once
    date = subprocess.run(["date", "+%s"], env=env, capture_output=True, text=True, check=True).stdout
    assert abs(int(date) - (time.time() - 3600)) < 5  # time() and gettimeofday() of C programs too
