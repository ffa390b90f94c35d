"""A loopback TCP port that refuses connections until opened, then forwards them.

For tests of a server that is unreachable and comes back: point a client at
``RefusingThenForwarding(...).port``; until ``open()`` every connection is refused
(the socket is bound but not listening, so the kernel answers with a reset, no timing
involved); after it, each connection is piped to the target.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

_CHUNK = 65536


class RefusingThenForwarding:
    """A port on 127.0.0.1 that refuses until ``open()``, then forwards to the target;
    ``close()`` (or leaving the ``with`` block) cuts every connection."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False

    @classmethod
    def for_url(cls, url: str) -> RefusingThenForwarding:
        """Forwarding to the host and port of a ``redis://`` URL."""
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 6379)

    def url(self, url: str) -> str:
        """``url`` (credentials, database, query) with this gate as its host and port."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def open(self) -> None:
        """From now on accept connections and forward each to the target."""
        self._listener.listen()
        self._spawn(self._accept_loop)

    def close(self) -> None:
        """Stop accepting, cut every forwarded connection, and wait for the threads."""
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        self._wake_w.send(b"x")
        for conn in connections:
            _shutdown(conn)
        for thread in list(self._threads):
            thread.join(timeout=10)
            assert not thread.is_alive(), "a forwarding thread did not stop"
        for sock in (self._listener, self._wake_r, self._wake_w, *connections):
            sock.close()

    def __enter__(self) -> RefusingThenForwarding:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._wake_r in ready:
                    return
                client, _ = self._listener.accept()
                try:
                    upstream = socket.create_connection(self.target, timeout=10)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)
                with self._lock:
                    if self._closed:
                        client.close()
                        upstream.close()
                        return
                    self._connections += [client, upstream]
                    self._spawn(_pipe, client, upstream)
                    self._spawn(_pipe, upstream, client)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copy bytes until either side ends, then end both."""
    try:
        while data := source.recv(_CHUNK):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _shutdown(source)
        _shutdown(sink)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already shut down, or never connected
        sock.shutdown(socket.SHUT_RDWR)
