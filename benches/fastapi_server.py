"""The inference API a team would write in Python instead of sluice's: FastAPI + uvicorn +
TorchScript, serving the same model file by the same protocol (the Open Inference Protocol's
REST `infer`, the model's `features` tensor as JSON), one forward pass per request, as such
services are usually written (with orjson instead of pydantic models, and the forward pass
inline rather than in a thread pool: a pass of a few rows takes well under a millisecond).
scripts/bench.sh runs it with as many uvicorn workers as the machine has cores, each with one
libtorch thread, and loads it with the same generator as sluice (`sluice-bench load`).

    MODEL_PATH=models/fraud/1/model.pt uvicorn benches.fastapi_server:app --workers 2 --port 8000
"""

import os

import orjson
import torch
from fastapi import FastAPI, HTTPException, Request, Response

torch.set_num_threads(1)
NAME = os.environ.get("MODEL_NAME", "fraud")
OUTPUT = os.environ.get("MODEL_OUTPUT", "fraud_score")
model = torch.jit.load(os.environ["MODEL_PATH"])
model.eval()
app = FastAPI()


@app.get("/v2/health/ready")
async def ready():
    return {}


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request):
    if name != NAME:
        raise HTTPException(404, f"model {name!r} is not served here")
    doc = orjson.loads(await request.body())
    tensor = doc["inputs"][0]
    x = torch.tensor(tensor["data"], dtype=torch.float32).reshape(tensor["shape"])
    with torch.inference_mode():
        y = model(x).reshape(-1)
    return Response(
        orjson.dumps({
            "model_name": NAME,
            "model_version": "1",
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [int(y.shape[0])],
                         "data": y.tolist()}],
        }),
        media_type="application/json",
    )
