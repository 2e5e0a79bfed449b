"""Drive the gateway with the KServe SDK's REST client (kserve.InferenceRESTClient, protocol v2).

Runs in a virtual environment of its own: the KServe SDK pins protobuf below the version servemesh's
generated gRPC code needs, so the two cannot share one. Usage: ``python kserve_client.py BASE_URL`` with
the iris rows as a JSON list on stdin; prints one JSON document of what the client saw.
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(base_url: str, rows: np.ndarray) -> dict[str, object]:
    seen: dict[str, object] = {}
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
    try:
        seen["ready"] = await client.is_server_ready(base_url)
        seen["model_ready"] = await client.is_model_ready(base_url, "iris")
        for binary in (True, False):
            tensor = InferInput("input", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows, binary_data=binary)
            request = InferRequest(model_name="iris", infer_inputs=[tensor], request_id=f"ks-{binary}")
            response = await client.infer(base_url, request, model_name="iris")
            seen[f"binary={binary}"] = {
                "id": response.id,
                "outputs": {out.name: out.as_numpy().tolist() for out in response.outputs},
            }
        try:
            await client.infer(base_url, {"inputs": []}, model_name="nope")
        except httpx.HTTPStatusError as err:
            seen["unknown"] = {"status": err.response.status_code, "message": str(err)}
    finally:
        await client.close()
    return seen


if __name__ == "__main__":
    data = np.asarray(json.load(sys.stdin), dtype=np.float32)
    print(json.dumps(asyncio.run(main(sys.argv[1], data))))
