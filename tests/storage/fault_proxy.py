"""A tiny HTTP/1.1 proxy that sits between the stages and an object-store emulator and misbehaves on cue.

Each request is forwarded byte for byte (signatures stay valid), answered with a 503, dropped before it
reaches the store ("drop"), carried out by the store with its answer lost on the way back ("lose"), or
held until the test says so (to kill a stage in the middle of an upload). Every connection
carries one request (``Connection: close`` both ways), so a dropped request never poisons another.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable
from urllib.parse import unquote

# What to do with one request, given its number, method and what names the object: the URL-decoded target
# plus the start of the body (a GCS multipart upload names its object in the body's metadata part).
# One of "forward", "503", "drop", "lose" or "hold".
Plan = Callable[[int, str, str], str]


def forward_all(n: int, method: str, target: str) -> str:
    return "forward"


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.plan: Plan = forward_all
        self.requests: list[tuple[str, str, str]] = []  # (method, unquoted target, action)
        self.held = threading.Event()  # set when a request is being held
        self.release = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self, plan: Plan = forward_all) -> None:
        with self._lock:
            self.plan = plan
            self.requests.clear()
        self.held.clear()
        self.release.clear()

    def faults(self) -> int:
        return sum(1 for _, _, action in self.requests if action != "forward")

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def _decide(self, method: str, target: str) -> str:
        with self._lock:
            action = self.plan(len(self.requests), method, target)
            self.requests.append((method, target, action))
        return action

    def _serve(self, client: socket.socket) -> None:
        rfile = client.makefile("rb")
        head = _read_head(rfile)
        if head is None:
            return
        request_line, headers = _parse_head(head)
        method, raw_target, _ = request_line.split(" ", 2)
        if headers.get("expect", "").lower() == "100-continue":
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = _read_body(rfile, headers)
        action = self._decide(method, f"{unquote(raw_target)} {body[:4096].decode('latin-1')}")
        if action == "drop":
            client.close()
            return
        if action == "hold":
            self.held.set()
            self.release.wait(timeout=120)
            client.close()
            return
        if action == "503":
            payload = b"<Error><Code>ServiceUnavailable</Code><Message>injected fault</Message></Error>"
            client.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + (payload if method != "HEAD" else b"")
            )
            client.close()
            return
        with socket.create_connection(self.upstream, timeout=60) as upstream:
            upstream.sendall(_with_connection_close(head, drop_expect=True) + body)
            response = bytearray()
            while chunk := upstream.recv(1 << 16):
                response += chunk
        if action == "lose":
            client.close()
            return
        split = response.find(b"\r\n\r\n")
        if split >= 0:
            response = _with_connection_close(bytes(response[: split + 4])) + response[split + 4 :]
        client.sendall(response)
        client.close()


def _read_head(rfile) -> bytes | None:
    lines = []
    while True:
        line = rfile.readline(65537)
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    first, *rest = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in rest:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    return first, headers


def _read_body(rfile, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return rfile.read(int(headers["content-length"]))
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raw = bytearray()
        while True:
            size_line = rfile.readline()
            raw += size_line
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := rfile.readline()) not in (b"\r\n", b"\n", b""):
                    raw += trailer
                raw += b"\r\n"
                return bytes(raw)
            raw += rfile.read(size + 2)
    return b""


def _with_connection_close(head: bytes, drop_expect: bool = False) -> bytes:
    lines = head.decode("latin-1").split("\r\n")
    kept = [
        line
        for line in lines[1:]
        if line
        and not line.lower().startswith(("connection:", "keep-alive:"))
        and not (drop_expect and line.lower().startswith("expect:"))
    ]
    return "\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode("latin-1")
