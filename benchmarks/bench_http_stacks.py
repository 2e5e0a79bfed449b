"""Which HTTP server and JSON library the gateway should sit on: an echo of an identity request on
aiohttp and on uvicorn (httptools, a bare ASGI app), driven by the same load generator at
concurrency 1 and 64; and the JSON of an MLP request (512 floats) decoded and encoded by the
standard library and by orjson. One run, printed as a table.

Run from the repository root: ``python benchmarks/bench_http_stacks.py`` (needs ``pip install uvicorn
httptools orjson``, which servemesh itself does not).
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import json
import subprocess
import timeit
from typing import Any

import numpy as np

from benchmarks.bench_gateway import _cell, _free_port, _wait_port


def _aiohttp(port: int) -> None:
    from aiohttp import web

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type=request.content_type)

    app = web.Application()
    app.router.add_post("/echo", echo)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _uvicorn(port: int) -> None:
    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, host="127.0.0.1", port=port, http="httptools", loop="uvloop", log_level="warning",
                access_log=False)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        {"aiohttp": _aiohttp, "uvicorn": _uvicorn}[args.serve[0]](int(args.serve[1]))
        return
    print("| server | protocol | concurrency | req/s | p50 ms | p99 ms | server CPU µs/request |")
    print("|---|---|---|---|---|---|---|")
    for stack in ("aiohttp", "uvicorn"):
        port = _free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve", stack, str(port)], cwd=REPO_ROOT)
        try:
            _wait_port(port)
            for concurrency in (1, 64):
                for kind in ("json", "binary"):
                    cell = _cell(f"http://127.0.0.1:{port}", kind, "echo", concurrency, args.seconds,
                                 {"server": server.pid})  # fmt: skip
                    print(f"| {stack} | {kind} | {concurrency} | {cell['rps']:,.0f} | {cell['p50']:.2f} | "
                          f"{cell['p99']:.2f} | {cell['cpu_us']['server']:.0f} |", flush=True)  # fmt: skip
        finally:
            server.terminate()
            server.wait()
    import orjson

    row = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    doc = {"inputs": [{"name": "input", "shape": [1, 512], "datatype": "FP32", "data": row.tolist()}]}
    raw = json.dumps(doc).encode()
    n = 2000
    timings = {
        "json.loads": timeit.timeit(lambda: json.loads(raw), number=n) / n * 1e6,
        "orjson.loads": timeit.timeit(lambda: orjson.loads(raw), number=n) / n * 1e6,
        "json.dumps": timeit.timeit(lambda: json.dumps(doc, separators=(",", ":")).encode(), number=n) / n * 1e6,
        "orjson.dumps": timeit.timeit(lambda: orjson.dumps(doc), number=n) / n * 1e6,
    }
    print("\n| JSON of one MLP request (512 floats) | µs |\n|---|---|")
    for name, us in timings.items():
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
