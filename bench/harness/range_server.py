"""A fast loopback range server, to measure HTTP clients past what Azurite can serve: ranged GETs
(x-ms-range or Range) of one file answered 206 with Azure's framing headers (Content-Length,
Content-Range, ETag, x-ms-request-id), HTTP/1.1 keep-alive, a thread per connection. Over HTTP
the body goes with os.sendfile (zero-copy); over HTTPS with one sendall() of the mapped range
(OpenSSL encrypts it in one call, without the GIL). It checks no credential; it runs in its own
process, so its threads never share a GIL with the client.

    python bench/harness/range_server.py FILE [CERT KEY]   # prints "port N", serves until killed
"""

from __future__ import annotations

import mmap
import os
import socket
import ssl
import sys
import threading
import uuid

ETAG = '"0x8DCBE1C2D3E4F50"'


def _read_head(conn: socket.socket, pending: bytes) -> tuple[bytes, bytes] | None:
    while b"\r\n\r\n" not in pending:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        pending += chunk
    head, rest = pending.split(b"\r\n\r\n", 1)
    return head, rest


def _asked(head: bytes, size: int) -> tuple[int, int] | None:
    """[first, last] the request asks for, or None for the whole file."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() in (b"x-ms-range", b"range"):
            first, _, last = value.strip().removeprefix(b"bytes=").partition(b"-")
            return int(first), min(int(last), size - 1)
    return None


def serve(
    conn: socket.socket, fd: int, size: int, tls: ssl.SSLContext | None, data: mmap.mmap | None
) -> None:
    try:
        if tls is not None:
            conn = tls.wrap_socket(conn, server_side=True)
        _answer_each(conn, fd, size, data)
    except OSError:
        pass  # the client went away
    finally:
        conn.close()


def _answer_each(conn: socket.socket, fd: int, size: int, data: mmap.mmap | None) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pending = b""
    while (got := _read_head(conn, pending)) is not None:
        head, pending = got
        asked = _asked(head, size)
        first, last = asked if asked else (0, size - 1)
        status = "206 Partial Content" if asked else "200 OK"
        lines = [
            f"HTTP/1.1 {status}",
            f"Content-Length: {last - first + 1}",
            *([f"Content-Range: bytes {first}-{last}/{size}"] if asked else []),
            "Content-Type: application/octet-stream",
            f"ETag: {ETAG}",
            f"x-ms-request-id: {uuid.uuid4()}",
            "x-ms-version: 2021-08-06",
            "Accept-Ranges: bytes",
        ]
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        offset, left = first, last - first + 1
        if data is not None:
            conn.sendall(memoryview(data)[first : last + 1])
            continue
        while left > 0:
            sent = os.sendfile(conn.fileno(), fd, offset, left)
            if sent == 0:
                return
            offset += sent
            left -= sent


def main(path: str, cert: str | None = None, key: str | None = None) -> None:
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    tls, data = None, None
    if cert and key:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        data = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    server = socket.create_server(("127.0.0.1", 0), backlog=128)
    print(f"port {server.getsockname()[1]}", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn, fd, size, tls, data), daemon=True).start()


if __name__ == "__main__":
    main(*sys.argv[1:4])
