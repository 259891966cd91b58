"""A TCP forwarder on loopback that records every byte it carries: the on-path observer of the tests.

It stands where a TLS-terminating ingress or a load balancer would: each new connection goes to
the next backend in turn (round robin, skipping backends that refuse), and the bytes of both
directions are kept for the test to search.
"""

from __future__ import annotations

import socket
import threading

from veil_cli.processes import free_port


class RecordingForwarder:
    def __init__(self, backends: list[int]):
        self.backends = list(backends)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.upstream = bytearray()  # client -> backend
        self.downstream = bytearray()  # backend -> client
        self.connections: list[int] = []  # the backend port each connection went to
        self._lock = threading.Lock()
        self._next = 0
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._running = True
        self._thread = threading.Thread(target=self._accept, name="forwarder", daemon=True)
        self._thread.start()

    def recorded(self) -> bytes:
        with self._lock:
            return bytes(self.upstream) + bytes(self.downstream)

    def _connect(self) -> tuple[socket.socket, int] | None:
        for _ in range(len(self.backends)):
            with self._lock:
                port = self.backends[self._next % len(self.backends)]
                self._next += 1
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=2), port
            except OSError:
                continue  # that replica is down: the next one
        return None

    def _accept(self) -> None:
        while self._running:
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            picked = self._connect()
            if picked is None:
                client.close()
                continue
            backend, port = picked
            backend.settimeout(None)
            with self._lock:
                self.connections.append(port)
            for src, dst, log in ((client, backend, self.upstream), (backend, client, self.downstream)):
                threading.Thread(target=self._pipe, args=(src, dst, log), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, log: bytearray) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    log.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def stop(self) -> None:
        self._running = False
        self._thread.join(timeout=5)
        self._listener.close()
