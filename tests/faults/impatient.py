"""A client that queues many requests and then dies before their replies arrive:
``python -m tests.faults.impatient URL MODEL COUNT`` prints "sent" once all are published."""

from __future__ import annotations

import asyncio
import sys

import numpy as np

from servemesh import MeshClient


async def main(url: str, model: str, count: int) -> None:
    client = await MeshClient.connect(url)
    x = np.zeros((1, 4), np.float32)
    tasks = [asyncio.create_task(client.infer(model, {"input": x}, timeout=60)) for _ in range(count)]
    await asyncio.sleep(0)
    while len(client._pending) + sum(t.done() for t in tasks) < count:  # every request published
        await asyncio.sleep(0.001)
    await client._conn.nc.flush()
    print("sent", flush=True)
    await asyncio.gather(*tasks, return_exceptions=True)  # never reached: the test kills us first


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
