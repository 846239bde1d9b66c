"""A TCP proxy on 127.0.0.1 that a test can pause and resume: a network partition on demand.

`pause()` stops forwarding in both directions: connections stay open, new
ones complete their handshake in the kernel's backlog, and bytes wait in
the socket buffers, as they do behind a dropped link while TCP retransmits.
`resume()` lets everything held through, late: a request sent before the
partition arrives after it, which is the delivery a fencing token must
survive. `cut()` closes every connection at once (a reset link).

    proxy = PausableProxy("127.0.0.1:2379")
    ... point the client at proxy.endpoint ...
    proxy.pause(); ...; proxy.resume()
    proxy.stop()
"""

from __future__ import annotations

import selectors
import socket
import threading


class PausableProxy:
    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._paused = False
        self._cut = False
        self._stopping = False
        self._peers: dict[socket.socket, socket.socket] = {}
        # A socketpair wakes the selector when pause/resume/stop change what it waits on.
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="pausable-proxy", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ control

    def pause(self) -> None:
        with self._lock:
            self._paused = True
        self._wake()

    def resume(self) -> None:
        with self._lock:
            self._paused = False
        self._wake()

    def cut(self) -> None:
        with self._lock:
            self._cut = True
        self._wake()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(5)
        for sock in list(self._peers):
            sock.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # ------------------------------------------------------------ loop

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        while True:
            with self._lock:
                paused, stopping, cut = self._paused, self._stopping, self._cut
                self._cut = False
            if stopping:
                sel.close()
                return
            if cut:
                for sock in list(self._peers):
                    sock.close()
                self._peers.clear()
            # What to wait on: nothing but the wake-up while paused (bytes stay in the kernel).
            for key in list(sel.get_map().values()):
                sel.unregister(key.fileobj)
            sel.register(self._wake_r, selectors.EVENT_READ)
            if not paused:
                sel.register(self._listener, selectors.EVENT_READ)
                for sock in self._peers:
                    sel.register(sock, selectors.EVENT_READ)
            for key, _ in sel.select(timeout=0.5):
                sock = key.fileobj
                if sock is self._wake_r:
                    self._wake_r.recv(4096)
                elif sock is self._listener:
                    self._accept()
                elif sock in self._peers:
                    self._forward(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self._target, timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._peers[client] = upstream
        self._peers[upstream] = client

    def _forward(self, sock: socket.socket) -> None:
        other = self._peers.get(sock)
        if other is None:
            return
        try:
            data = sock.recv(65536)
            if data:
                other.sendall(data)
                return
        except OSError:
            pass
        for s in (sock, other):
            self._peers.pop(s, None)
            s.close()
