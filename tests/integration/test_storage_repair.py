"""Repairing a stream the server stopped writing: rebuilt with the same configuration, its messages
carried over in order with their subjects and headers; the probe that tells a stream stores writes
leaves nothing behind for readers."""

from __future__ import annotations

from nats.js.api import StreamConfig

from broker import Connection, NatsServer, Registry, Settings
from broker.storage import probe, rebuild
from schemas.subjects import BUCKET_WORKERS, STREAM_INFER, probe_subject
from tests.conftest import unique


async def test_a_rebuilt_stream_keeps_its_configuration_and_messages(nats_server: NatsServer) -> None:
    name = unique("REPAIR").upper()
    conn = await Connection.open(Settings.from_url(nats_server.url))
    try:
        js = conn.js
        await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], max_msgs_per_subject=50,
                                         description="a queue"))  # fmt: skip
        sent = [(f"{name}.{i % 3}", {"Nats-Msg-Id": f"m{i}", "Mesh-Reply": f"r.{i}"}, f"payload {i}".encode())
                for i in range(40)]  # fmt: skip
        for subject, headers, data in sent:
            await js.publish(subject, data, headers=headers)
        await js.delete_msg(name, 5)  # a gap
        assert await rebuild(js, name) == 39
        info = await js.stream_info(name)
        assert info.config.description == "a queue" and info.config.max_msgs_per_subject == 50
        got = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(name, seq=seq)
            got.append((msg.subject, {k: msg.headers[k] for k in ("Nats-Msg-Id", "Mesh-Reply")}, msg.data))
        assert got == [m for i, m in enumerate(sent) if i != 4]
    finally:
        await conn.close()


async def test_probes_store_and_leave_nothing(nats_server: NatsServer) -> None:
    conn = await Connection.open(Settings.from_url(nats_server.url))
    try:
        for stream in (STREAM_INFER, f"KV_{BUCKET_WORKERS}"):
            assert await probe(conn.js, stream) is None
            info = await conn.js.stream_info(stream, subjects_filter=probe_subject(stream))
            assert not info.state.subjects  # purged at once
        assert "_probe" not in await (await Registry.open(conn)).heartbeats()
        assert await probe(conn.js, "KV_no-such-bucket") is None  # nothing to say of what does not exist
    finally:
        await conn.close()
