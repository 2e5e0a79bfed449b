"""A bare NATS core echo in its own process: the transport ceiling bench_mesh.py compares the mesh with.

Usage: ``python benchmarks/echo_responder.py NATS_URL SUBJECT [asyncio|uvloop]``; prints ``ready`` once subscribed,
stops on SIGTERM. The loop argument matches the worker's, so both sides run the same event loop.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import nats
from nats.aio.msg import Msg

from broker.loop import run


async def serve(url: str, subject: str) -> None:
    # The same connection options as a mesh worker, so the two sides are configured alike.
    nc = await nats.connect(url, name="bench-echo", pending_size=64 * 1024 * 1024)

    async def echo(msg: Msg) -> None:
        await nc.publish(msg.reply, msg.data)

    await nc.subscribe(subject, cb=echo, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await nc.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await nc.drain()


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    loop = sys.argv[3] if len(sys.argv) == 4 else "asyncio"
    run(serve(sys.argv[1], sys.argv[2]), loop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
