"""A publisher that speaks the NATS protocol by hand, so that tests can send what no client library
would: header names and values with any bytes, duplicated or missing fields, a status line where
a request's headers should be. nats-server stores such messages as they are; workers must cope."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping

__all__ = ["RawPublisher", "header_block"]


def header_block(headers: Mapping[str, str] | Iterable[tuple[bytes, bytes]], status: bytes = b"") -> bytes:
    """``NATS/1.0[ status]\\r\\nName: value\\r\\n...\\r\\n`` from str pairs, or raw byte pairs as they are."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    lines = [b"NATS/1.0" + (b" " + status if status else b"") + b"\r\n"]
    for name, value in pairs:
        raw_name = name.encode() if isinstance(name, str) else name
        raw_value = value.encode() if isinstance(value, str) else value
        lines.append(raw_name + b": " + raw_value + b"\r\n")
    return b"".join(lines) + b"\r\n"


class RawPublisher:
    """One plain TCP connection to nats-server; ``publish`` writes an HPUB frame exactly as given."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.refused = 0  # frames the server answered with -ERR (it closes the connection after one)

    async def _open(self) -> asyncio.StreamWriter:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        await self._reader.readline()  # INFO
        self._writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n')
        return self._writer

    async def publish(self, subject: str, headers: bytes, payload: bytes, reply: str = "") -> None:
        writer = self._writer or await self._open()
        reply_part = f" {reply}" if reply else ""
        frame = f"HPUB {subject}{reply_part} {len(headers)} {len(headers) + len(payload)}\r\n".encode()
        writer.write(frame + headers + payload + b"\r\n")

    async def flush(self) -> None:
        """Until the server has read everything written so far (PING → PONG); a frame it refused
        closes the connection, which is counted and reopened."""
        if self._writer is None or self._reader is None:
            return
        self._writer.write(b"PING\r\n")
        await self._writer.drain()
        while True:
            line = await asyncio.wait_for(self._reader.readline(), 10)
            if line.startswith(b"PONG"):
                return
            if line.startswith(b"-ERR") or not line:
                self.refused += 1
                await self.close()
                return

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        self._reader = self._writer = None
