"""A fault-injecting HTTP proxy between the client and Azurite.

Every request travels on its own connection (the proxy forces `Connection: close`), so a fault
hits exactly one request. Faults apply to ranged blob GETs (those with a Range or x-ms-range
header) and are armed by count: each armed fault hits that many of the next such requests (a
fault in the body never hits the answer to a request whose client has gone, e.g. one a load
broke off when it failed, which the proxy may still be relaying when the next load arms one).
The proxy counts the ranged GETs and their bytes, so tests can check what reached the server.
A request-rate cap (`faults.max_requests_per_second`) plays Azure's throttling: a token bucket over
every request, ranged or not, whose burst is one second's worth; a request beyond it is answered
503 ServerBusy "Operations per second is over the account limit." at once, without reaching
upstream, and counted in `counters.throttled` (and in `counters.requests`, but not in the
ranged-GET counters).
An egress cap (`faults.egress_bytes_per_second`, burst `faults.egress_burst_bytes`) plays the
account's egress limit: a bucket of bytes over every connection, drawn as response bodies are
sent (it may go into debt: answers already admitted are served whole); a request that arrives
while it is empty is answered 503 ServerBusy "Egress is over the account limit." with a
Retry-After (seconds until the bucket refills), nothing served, and counted in
`counters.throttled` and `counters.egress_throttled`. As Azure does, a cap's 503 carries its
message as the HTTP reason too. Every ranged GET, served or refused, is logged in
`counters.ranged` as (monotonic time, path, bytes asked, 503 if a cap refused it or 200).
It only ever connects to the upstream address it was given (a loopback Azurite).
"""

from __future__ import annotations

import math
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Faults:
    reset_after_bytes: int = 0  # body bytes sent before a connection reset
    resets: int = 0
    truncations: int = 0  # bodies cut at reset_after_bytes by an orderly close (FIN), no reset
    stall_seconds: float = 0.0  # silence in the middle of the body
    stalls: int = 0
    status: int = 503  # answered without asking upstream
    retry_after: str = ""  # a Retry-After header value sent with those answers; "" sends none
    statuses: int = 0
    flips: int = 0  # flip one body byte (at flip_offset) of that many responses
    flip_offset: int = 100
    list_statuses: int = 0  # non-ranged requests (listing, properties) answered with `status`
    on_range_get: Callable[[str, int], None] | None = None  # (path, count) before forwarding
    max_requests_per_second: float = 0.0  # token bucket over all requests, burst = rate; 0: off
    egress_bytes_per_second: float = 0.0  # bytes served per second over all connections; 0: off
    egress_burst_bytes: int = 0  # the egress bucket's size; 0: one second's worth


@dataclass
class Counters:
    range_gets: int = 0
    range_bytes: int = 0  # body bytes of ranged GETs passed to the client
    requests: int = 0
    throttled: int = 0  # requests refused by a cap (503 ServerBusy, never forwarded)
    egress_throttled: int = 0  # of those, refused by the egress cap
    ranged: list[tuple[float, str, int, int]] = field(default_factory=list)  # see the module
    paths: list[str] = field(default_factory=list)
    faulted: list[tuple[str, int]] = field(default_factory=list)  # (path, bytes asked) of the
    # ranged GETs answered by Faults.statuses (never forwarded, not in `ranged`)


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the end of the head")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    out = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip().lower()] = v.strip()
    return lines[0], out


SERVER_BUSY = "The server is busy."
RATE_BUSY = "Operations per second is over the account limit."
EGRESS_BUSY = "Egress is over the account limit."


def _busy_response(status: int, retry_after: str = "", message: str = SERVER_BUSY) -> bytes:
    extra = f"Retry-After: {retry_after}\r\n".encode() if retry_after else b""
    body = (
        b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
        b"<Message>%s</Message></Error>" % message.encode()
    )
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/xml\r\n"
        b"x-ms-error-code: ServerBusy\r\n%sContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % (status, message.encode(), extra, len(body)) + body
    )


def asked_bytes(headers: dict[str, str]) -> int:
    """Bytes a ranged GET asks for (its x-ms-range or Range header, bytes=a-b); 0 if open."""
    value = headers.get("x-ms-range") or headers.get("range") or ""
    first, _, last = value.removeprefix("bytes=").partition("-")
    if not (first.isdigit() and last.isdigit()):
        return 0
    return int(last) - int(first) + 1


class _EgressBucket:
    """Bytes per second with a burst; drawn as bodies are sent, so it may go into debt."""

    def __init__(self) -> None:
        self.rate = 0.0
        self.burst = 0.0
        self.tokens = 0.0
        self.stamp = 0.0

    def _refill(self, rate: float, burst: float) -> None:
        now = time.monotonic()
        if (rate, burst) != (self.rate, self.burst):  # a new cap starts with a full bucket
            self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now

    def admit(self, rate: float, burst: float) -> float:
        """0 when a request may be served now, else seconds until the bucket has bytes again
        (the caller holds the proxy's lock)."""
        self._refill(rate, burst)
        return 0.0 if self.tokens > 0 else (1.0 - self.tokens) / rate

    def draw(self, n: int) -> None:
        self.tokens -= n


class _TokenBucket:
    """Requests per second with a burst of one second's worth; refilled continuously."""

    def __init__(self) -> None:
        self.rate = 0.0
        self.tokens = 0.0
        self.stamp = 0.0

    def take(self, rate: float) -> bool:
        """Whether one more request fits under `rate` now (the caller holds the proxy's lock)."""
        now = time.monotonic()
        burst = max(1.0, rate)
        if rate != self.rate:  # a new cap starts with a full bucket
            self.rate, self.tokens, self.stamp = rate, burst, now
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def client_gone(client: socket.socket) -> bool:
    """Whether the client closed its end: a load that stopped (its reads broken by closing the
    connection) reads no more answers, so no fault may be used up on one."""
    try:
        readable, _, _ = select.select([client], [], [], 0)
        return bool(readable) and client.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def accept_each(server: socket.socket, serve: Callable[[socket.socket], None]) -> None:
    """Serve each connection `server` accepts on a thread of its own, until it is closed."""
    while True:
        try:
            client, _ = server.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(client,), daemon=True).start()


def with_close(head: bytes) -> bytes:
    lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


class FaultProxy:
    """Listens on a free loopback port and forwards to upstream_port on 127.0.0.1."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.faults = Faults()
        self.counters = Counters()
        self._lock = threading.Lock()
        self._bucket = _TokenBucket()
        self._egress = _EgressBucket()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(512)  # a fleet of loaders connects at once
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(
            target=accept_each, args=(self._server, self._serve), daemon=True
        )
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self.faults = Faults()
            self.counters = Counters()
            self._bucket = _TokenBucket()
            self._egress = _EgressBucket()

    def _take(self, name: str) -> bool:
        with self._lock:
            left = getattr(self.faults, name)
            if left > 0:
                setattr(self.faults, name, left - 1)
                return True
            return False

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            head, rest = read_head(client)
            request_line, headers = parse_head(head)
            length = int(headers.get("content-length", 0))
            while len(rest) < length:
                chunk = client.recv(65536)
                if not chunk:
                    return
                rest += chunk
            method, path = request_line.split(" ")[:2]
            ranged = method == "GET" and ("range" in headers or "x-ms-range" in headers)
            asked = asked_bytes(headers) if ranged else 0
            with self._lock:
                self.counters.requests += 1
                rate = self.faults.max_requests_per_second
                throttled = rate > 0 and not self._bucket.take(rate)
                egress = self.faults.egress_bytes_per_second
                wait = 0.0
                if egress > 0 and not throttled:
                    burst = self.faults.egress_burst_bytes or egress
                    wait = self._egress.admit(egress, burst)
                if throttled or wait:
                    self.counters.throttled += 1
                    self.counters.egress_throttled += bool(wait)
                if ranged:
                    status = 503 if throttled or wait else 200
                    entry = (time.monotonic(), path.split("?")[0], asked, status)
                    self.counters.ranged.append(entry)
            if throttled:
                client.sendall(_busy_response(503, message=RATE_BUSY))
                return
            if wait:
                client.sendall(_busy_response(503, str(max(1, math.ceil(wait))), EGRESS_BUSY))
                return
            with self._lock:
                if ranged:
                    self.counters.range_gets += 1
                    self.counters.paths.append(path.split("?")[0])
                count = self.counters.range_gets
                hook = self.faults.on_range_get
            if ranged and hook is not None:
                hook(path.split("?")[0], count)
            if (ranged and self._take("statuses")) or (not ranged and self._take("list_statuses")):
                if ranged:
                    with self._lock:
                        self.counters.faulted.append((path.split("?")[0], asked))
                client.sendall(_busy_response(self.faults.status, self.faults.retry_after))
                return
            upstream = socket.create_connection(self.upstream, timeout=30)
            upstream.sendall(with_close(head) + rest)
            resp_head, body = read_head(upstream)
            client.sendall(with_close(resp_head))
            sent = 0
            while True:
                # A fault is used up only when it fires, so short responses don't swallow it,
                # nor does the answer to a request whose client has gone.
                if body and ranged and not client_gone(client):
                    f = self.faults
                    if sent <= f.flip_offset < sent + len(body) and self._take("flips"):
                        i = f.flip_offset - sent
                        body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1 :]
                    if sent + len(body) > f.reset_after_bytes and self._take("resets"):
                        client.sendall(body[: max(0, f.reset_after_bytes - sent)])
                        # SO_LINGER 0: close with a TCP reset, like a dropped connection.
                        client.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        return
                    if sent + len(body) > f.reset_after_bytes and self._take("truncations"):
                        client.sendall(body[: max(0, f.reset_after_bytes - sent)])
                        client.shutdown(socket.SHUT_WR)  # the body ends short of its length
                        return
                    if sent + len(body) > 1000 and self._take("stalls"):
                        client.sendall(body[: max(0, 1000 - sent)])
                        time.sleep(f.stall_seconds)
                        return
                if body:
                    client.sendall(body)
                    sent += len(body)
                    with self._lock:
                        self._egress.draw(len(body))
                        if ranged:
                            self.counters.range_bytes += len(body)
                body = upstream.recv(1 << 20)
                if not body:
                    return
        except OSError:
            return
        finally:
            client.close()
            if upstream is not None:
                upstream.close()

    def stop(self) -> None:
        self._server.close()
