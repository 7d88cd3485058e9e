"""A loopback HTTP server that answers with scripted bytes: what a server should not send (a
broken head, a body cut short, a garbled listing), to show how the core's reader types it."""

from __future__ import annotations

import socket
import threading
import time
from collections import deque


class ScriptedServer:
    """A loopback HTTP server answering the requests of each connection with the next bytes of
    `answers` (None: close the connection without answering), then keeps the connection open
    (or closes it: `close_after`); it counts connections."""

    def __init__(
        self, answers: list[bytes | None], delay: float = 0.0, close_after: bool = False
    ) -> None:
        self.answers = deque(answers)
        self.delay = delay
        self.close_after = close_after
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while self.answers:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                data = data.split(b"\r\n\r\n", 1)[1]
                answer = self.answers.popleft()
                if answer is None:
                    return
                time.sleep(self.delay)
                try:
                    conn.sendall(answer)
                except OSError:
                    return  # the client gave up on an answer it refused
            if not self.close_after:
                try:
                    conn.recv(1)  # keep the connection open until the client drops it
                except OSError:
                    pass

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.close()


def answer(status: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body
