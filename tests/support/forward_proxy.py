"""A forward HTTP proxy, as a corporate network puts between a node and the internet: CONNECT
tunnels (HTTPS) and absolute-form requests (plain HTTP), optionally requiring Basic proxy
credentials. It records what it was asked to reach, so tests can check a load went through it."""

from __future__ import annotations

import base64
import socket
import threading
from dataclasses import dataclass, field

from .fault_proxy import accept_each, parse_head, read_head, with_close


@dataclass
class ProxyLog:
    tunnels: list[str] = field(default_factory=list)  # CONNECT targets, host:port
    requests: list[str] = field(default_factory=list)  # absolute-form request targets
    refused: int = 0  # requests without the required credentials (407)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(1 << 16):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ForwardProxy:
    """Listens on a free loopback port; forwards only to loopback targets."""

    def __init__(self, user: str | None = None, password: str | None = None) -> None:
        self.log = ProxyLog()
        self._credentials = (
            "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() if user else None
        )
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=accept_each, args=(self._server, self._serve), daemon=True).start()

    def url(self, user: str | None = None, password: str | None = None) -> str:
        auth = f"{user}:{password}@" if user else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    def _serve(self, client: socket.socket) -> None:
        try:
            head, rest = read_head(client)
            request_line, headers = parse_head(head)
            method, target = request_line.split(" ")[:2]
            if self._credentials and headers.get("proxy-authorization") != self._credentials:
                with self._lock:
                    self.log.refused += 1
                client.sendall(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="proxy"\r\nContent-Length: 0\r\n'
                    b"Connection: close\r\n\r\n"
                )
                return
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                upstream = self._connect(host, int(port))
                with self._lock:
                    self.log.tunnels.append(target)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
            else:  # absolute form: GET http://host:port/path HTTP/1.1
                authority, _, path = target.split("://", 1)[1].partition("/")
                host, _, port = authority.rpartition(":")
                upstream = self._connect(host, int(port or 80))
                with self._lock:
                    self.log.requests.append(target)
                lines = head.split(b"\r\n")
                lines[0] = f"{method} /{path} {request_line.rsplit(' ', 1)[1]}".encode()
                lines = [ln for ln in lines if not ln.lower().startswith(b"proxy-")]
                # One request per connection: the next may be for another host.
                upstream.sendall(with_close(b"\r\n".join(lines)) + rest)
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            back.start()
            _pump(client, upstream)
            back.join()
        except (OSError, ValueError):
            pass
        finally:
            client.close()

    @staticmethod
    def _connect(host: str, port: int) -> socket.socket:
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError(f"this proxy only reaches loopback, not {host}")
        return socket.create_connection(("127.0.0.1", port), timeout=30)

    def stop(self) -> None:
        self._server.close()
