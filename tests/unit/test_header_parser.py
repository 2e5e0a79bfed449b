"""The connection's faster header parser gives the same result as nats-py's own."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as StockClient

from broker.connection import _Client

CASES = [
    b"Nats-Msg-Id: abc123\r\nMesh-Reply: _INBOX.x.r.1\r\nMesh-Deadline: 1795323262473\r\n\r\n",
    b"A:1\r\nB:\tspaced value \r\n\r\n",
    b"Bad Name: x\r\nGood: y\r\n\r\n",
    b"Empty:\r\n: novalue\r\nnocolon\r\n\r\n",
    b"Url: nats://host:4222/a:b\r\n\r\n",
    "Caf\u00e9: x\r\nUtf: caf\u00e9\r\n\r\n".encode(),
    b"Broken: \xff\xfe\r\n\r\n",
    b"\r\n",
    b"",
]


@pytest.mark.parametrize("raw", CASES)
def test_same_headers_as_the_stock_parser(raw: bytes) -> None:
    assert _Client._parse_header_lines(raw) == StockClient._parse_header_lines(raw)
