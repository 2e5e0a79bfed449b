"""A stand-in OTLP/HTTP collector for the tracing benchmarks, in a process of its own (as a collector
would be): accepts and drops every export, keeping connections open as collectors do. It prints its port
on the first line, and on SIGTERM the number of exports and bytes it received."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

__all__ = ["Sink"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    exports = 0
    received = 0

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length", 0))
        self.rfile.read(size)
        type(self).exports += 1
        type(self).received += size
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class Sink:
    """The sink as a child process: ``url`` while it runs; ``stop()`` returns what it received."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def stop(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return out.strip()


def _serve() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True

    def stop(signum: int, frame: FrameType | None) -> None:
        print(f"{_Handler.exports:,} exports, {_Handler.received / 2**20:,.1f} MiB", flush=True)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(server.server_address[1], flush=True)
    with contextlib.suppress(SystemExit):
        server.serve_forever()


if __name__ == "__main__":
    _serve()
