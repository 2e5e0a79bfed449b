"""The Open Inference Protocol's REST API (``/v2/...``) with Triton's binary tensor extension, on
aiohttp. A client that disconnects cancels its handler, and so its mesh request."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from schemas.errors import BadInput, MeshError
from schemas.spec import ModelSpec
from servemesh.gateway.core import Caller, Gateway, model_config, platform_of, tensor_metadata
from servemesh.gateway.metrics import CLIENT_CLOSED, GatewayMetrics
from servemesh.gateway.tensors import from_binary, from_json, to_binary, to_json

__all__ = ["EXTENSIONS", "rest_app"]

log = logging.getLogger(__name__)

EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]
_HEADER_LENGTH = "Inference-Header-Content-Length"
_MAX_BODY = 256 * 1024 * 1024
_COMPRESS_FROM = 4096  # bytes: a smaller reply costs more to compress than it saves
_METRICS = web.AppKey("metrics", GatewayMetrics)
_MODEL = "servemesh.model"  # the request's model, once found and allowed

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _server_version() -> str:
    try:
        return version("servemesh")
    except PackageNotFoundError:
        return "0"


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as ``{"error": "..."}`` with the mesh error's status (the one mapping, in core), and
    every call counted in the gateway's metrics."""
    started, status = time.perf_counter(), 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except MeshError as err:
        status = err.status
        return _error(err.status, err.message)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status >= 400:
            return _error(exc.status, exc.reason)
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    except Exception:
        log.exception("gateway: %s %s failed", request.method, request.path)
        return _error(500, "internal error in the gateway")
    finally:
        endpoint = getattr(request.match_info.route.handler, "__name__", "") if request.match_info.route else ""
        metrics: GatewayMetrics = request.app[_METRICS]
        metrics.record("rest", endpoint or "unmatched", request.get(_MODEL, ""), status, time.perf_counter() - started)


def _key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("X-API-Key")


class _Routes:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def _caller(self, request: web.Request) -> Caller:
        return await self.gateway.caller(_key(request))

    async def _spec(self, request: web.Request) -> tuple[Caller, ModelSpec, str | None]:
        caller = await self._caller(request)
        wanted = request.match_info.get("version")
        spec = await self.gateway.spec(caller, request.match_info["model"], wanted)
        request[_MODEL] = spec.name  # found and allowed: a name the metrics may carry
        return caller, spec, wanted

    async def server(self, request: web.Request) -> web.Response:
        return _json({"name": "servemesh", "version": _server_version(), "extensions": EXTENSIONS})

    # Health answers carry the spec's bodies ({"live": ...}, {"ready": ...}) beside their status codes:
    # Triton's clients read the status, KServe's the body.
    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.gateway.connected
        return _json({"ready": ready}, 200 if ready else 503)

    async def metadata(self, request: web.Request) -> web.Response:
        _, spec, wanted = await self._spec(request)
        batched = spec.max_batch_size > 0
        return _json({
            "name": spec.name, "versions": [wanted] if wanted else sorted(spec.versions),
            "platform": platform_of(spec, wanted), "inputs": tensor_metadata(spec.inputs, batched),
            "outputs": tensor_metadata(spec.outputs, batched),
        })  # fmt: skip

    async def model_ready(self, request: web.Request) -> web.Response:
        _, spec, wanted = await self._spec(request)
        ready = await self.gateway.ready_versions(spec)
        is_ready = ready.get(wanted, 0) > 0 if wanted else any(ready.values())
        return _json({"name": spec.name, "ready": is_ready}, 200 if is_ready else 503)

    async def config(self, request: web.Request) -> web.Response:
        _, spec, _ = await self._spec(request)
        return _json(model_config(spec))

    async def stats(self, request: web.Request) -> web.Response:
        caller, match = await self._caller(request), request.match_info
        stats = await self.gateway.statistics(caller, match.get("model"), match.get("version"))
        return _json({"model_stats": stats})

    async def index(self, request: web.Request) -> web.Response:
        body = await _body(request)
        doc = _loads(body) if body.strip() else {}
        ready_only = _dict(doc, "the request body").get("ready", False) is True
        return _json(await self.gateway.index(await self._caller(request), ready_only))

    async def load(self, request: web.Request) -> web.Response:
        await self.gateway.load(await self._caller(request), request.match_info["model"])
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        await self.gateway.unload(await self._caller(request), request.match_info["model"])
        return web.Response(status=200)

    async def infer(self, request: web.Request) -> web.Response:
        caller, spec, wanted = await self._spec(request)
        body = await _body(request)
        header, binary = _split(body, request.headers.get(_HEADER_LENGTH))
        doc = _loads(header)
        if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
            raise BadInput('the request needs "inputs": a list of tensors')
        parameters = _dict(doc.get("parameters"), "parameters")
        inputs = _inputs(doc["inputs"], binary)
        answered, outputs = await self.gateway.infer(caller, spec, wanted, inputs, parameters)
        head: dict[str, Any] = {"model_name": spec.name, "model_version": answered, "outputs": []}
        if "id" in doc:
            head["id"] = doc["id"]
        chunks: list[bytes] = []
        nonfinite = False
        for name, binary_out in _wanted_outputs(doc, parameters, outputs):
            array = outputs[name]
            if binary_out:
                datatype, shape, raw = to_binary(array)
                head["outputs"].append({"name": name, "datatype": datatype, "shape": shape,
                                        "parameters": {"binary_data_size": len(raw)}})  # fmt: skip
                chunks.append(raw)
            else:
                datatype, shape, data = to_json(array)
                head["outputs"].append({"name": name, "datatype": datatype, "shape": shape, "data": data})
                nonfinite = nonfinite or (array.dtype.kind == "f" and not np.isfinite(array).all())
        # orjson writes NaN and ±Infinity as null; the standard library writes the tokens Triton's clients read.
        encoded = json.dumps(head, separators=(",", ":")).encode() if nonfinite else orjson.dumps(head)
        headers = {"Content-Type": "application/json"}
        if chunks:
            headers = {"Content-Type": "application/octet-stream", _HEADER_LENGTH: str(len(encoded))}
        return _compressed(request, encoded + b"".join(chunks), headers)


def _loads(body: bytes | memoryview) -> Any:
    """A JSON document, with the NaN and ±Infinity tokens Triton's parser takes (perf_analyzer's random FP32
    data has them). orjson rejects those, so such a body goes through the standard library's parser."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(bytes(body))
        except ValueError:
            raise BadInput(f"the request body is not JSON: {exc}") from None


async def _body(request: web.Request) -> bytes:
    """The request body, decompressed (aiohttp undoes gzip and deflate Content-Encoding itself)."""
    return await request.read()


def _compressed(request: web.Request, body: bytes, headers: dict[str, str]) -> web.Response:
    """The reply, gzip- or deflate-compressed when the client accepts it and it is large enough to gain."""
    accepted = request.headers.get("Accept-Encoding", "").lower() if len(body) >= _COMPRESS_FROM else ""
    if "gzip" in accepted:
        return web.Response(body=gzip.compress(body, 1), headers={**headers, "Content-Encoding": "gzip"})
    if "deflate" in accepted:
        return web.Response(body=zlib.compress(body, 1), headers={**headers, "Content-Encoding": "deflate"})
    return web.Response(body=body, headers=headers)


def _split(body: bytes, length: str | None) -> tuple[bytes, memoryview]:
    """The JSON part and the binary part after it (Triton's ``Inference-Header-Content-Length``)."""
    if length is None:
        return body, memoryview(b"")
    if not length.isdigit() or int(length) > len(body):
        raise BadInput(f"{_HEADER_LENGTH}: {length!r} is not a length within the body ({len(body)} bytes)")
    n = int(length)
    return body[:n], memoryview(body)[n:]


def _dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInput(f"{what}: an object, not {type(value).__name__}")
    return value


def _inputs(tensors: list[Any], binary: memoryview) -> dict[str, np.ndarray[Any, Any]]:
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    offset = 0
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, dict):
            raise BadInput(f"inputs[{i}]: an object with name, shape, datatype and data")
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
            raise BadInput(f"inputs[{i}]: name and datatype are strings, shape a list")
        if name in inputs:
            raise BadInput(f"input {name!r} given twice")
        size = _dict(tensor.get("parameters"), f"input {name!r} parameters").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadInput(f"input {name!r}: binary_data_size {size!r} runs past the body")
            inputs[name] = from_binary(name, datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in tensor:
            inputs[name] = from_json(name, datatype, shape, tensor["data"])
        else:
            raise BadInput(f'input {name!r}: no data (neither "data" nor parameters.binary_data_size)')
    if offset != len(binary):
        raise BadInput(f"{len(binary) - offset} bytes of binary data belong to no input")
    return inputs


def _wanted_outputs(
    doc: dict[str, Any], parameters: dict[str, Any], outputs: dict[str, np.ndarray[Any, Any]]
) -> list[tuple[str, bool]]:
    """(name, as binary) of each output to send: those asked for, else all."""
    default_binary = bool(parameters.get("binary_data_output", False))
    asked = doc.get("outputs")
    if asked is None:
        return [(name, default_binary) for name in outputs]
    if not isinstance(asked, list):
        raise BadInput('"outputs": a list of {"name": ...}')
    chosen = []
    for i, out in enumerate(asked):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise BadInput(f"outputs[{i}]: an object with a name")
        if out["name"] not in outputs:
            raise BadInput(f"output {out['name']!r}: the model has {', '.join(sorted(outputs))}")
        params = _dict(out.get("parameters"), f"output {out['name']!r} parameters")
        chosen.append((out["name"], bool(params.get("binary_data", default_binary))))
    return chosen


def rest_app(gateway: Gateway) -> web.Application:
    routes = _Routes(gateway)
    app = web.Application(middlewares=[_errors], client_max_size=_MAX_BODY)
    app[_METRICS] = gateway.metrics
    app.router.add_get("/v2/models/stats", routes.stats)  # before /v2/models/{model}, which would take it
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(prefix, routes.metadata)
        app.router.add_get(prefix + "/ready", routes.model_ready)
        app.router.add_get(prefix + "/config", routes.config)
        app.router.add_get(prefix + "/stats", routes.stats)
        app.router.add_post(prefix + "/infer", routes.infer)
    app.router.add_get("/v2", routes.server)
    app.router.add_get("/v2/health/live", routes.live)
    app.router.add_get("/v2/health/ready", routes.ready)
    app.router.add_post("/v2/repository/index", routes.index)
    app.router.add_post("/v2/repository/models/{model}/load", routes.load)
    app.router.add_post("/v2/repository/models/{model}/unload", routes.unload)
    return app
