"""A fault-injecting TCP proxy on 127.0.0.1: the network faults of the chaos suite, without namespaces.

One `FaultProxy` sits in front of one connection target (an etcd member, a
remote service, a replica's gRPC port). Each direction of each connection is
pumped by its own thread, so a fault can act on one direction only:

- `hold(up=True, down=True)`: bytes of that direction stop being forwarded
  (they wait in the proxy and the kernel's buffers, as behind a dropped link
  while TCP retransmits) and are delivered, late, when the hold ends; `up`
  is client -> target, `down` is target -> client. New connections are
  accepted and held the same way.
- `reset()`: every connection is closed now, and, while `refuse` is set, new
  ones are closed as soon as they are accepted (a link that answers RST).
- `delay_s`: every chunk waits this long before it is forwarded.
- `loss`: each chunk, with this probability, waits `stall_s` more (a lost
  segment retransmitted); with probability `loss / 10` the connection is
  reset instead. TCP cannot lose bytes inside a stream, so this is how loss
  looks to the application above it.
- `heal()`: all of the above off.

Connections to the target leave from `source_ip` (any 127.x.y.z address),
so the target can tell which replica a call came from by its peer address.
"""

from __future__ import annotations

import random
import socket
import threading
import time

UP, DOWN = "up", "down"


class FaultProxy:
    def __init__(self, target: str, *, name: str = "", source_ip: str = "", seed: int = 0) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.name = name or target
        self.source_ip = source_ip
        self._rng = random.Random(seed)
        self._cond = threading.Condition()
        self._held = {UP: False, DOWN: False}
        self.refuse = False
        self.delay_s = 0.0
        self.loss = 0.0
        self.stall_s = 0.5
        self._stopping = False
        self._conns: set[socket.socket] = set()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        self.resets = 0
        self._thread = threading.Thread(target=self._accept_loop, name=f"proxy-{self.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ control

    def hold(self, *, up: bool = True, down: bool = True) -> None:
        with self._cond:
            self._held[UP] = self._held[UP] or up
            self._held[DOWN] = self._held[DOWN] or down
            self._cond.notify_all()

    def reset(self, *, refuse: bool = False) -> None:
        with self._cond:
            self.refuse = refuse
            conns = list(self._conns)
        self.resets += 1
        for sock in conns:
            _close(sock)

    def heal(self) -> None:
        with self._cond:
            self._held = {UP: False, DOWN: False}
            self.refuse = False
            self.delay_s = 0.0
            self.loss = 0.0
            self._cond.notify_all()

    @property
    def faulty(self) -> bool:
        with self._cond:
            return any(self._held.values()) or self.refuse or self.delay_s > 0 or self.loss > 0

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            conns = list(self._conns)
        _close(self._listener)
        for sock in conns:
            _close(sock)
        self._thread.join(2)

    # ------------------------------------------------------------ pumps

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._cond:
                if self._stopping or self.refuse:
                    _close(client)
                    continue
            try:
                upstream = socket.create_connection(
                    self.target, timeout=5, source_address=(self.source_ip, 0) if self.source_ip else None)
            except OSError:
                _close(client)
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                self._conns.update((client, upstream))
                self.connections += 1
            for src, dst, direction in ((client, upstream, UP), (upstream, client, DOWN)):
                threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True,
                                 name=f"proxy-{self.name}-{direction}").start()

    def _wait_released(self, direction: str) -> bool:
        """Block while `direction` is held; False once the proxy stops."""
        with self._cond:
            while self._held[direction] and not self._stopping:
                self._cond.wait(0.5)
            return not self._stopping

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while self._wait_released(direction):
                data = src.recv(65536)
                if not data:
                    break
                with self._cond:
                    delay, loss, stall = self.delay_s, self.loss, self.stall_s
                if loss and self._rng.random() < loss / 10:
                    self.resets += 1
                    break
                if loss and self._rng.random() < loss:
                    delay += stall
                if delay:
                    time.sleep(delay)
                # Bytes read just before a hold began wait for its end, too.
                if not self._wait_released(direction):
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._cond:
                self._conns.discard(src)
                self._conns.discard(dst)
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
