"""An MLServer runtime for an ONNX model on onnxruntime, for benchmarks/bench_gateway.py's comparison:
MLServer's own adaptive batching in front, the same session settings servemesh's worker uses behind.
It runs inside MLServer's environment (``pip install mlserver onnxruntime``), not servemesh's."""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1  # as workers/runtimes/onnx.py sets them
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        uri = self.settings.parameters.uri
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = NumpyCodec.decode_input(payload.inputs[0])
        results = self._session.run(None, {self._input: rows})
        outputs = [NumpyCodec.encode_output(name, value) for name, value in zip(self._outputs, results, strict=True)]
        return InferenceResponse(model_name=self.name, outputs=outputs)
