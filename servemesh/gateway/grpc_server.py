"""The Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``) on grpcio's asyncio
server, with the standard gRPC health service beside it. A cancelled call cancels its mesh request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from schemas.errors import BadInput, MeshError
from servemesh.gateway.core import Caller, Gateway, grpc_code, model_config, platform_of, tensor_metadata
from servemesh.gateway.metrics import CLIENT_CLOSED
from servemesh.gateway.proto import grpc_predict_v2_pb2 as pb
from servemesh.gateway.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from servemesh.gateway.rest import EXTENSIONS, _server_version
from servemesh.gateway.tensors import contents_field, from_binary, from_contents, to_binary

__all__ = ["add_services", "set_serving"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def _parameters(params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, param in params.items():
        which = param.WhichOneof("parameter_choice")
        if which is not None:
            out[name] = getattr(param, which)
    return out


def _key(context: grpc.aio.ServicerContext) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[7:].strip()
        if name == "x-api-key" and isinstance(value, str):
            return value
    return None


class _Call:
    """What one call learns that its metrics carry: the model, once found and allowed."""

    model = ""


class _Service(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def _guarded(
        self, context: grpc.aio.ServicerContext, endpoint: str, work: Callable[[_Call], Awaitable[T]]
    ) -> T:
        """Runs a call: a mesh error becomes its gRPC code, and the call is counted in the metrics."""
        call, started, status = _Call(), time.perf_counter(), 500
        try:
            result = await work(call)
            status = 200
            return result
        except MeshError as err:
            status = err.status
            await context.abort(getattr(grpc.StatusCode, grpc_code(err)), err.message)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        except Exception:
            log.exception("gateway: gRPC call failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the gateway")
        finally:
            self.gateway.metrics.record("grpc", endpoint, call.model, status, time.perf_counter() - started)
        raise AssertionError("abort returned")  # context.abort always raises

    async def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        return await self.gateway.caller(_key(context))

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.gateway.connected)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name="servemesh", version=_server_version(), extensions=EXTENSIONS)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work(call: _Call) -> Any:
            spec = await self.gateway.spec(await self._caller(context), request.name, request.version or None)
            call.model = spec.name
            ready = await self.gateway.ready_versions(spec)
            is_ready = ready.get(request.version, 0) > 0 if request.version else any(ready.values())
            return pb.ModelReadyResponse(ready=is_ready)

        return await self._guarded(context, "model_ready", work)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work(call: _Call) -> Any:
            wanted = request.version or None
            spec = await self.gateway.spec(await self._caller(context), request.name, wanted)
            call.model = spec.name
            batched = spec.max_batch_size > 0

            def tensors(meta: list[dict[str, Any]]) -> list[Any]:
                return [pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta]

            return pb.ModelMetadataResponse(
                name=spec.name, versions=[wanted] if wanted else sorted(spec.versions),
                platform=platform_of(spec, wanted), inputs=tensors(tensor_metadata(spec.inputs, batched)),
                outputs=tensors(tensor_metadata(spec.outputs, batched)),
            )  # fmt: skip

        return await self._guarded(context, "metadata", work)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work(call: _Call) -> Any:
            caller = await self._caller(context)
            wanted = request.model_version or None
            spec = await self.gateway.spec(caller, request.model_name, wanted)
            call.model = spec.name
            inputs = _inputs(request)
            answered, outputs = await self.gateway.infer(caller, spec, wanted, inputs, _parameters(request.parameters))
            names = [o.name for o in request.outputs] or list(outputs)
            response = pb.ModelInferResponse(model_name=spec.name, model_version=answered, id=request.id)
            for name in names:
                if name not in outputs:
                    raise BadInput(f"output {name!r}: the model has {', '.join(sorted(outputs))}")
                datatype, shape, raw = to_binary(outputs[name])
                response.outputs.append(pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype,
                                                                                shape=shape))  # fmt: skip
                response.raw_output_contents.append(raw)
            return response

        return await self._guarded(context, "infer", work)

    # -- Triton's extensions: the same documents as REST's, parsed into Triton's messages ----------

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work(call: _Call) -> Any:
            spec = await self.gateway.spec(await self._caller(context), request.name, request.version or None)
            call.model = spec.name
            return pb.ModelConfigResponse(config=json_format.ParseDict(model_config(spec), pb.ModelConfig()))

        return await self._guarded(context, "config", work)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work(call: _Call) -> Any:
            caller = await self._caller(context)
            stats = await self.gateway.statistics(caller, request.name or None, request.version or None)
            return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

        return await self._guarded(context, "stats", work)

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work(call: _Call) -> Any:
            index = await self.gateway.index(await self._caller(context), request.ready)
            return json_format.ParseDict({"models": index}, pb.RepositoryIndexResponse())

        return await self._guarded(context, "index", work)

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work(call: _Call) -> Any:
            await self.gateway.load(await self._caller(context), request.model_name)
            return pb.RepositoryModelLoadResponse()

        return await self._guarded(context, "load", work)

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work(call: _Call) -> Any:
            await self.gateway.unload(await self._caller(context), request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._guarded(context, "unload", work)


def _inputs(request: Any) -> dict[str, np.ndarray[Any, Any]]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: one each, in order")
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise BadInput(f"input {tensor.name!r} given twice")
        shape = list(tensor.shape)
        if raw:
            inputs[tensor.name] = from_binary(tensor.name, tensor.datatype, shape, raw[i])
        else:
            values = getattr(tensor.contents, contents_field(tensor.datatype))
            inputs[tensor.name] = from_contents(tensor.name, tensor.datatype, shape, values)
    return inputs


def add_services(server: grpc.aio.Server, gateway: Gateway) -> health.aio.HealthServicer:
    """The inference service and the health service (status SERVING once the gateway is connected)."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Service(gateway), server)  # type: ignore[no-untyped-call]
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    return checks


async def set_serving(checks: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", "inference.GRPCInferenceService"):
        await checks.set(name, status)
