"""Real clients of sluice's inference API, for integration-tests/serving.rs: tritonclient's HTTP
and gRPC clients (from PyPI, as users would run them), raw HTTP for malformed bodies, and
PyTorch for the reference outputs. Each command prints one JSON object; a failed check raises.

  outputs HTTP GRPC MODEL_PT EVENTS    tensor and named-field requests on both protocols,
                                       against PyTorch on the same inputs and features
  score HTTP GRPC EVENTS               each event's score, by its fields (one request each)
  burst HTTP GRPC N                    N concurrent requests on each protocol: their statuses
  errors HTTP GRPC                     malformed requests: statuses and reasons
  pinned HTTP GRPC MODEL MODEL_PT...   each version (named by its folder) pinned
  hammer HTTP GRPC MODEL STOP          requests until the file STOP exists: failures, versions
"""

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import torch
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

sys.path.insert(0, os.path.dirname(__file__))
from models import features  # noqa: E402  (the test pipeline's feature encoding)

torch.set_num_threads(1)
MODEL = "risk"


def clients(http, grpc):
    return [("http", th, th.InferenceServerClient(http)), ("grpc", tg, tg.InferenceServerClient(grpc))]


def tensor_input(mod, x):
    i = mod.InferInput("features", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def field_inputs(mod, events, binary=True):
    """One tensor per field of the test schema, [n] each."""
    cols = {
        "id": ("BYTES", [e["id"] for e in events]),
        "customer": ("BYTES", [e["customer"] for e in events]),
        "amount": ("FP64", [e["amount"] for e in events]),
        "currency": ("BYTES", [e.get("currency", "") for e in events]),
        "at": ("BYTES", [e["at"] for e in events]),
    }
    out = []
    for name, (dt, values) in cols.items():
        if name == "currency" and any(v == "" for v in values):
            continue
        arr = np.array([v.encode() for v in values], dtype=object) if dt == "BYTES" else np.array(values)
        i = mod.InferInput(name, [len(events)], dt)
        if mod is th:
            i.set_data_from_numpy(arr, binary_data=binary)
        else:
            i.set_data_from_numpy(arr)
        out.append(i)
    return out


def event_input(mod, events):
    i = mod.InferInput("event", [len(events)], "BYTES")
    i.set_data_from_numpy(np.array([json.dumps(e).encode() for e in events], dtype=object))
    return i


def reference(model_pt, x):
    m = torch.jit.load(model_pt)
    m.eval()
    with torch.no_grad():
        return m(torch.tensor(x, dtype=torch.float32)).reshape(-1).numpy()


def outputs(http, grpc, model_pt, events_file):
    events = [json.loads(line) for line in open(events_file) if line.strip()]
    rng = np.random.default_rng(7)
    x = (rng.random((7, 4)) * np.array([900.0, 1.0, 1.0, 23.0])).astype(np.float32)
    want_x = reference(model_pt, x)
    want_events = reference(model_pt, [features(e) for e in events])
    result = {}
    for proto, mod, c in clients(http, grpc):
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL), proto
        md = c.get_model_metadata(MODEL)
        names = [i["name"] for i in md["inputs"]] if proto == "http" else [i.name for i in md.inputs]
        assert names[0] == "features" and "amount" in names and "event" in names, names
        r = c.infer(MODEL, [tensor_input(mod, x)])
        got = r.as_numpy("score")
        result[f"{proto}_tensor_max_diff"] = float(np.abs(got - want_x).max())
        version = r.get_response()["model_version"] if proto == "http" else r.get_response().model_version
        result[f"{proto}_version"] = version
        by_fields = c.infer(MODEL, field_inputs(mod, events)).as_numpy("score")
        by_event = c.infer(MODEL, [event_input(mod, events)]).as_numpy("score")
        result[f"{proto}_fields_max_diff"] = float(np.abs(by_fields - want_events).max())
        result[f"{proto}_event_max_diff"] = float(np.abs(by_event - want_events).max())
        if proto == "http":
            # The same request as JSON arrays, no binary data.
            js = c.infer(MODEL, field_inputs(mod, events, binary=False),
                         outputs=[th.InferRequestedOutput("score", binary_data=False)])
            result["http_json_max_diff"] = float(np.abs(js.as_numpy("score") - want_events).max())
    print(json.dumps(result))


def score(http, grpc, events_file):
    events = [json.loads(line) for line in open(events_file) if line.strip()]
    out = {}
    for e in events:
        scores = [float(c.infer(MODEL, field_inputs(mod, [e])).as_numpy("score")[0])
                  for _, mod, c in clients(http, grpc)]
        assert scores[0] == scores[1], (e["id"], scores)
        out[e["id"]] = scores[0]
    print(json.dumps(out))


def burst(http, grpc, n):
    n = int(n)
    x = np.ones((1, 4), dtype=np.float32)
    counts = {"http": {}, "grpc": {}}
    hints = {"http": [], "grpc": []}
    lock = threading.Lock()

    def one(proto):
        try:
            if proto == "http":
                body = json.dumps({"inputs": [{"name": "features", "datatype": "FP32",
                                               "shape": [1, 4], "data": x.tolist()}]}).encode()
                req = urllib.request.Request(f"http://{http}/v2/models/{MODEL}/infer", data=body)
                try:
                    urllib.request.urlopen(req, timeout=60).read()
                    code = "200"
                except urllib.error.HTTPError as e:
                    code = str(e.code)
                    if e.code == 429:
                        with lock:
                            hints["http"].append(int(e.headers["Retry-After-Ms"]))
            else:
                c = tg.InferenceServerClient(grpc)
                try:
                    c.infer(MODEL, [tensor_input(tg, x)], client_timeout=60)
                    code = "OK"
                except InferenceServerException as e:
                    code = e.status().replace("StatusCode.", "")
                    if code == "RESOURCE_EXHAUSTED":
                        with lock:
                            hints["grpc"].append(1)
        except Exception as e:  # a hang or a broken connection is a failure of the test
            code = f"error: {e}"
        with lock:
            counts[proto][code] = counts[proto].get(code, 0) + 1

    started = time.time()
    threads = [threading.Thread(target=one, args=(p,)) for p in ("http", "grpc") for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"counts": counts, "retry_after_ms": hints["http"], "grpc_hints": len(hints["grpc"]),
                      "seconds": time.time() - started}))


def errors(http, grpc):
    def post(path, body, headers=None):
        req = urllib.request.Request(f"http://{http}{path}", data=body, headers=headers or {})
        try:
            r = urllib.request.urlopen(req, timeout=30)
            return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())["error"]

    infer = f"/v2/models/{MODEL}/infer"
    # A binary request whose data is 4 bytes short of what its header says.
    head = b'{"inputs":[{"name":"features","datatype":"FP32","shape":[1,4],"parameters":{"binary_data_size":16}}]}'
    out = {
        "not_json": post(infer, b"{oops"),
        "wrong_width": post(infer, json.dumps({"inputs": [{"name": "features", "datatype": "FP32",
                                                           "shape": [1, 3], "data": [1, 2, 3]}]}).encode()),
        "shape_mismatch": post(infer, json.dumps({"inputs": [{"name": "features", "datatype": "FP32",
                                                              "shape": [2, 4], "data": [1, 2, 3, 4]}]}).encode()),
        "unknown_field": post(infer, json.dumps({"inputs": [{"name": "colour", "datatype": "BYTES",
                                                             "shape": [1], "data": ["red"]}]}).encode()),
        "invalid_event": post(infer, json.dumps({"inputs": [{"name": "event", "datatype": "BYTES", "shape": [1],
                                                             "data": ['{"id":"x","amount":-1}']}]}).encode()),
        "binary_too_short": post(infer, head + bytes(12), {"Inference-Header-Content-Length": str(len(head))}),
        "unknown_model": post("/v2/models/nope/infer", b'{"inputs":[]}'),
        "unknown_version": post(f"/v2/models/{MODEL}/versions/99/infer", json.dumps(
            {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}).encode()),
    }
    c = tg.InferenceServerClient(grpc)

    def grpc_status(call):
        try:
            call()
            return "OK"
        except InferenceServerException as e:
            return e.status().replace("StatusCode.", "")

    bad = tg.InferInput("features", [1, 3], "FP32")
    bad.set_data_from_numpy(np.ones((1, 3), dtype=np.float32))
    good = tensor_input(tg, np.ones((1, 4), dtype=np.float32))
    out["grpc_wrong_width"] = grpc_status(lambda: c.infer(MODEL, [bad]))
    out["grpc_unknown_model"] = grpc_status(lambda: c.infer("nope", [good]))
    out["grpc_unknown_version"] = grpc_status(lambda: c.infer(MODEL, [good], model_version="99"))
    out["grpc_metadata_unknown"] = grpc_status(lambda: c.get_model_metadata("nope"))
    print(json.dumps(out))


def pinned(http, grpc, *models):
    """models: version=path pairs."""
    x = (np.random.default_rng(3).random((5, 4)) * np.array([900.0, 1.0, 1.0, 23.0])).astype(np.float32)
    out = {}
    for pair in models:
        version, path = pair.split("=", 1)
        want = reference(path, x)
        for proto, mod, c in clients(http, grpc):
            r = c.infer(MODEL, [tensor_input(mod, x)], model_version=version)
            got_version = r.get_response()["model_version"] if proto == "http" else r.get_response().model_version
            assert got_version == version, (proto, version, got_version)
            out[f"{proto}_v{version}_max_diff"] = float(np.abs(r.as_numpy("score") - want).max())
    print(json.dumps(out))


def hammer(http, grpc, stop):
    x = np.ones((2, 4), dtype=np.float32)
    versions, failures, ok = {}, [], 0
    lock = threading.Lock()

    def loop(proto, mod, c):
        nonlocal ok
        while not os.path.exists(stop):
            try:
                r = c.infer(MODEL, [tensor_input(mod, x)])
                v = r.get_response()["model_version"] if proto == "http" else r.get_response().model_version
                with lock:
                    ok += 1
                    versions[v] = versions.get(v, 0) + 1
            except Exception as e:
                with lock:
                    failures.append(f"{proto}: {e}")

    # A client per thread: tritonclient's clients are not shared between threads.
    threads = [threading.Thread(target=loop, args=clients(http, grpc)[i % 2]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"ok": ok, "failures": failures[:5], "failed": len(failures), "versions": versions}))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"outputs": outputs, "score": score, "burst": burst, "errors": errors, "pinned": pinned,
     "hammer": hammer}[command](*args)
