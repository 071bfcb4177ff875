"""A real HTTP proxy in front of the S3 server that misbehaves on request: it flips a byte in
the objects it returns, or answers a chosen S3 error, so that tests see what the workers do
when the store is not what it says."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class Faults:
    """What the proxy does now; tests change it while it runs."""

    corrupt_reads: bool = False  # flip one byte of every object body a GET returns
    #: answer every PUT of an object with this (HTTP status, S3 error code) instead
    put_error: tuple[int, str] | None = None
    seen: list[str] = field(default_factory=list)  # "METHOD path" of every request


def _handler(upstream: str, faults: Faults) -> type[BaseHTTPRequestHandler]:
    target = urlparse(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            faults.seen.append(f"{self.command} {self.path}")
            is_object = "?" not in self.path and self.path.count("/") >= 2
            if self.command == "PUT" and is_object and faults.put_error is not None:
                status, code = faults.put_error
                payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                           f"<Message>{code} (test)</Message><Resource>{self.path}</Resource>"
                           "<RequestId>test</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                if (self.command == "GET" and is_object and faults.corrupt_reads
                        and response.status == 200 and data):
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)) if self.command != "HEAD"
                                 else response.getheader("Content-Length", "0"))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                connection.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler


@contextmanager
def s3_proxy(upstream: str) -> Iterator[tuple[str, Faults]]:
    """``(endpoint, faults)`` of a proxy to ``upstream`` (``http://host:port``) on a free
    loopback port, stopped on exit."""
    faults = Faults()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream, faults))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults
    finally:
        server.shutdown()
        server.server_close()
