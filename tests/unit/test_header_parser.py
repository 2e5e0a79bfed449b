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


class _Captured:
    """Just enough of a connected client for ``_send_publish``: the frames it would write."""

    def __init__(self, cls: type) -> None:
        self.client = cls.__new__(cls)
        self.client.stats = {"out_msgs": 0, "out_bytes": 0}
        self.client._flush_queue = None
        self.frames: list[bytes] = []

        async def send(cmd: bytes, priority: bool = False) -> None:
            self.frames.append(cmd)

        self.client._send_command = send


HEADER_CASES = [
    {"Nats-Msg-Id": "abc123", "Mesh-Reply": "_INBOX.x.r.1", "Mesh-Deadline": "1795323262473"},
    {" Spaced ": "  padded value \t", "": "skipped", "Multi": "line\r\nbreak\nhere\r"},
    {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "Utf": "caf\u00e9"},
    {},
]


@pytest.mark.parametrize("headers", HEADER_CASES)
async def test_same_frames_as_the_stock_encoder(headers: dict[str, str]) -> None:
    ours, stock = _Captured(_Client), _Captured(StockClient)
    for side in (ours, stock):
        await side.client._send_publish("mesh.infer.m.1.normal", "_INBOX.r", b"payload", 7, headers)
        await side.client._send_publish("subj", "", b"", 0, None)
    assert ours.frames == stock.frames
    assert ours.client.stats == stock.client.stats


async def test_a_header_name_outside_the_token_grammar_is_refused() -> None:
    from nats.errors import BadHeaderError

    with pytest.raises(BadHeaderError):
        await _Captured(_Client).client._send_publish("s", "", b"", 0, {"Bad:Name": "x"})
