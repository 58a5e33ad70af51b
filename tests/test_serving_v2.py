"""Open Inference Protocol, raw binary path, Prometheus metrics and connection bounds, over real HTTP."""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import re
import socket
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.protocol import MAX_HEAD_BYTES, MAX_PIPELINED, REFUSALS
from serving.settings import Settings
from tests.test_serving import exported, free_port, in_thread, torch_probabilities  # noqa: F401  (fixture)

MAX_BATCH = 16
MAX_BODY = 64 * 1024
READ_TIMEOUT = 1.0
NAME = "digits"  # a plain file is served under its stem


@pytest.fixture(scope="module")
def url(exported):  # noqa: F811
    settings = Settings(model_uri=str(exported["path"]), port=free_port(), max_batch=MAX_BATCH,
                        max_body_bytes=MAX_BODY, read_timeout=READ_TIMEOUT, log_level="warning")
    with in_thread(settings) as base:
        yield base


@pytest.fixture()
def http(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def _classes(http: httpx.Client, x: np.ndarray) -> list[int]:
    answer = http.post("/predict", json={"inputs": x.tolist()})
    assert answer.status_code == 200, answer.text
    return [p["class_index"] for p in answer.json()["predictions"]]


# ---------------------------------------------------------------- a third-party client: tritonclient.http

@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_infers_the_same_classes_as_predict(url, http, exported, binary):
    import tritonclient.http as triton

    x = exported["x"][:MAX_BATCH]
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    meta = client.get_model_metadata(NAME)
    assert meta["platform"] == "onnxruntime" and meta["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "logits": "FP32", "probabilities": "FP32", "class_index": "INT64"}
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "class_index")]
    result = client.infer(NAME, [tensor], outputs=outputs, request_id="r1")
    assert result.get_response()["id"] == "r1"
    logits, classes = result.as_numpy("logits"), result.as_numpy("class_index")
    assert logits.shape == (len(x), 10) and classes.dtype == np.int64
    assert classes.tolist() == _classes(http, x) == torch_probabilities(exported["model"], x).argmax(1).tolist()
    everything = client.infer(NAME, [tensor])  # no outputs named: all of them, binary
    np.testing.assert_allclose(everything.as_numpy("probabilities").sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(everything.as_numpy("logits"), logits, atol=1e-5)
    client.close()


def test_v2_json_tensors_without_a_client_library(http, exported):
    x = exported["x"][:3]
    for data in (x.ravel().tolist(), x.tolist()):  # flat row-major, or nested
        body = {"inputs": [{"name": "input", "shape": [3, 1, 8, 8], "datatype": "FP32", "data": data}],
                "outputs": [{"name": "class_index"}]}
        answer = http.post(f"/v2/models/{NAME}/infer", json=body)
        assert answer.status_code == 200, answer.text
        out = answer.json()
        assert out["model_name"] == NAME and out["outputs"] == [
            {"name": "class_index", "datatype": "INT64", "shape": [3], "data": _classes(http, x)}]
    assert http.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    assert http.get("/v2/health/live").status_code == 200


def _v2_body(shape=(1, 1, 8, 8), datatype="FP32", name="input", **extra) -> dict:
    tensor = {"name": name, "shape": list(shape), "datatype": datatype,
              "data": [0.5] * 64 * int(shape[0]), **extra}
    return {"inputs": [tensor]}


V2_ERRORS = {
    "unknown model": ("/v2/models/nope/infer", _v2_body(), {}, 404, "model 'nope' is not served here"),
    "unknown version": (f"/v2/models/{NAME}/versions/7/infer", _v2_body(), {}, 404, "no version '7'"),
    "wrong datatype": (None, _v2_body(datatype="FP64"), {}, 400, "must have datatype FP32"),
    "wrong item shape": (None, _v2_body(shape=(1, 8, 8)), {}, 400, "does not fit the model"),
    "negative batch": (None, {"inputs": [{"name": "input", "shape": [-1, 1, 8, 8], "datatype": "FP32",
                                          "data": []}]}, {}, 400, "does not fit the model"),
    "data of the wrong size": (None, {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                                  "data": [0.5] * 64}]}, {}, 400, "does not fit the tensor's shape"),
    "strings in data": (None, _v2_body(data=["a"] * 64), {}, 400, "must be numbers"),
    "NaN in data": (None, json.dumps(_v2_body()).replace("0.5", "NaN", 1), {}, 400, "finite"),
    "wrong input name": (None, _v2_body(name="x"), {}, 400, "one input named 'input'"),
    "no inputs": (None, {"inputs": []}, {}, 400, "inputs"),
    "shape of strings": (None, _v2_body(shape=(1, 1, 8, "8")), {}, 400, "shape[3]"),
    "batch above the limit": (None, _v2_body(shape=(MAX_BATCH + 1, 1, 8, 8)), {}, 413, f"limit of {MAX_BATCH}"),
    "a batch size of 4000 digits": (None, {"inputs": [{"name": "input", "shape": [int("9" * 4000), 1, 8, 8],
                                                       "datatype": "FP32", "data": []}]}, {}, 413,
                                    "batch of <an integer of 4000 digits> items exceeds"),
    "a shape of 4000 digits": (None, {"inputs": [{"name": "input", "shape": [1, int("9" * 4000), 8, 8],
                                                  "datatype": "FP32", "data": []}]}, {}, 400,
                                "tensor shape [1, <an integer of 4000 digits>, 8, 8] does not fit"),
    "unknown output": (None, {**_v2_body(), "outputs": [{"name": "softmax"}]}, {}, 400, "unknown output"),
    "not JSON": (None, "{inputs", {}, 400, "not valid JSON"),
    "JSON nested too deeply": (None, "[" * 5000 + "]" * 5000, {}, 400, "not valid JSON (nested too deeply)"),
    "integer beyond Python's digit limit": (None, json.dumps(_v2_body()).replace("0.5", "1" * 5000, 1), {}, 400,
                                            "not valid JSON (Exceeds the limit"),
    "not UTF-8": (None, json.dumps(_v2_body()).encode().replace(b'"input"', b'"\xffinput"'), {}, 400,
                  "not valid JSON (not UTF-8"),
    "a header length in non-ASCII digits": (None, _v2_body(), {"Inference-Header-Content-Length": b"\xb2"}, 400,
                                            "byte count within the body"),
    "a header length of 5000 digits": (None, _v2_body(), {"Inference-Header-Content-Length": "1" * 5000}, 400,
                                       "byte count within the body"),
    "gzip that is not gzip": (None, _v2_body(), {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
    "an unsupported encoding": (None, _v2_body(), {"Content-Encoding": "br"}, 400, "'br' is not supported"),
    "header length beyond the body": (None, _v2_body(), {"Inference-Header-Content-Length": "99999"}, 400,
                                      "byte count within the body"),
    "binary bytes nobody declared": (None, json.dumps(_v2_body()) + "xxxx",
                                     {"Inference-Header-Content-Length": str(len(json.dumps(_v2_body())))}, 400,
                                     "no input declares binary_data_size"),
}


@pytest.mark.parametrize("case", sorted(V2_ERRORS))
def test_v2_errors_are_4xx_in_the_protocols_format(http, case):
    path, body, headers, status, message = V2_ERRORS[case]
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    answer = http.post(path or f"/v2/models/{NAME}/infer", content=content,
                       headers={"Content-Type": "application/json", **headers})
    assert answer.status_code == status, answer.text
    assert set(answer.json()) == {"error"} and message in answer.json()["error"], answer.text


def test_v2_outputs_asked_for_by_name_empty_list_and_per_output_binary_setting(http):
    infer = f"/v2/models/{NAME}/infer"
    every = http.post(infer, json={**_v2_body(), "outputs": []})
    assert every.status_code == 200 and len(every.json()["outputs"]) == 3, "an empty list names no output: all of them"
    json_only = http.post(infer, json={**_v2_body(), "parameters": {"binary_data_output": True},
                                       "outputs": [{"name": "class_index", "parameters": {"binary_data": False}}]})
    assert json_only.status_code == 200 and "inference-header-content-length" not in json_only.headers
    assert [o["name"] for o in json_only.json()["outputs"]] == ["class_index"] and json_only.json()["outputs"][0]["data"]
    twice = http.post(infer, json={**_v2_body(), "outputs": [{"name": "class_index"}, {"name": "class_index"}]})
    assert twice.status_code == 400 and "['class_index'] requested more than once" in twice.json()["error"]


def test_v2_binary_size_mismatch_and_other_paths(http):
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 256}}]}).encode()
    short = http.post(f"/v2/models/{NAME}/infer", content=header + bytes(100),
                      headers={"Inference-Header-Content-Length": str(len(header))})
    assert short.status_code == 400 and "declares binary_data_size 256 but 100 bytes" in short.json()["error"]
    assert http.get(f"/v2/models/{NAME}/infer").status_code == 405
    assert set(http.get(f"/v2/models/{NAME}/infer").json()) == {"error"}
    assert http.get("/v2/models/nope").json() == {"error": f"model 'nope' is not served here; this service "
                                                           f"serves '{NAME}'"}
    assert http.get("/v2/models/nope/ready").status_code == 404
    assert http.get(f"/v2/models/{NAME}/ready").status_code == 200


# ---------------------------------------------------------------- raw float32 bytes

def test_raw_float32_path_gives_the_json_paths_classes(http, exported):
    x = exported["x"][:MAX_BATCH]
    answer = http.post("/predict/raw", content=x.astype("<f4").tobytes(),
                       headers={"Content-Type": "application/octet-stream", "X-Tensor-Shape": "16,1,8,8"})
    assert answer.status_code == 200, answer.text
    assert [p["class_index"] for p in answer.json()["predictions"]] == _classes(http, x)
    mixed_case = http.post("/predict/raw", content=x.astype("<f4").tobytes(),  # media types ignore case (RFC 9110)
                           headers={"Content-Type": "Application/Octet-Stream", "X-Tensor-Shape": "16,1,8,8"})
    assert mixed_case.status_code == 200 and mixed_case.json() == answer.json()
    float64 = http.post("/predict/raw", content=x[:2].astype(np.float64).tobytes(),
                        headers={"Content-Type": "application/octet-stream", "X-Tensor-Shape": "2,1,8,8"})
    assert float64.status_code == 422 and "not float64" in float64.json()["detail"]
    missing = http.post("/predict/raw", content=b"\0" * 256, headers={"Content-Type": "application/octet-stream"})
    assert missing.status_code == 422 and "X-Tensor-Shape" in missing.json()["detail"]
    for shape in ("1x1x8x8", b"\xb9,1,8,8", "1" * 5000 + ",1,8,8"):  # a superscript one passes str.isdigit
        bad = http.post("/predict/raw", content=b"\0" * 256,
                        headers={"Content-Type": "application/octet-stream", "X-Tensor-Shape": shape})
        assert bad.status_code == 422 and "comma-separated" in bad.json()["detail"], bad.text


# ---------------------------------------------------------------- gzip request bodies

def test_tritonclient_gzip_requests_infer_the_same_classes(url, http, exported):
    import tritonclient.http as triton

    x = exported["x"][:MAX_BATCH]
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    for binary in (True, False):
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        result = client.infer(NAME, [tensor], outputs=[triton.InferRequestedOutput("class_index", binary_data=binary)],
                              request_compression_algorithm="gzip")
        assert result.as_numpy("class_index").tolist() == _classes(http, x)
    client.close()


def test_gzip_raw_bodies_are_inflated_and_bad_or_huge_ones_refused(http, exported):
    x = exported["x"][:MAX_BATCH]
    headers = {"Content-Type": "application/octet-stream", "X-Tensor-Shape": "16,1,8,8", "Content-Encoding": "gzip"}
    packed = gzip.compress(x.astype("<f4").tobytes())
    answer = http.post("/predict/raw", content=packed, headers=headers)
    assert answer.status_code == 200, answer.text
    assert [p["class_index"] for p in answer.json()["predictions"]] == _classes(http, x)
    raw = x.astype("<f4").tobytes()
    members = gzip.compress(raw[:100]) + gzip.compress(raw[100:])  # two members, as `cat a.gz b.gz` writes
    assert http.post("/predict/raw", content=members, headers=headers).json() == answer.json()
    for broken, problem in ((packed[:-9], "truncated stream"), (packed + b"tail", "4 bytes follow the stream"),
                            (members[:-9], "truncated stream"), (x.tobytes(), "incorrect header check")):
        refused = http.post("/predict/raw", content=broken, headers=headers)
        assert refused.status_code == 422 and problem in refused.json()["detail"], refused.text
    two_bombs = gzip.compress(bytes(MAX_BODY // 2 + 1)) * 2  # each member within the limit, together beyond it
    refused = http.post("/predict/raw", content=two_bombs, headers=headers)
    assert refused.status_code == 413 and "inflates beyond the limit" in refused.json()["detail"]
    bomb = gzip.compress(bytes(MAX_BODY + 1))
    assert len(bomb) < 1024
    refused = http.post("/predict/raw", content=bomb, headers=headers)
    assert refused.status_code == 413 and "inflates beyond the limit" in refused.json()["detail"]
    deflate = http.post("/predict/raw", content=packed, headers={**headers, "Content-Encoding": "deflate"})
    assert deflate.status_code == 422 and "'deflate' is not supported" in deflate.json()["detail"]
    brotli = http.post("/predict", content=json.dumps({"inputs": x[:1].tolist()}),
                       headers={"Content-Type": "application/json", "Content-Encoding": "br"})
    assert brotli.status_code == 422 and "'br' is not supported" in brotli.json()["detail"], brotli.text


def test_dense_json_is_counted_after_inflating(http):
    body = gzip.compress(b'{"inputs": [[' + b"0," * 20000 + b'0]]}')
    assert len(body) < 1024
    answer = http.post("/predict", content=body,
                       headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert answer.status_code == 413 and "more than the limit" in answer.json()["detail"]


# ---------------------------------------------------------------- metrics

def test_metrics_count_requests_and_predicted_classes_add_up_to_the_items(exported):
    settings = Settings(model_uri=str(exported["path"]), port=free_port(), max_batch=MAX_BATCH, log_level="warning")
    x = exported["x"]
    with in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as http:
        predicted = []
        for start in range(0, 40, 8):
            predicted += _classes(http, x[start:start + 8])
        raw = http.post("/predict/raw", content=x[:5].tobytes(),
                        headers={"Content-Type": "application/octet-stream", "X-Tensor-Shape": "5,1,8,8"})
        predicted += [p["class_index"] for p in raw.json()["predictions"]]
        assert http.post("/predict", json={"inputs": []}).status_code == 422
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:  # a client that leaves mid-body
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"inputs\": [")
        deadline = time.monotonic() + 10
        while 'status="499"' not in (text := http.get("/metrics").text) and time.monotonic() < deadline:
            time.sleep(0.05)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    by_class = {s.labels["class_index"]: s.value for s in families["ballot_predicted_class"].samples
                if s.name.endswith("_total")}
    assert sum(by_class.values()) == len(predicted) == 45
    assert by_class == {str(c): float(predicted.count(c)) for c in range(10)}
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in families["ballot_http_requests"].samples
                if s.name.endswith("_total")}
    assert requests[("/predict", "200")] == 5 and requests[("/predict", "422")] == 1
    assert requests[("/predict", "499")] == 1 and ("/predict", "500") not in requests, "a client gone is not a 5xx"
    assert requests[("/predict/raw", "200")] == 1
    batches = {s.labels["route"]: s.value for s in families["ballot_batch_size"].samples if s.name.endswith("_sum")}
    assert batches == {"/predict": 40, "/predict/raw": 5}
    info = next(s for s in families["ballot_model_info"].samples)
    assert info.labels["name"] == NAME and info.labels["method"] == "magnitude"
    assert "ballot_http_request_duration_seconds" in families and "process_resident_memory_bytes" in families


def test_requests_answered_by_the_body_limit_or_gunzipped_are_counted_under_their_route(exported):
    settings = Settings(model_uri=str(exported["path"]), port=free_port(), max_batch=MAX_BATCH,
                        max_body_bytes=MAX_BODY, log_level="warning")
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": exported["x"][0].ravel().tolist()}]}).encode()
    infer = f"/v2/models/{NAME}/infer"
    with in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as http:
        assert http.post(infer, content=gzip.compress(body), headers={"Content-Encoding": "gzip"}).status_code == 200
        assert http.post(infer, content=body, headers={"Content-Encoding": "br"}).status_code == 400
        assert http.post(infer, content=b"[" + b"0," * MAX_BODY + b"0]").status_code == 413
        text = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in families["ballot_http_requests"].samples
                if s.name.endswith("_total")}
    route = "/v2/models/{name}/infer"
    assert {key: requests.get(key) for key in ((route, "200"), (route, "400"), (route, "413"))} == {
        (route, "200"): 1, (route, "400"): 1, (route, "413"): 1}
    assert not any(label == "unmatched" for label, _ in requests)


# ---------------------------------------------------------------- bounds

def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes ``sock`` (reading and discarding anything it sends)."""
    sock.settimeout(seconds)
    start = time.monotonic()
    while sock.recv(4096):
        pass
    return time.monotonic() - start


@pytest.mark.parametrize("sent", [b"", b"POST /predict HTTP/1.1\r\nHost: x\r\n",
                                  b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 1000\r\n\r\n{\"inputs\": [", ])
def test_slow_loris_connections_are_closed_after_the_read_timeout(url, sent):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(sent)
        waited = _closed_within(sock, READ_TIMEOUT + 5)
    assert READ_TIMEOUT * 0.8 <= waited <= READ_TIMEOUT + 2


def test_a_request_sent_in_slow_pieces_within_the_deadline_is_answered(url):
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"inputs": [[0.5] * 64]}).encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port))) as sock:
        for piece in (head[:20], head[20:], body[:10], body[10:]):
            sock.sendall(piece)
            time.sleep(READ_TIMEOUT / 5)
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"c" * 8000) for i in range(10)),
    b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"a:b\r\n" * 20000,
    b"GET /health?" + b"q" * (MAX_HEAD_BYTES + 1) + b" HTTP/1.1\r\nHost: x\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * MAX_HEAD_BYTES),  # unfinished: httptools holds it
], ids=["long-headers", "many-headers", "long-url", "one-huge-header"])
def test_a_request_head_above_its_limit_gets_431_and_the_connection_closes(url, head):
    """Headers and URL are bounded like the body: a flood of header lines is not kept in memory."""
    host, port = url.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port))) as sock:
        with contextlib.suppress(OSError):  # the server may close before everything is sent
            sock.sendall(head + b"\r\n")
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert f"exceed the limit of {MAX_HEAD_BYTES} bytes".encode() in answer


class _RecordsAtOrAbove(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def _pipelined(url: str, requests: bytes) -> tuple[list[bytes], bool]:
    """The statuses the server answers ``requests``, sent at once on one connection, and whether it closed the
    connection (rather than leave it idle for 3 s)."""
    host, port = url.removeprefix("http://").split(":")
    answer, closed = b"", True
    with socket.create_connection((host, int(port))) as sock:
        with contextlib.suppress(OSError):  # the server may close before everything is sent
            sock.sendall(requests)
        sock.settimeout(3)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            pass
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", answer), closed


def test_pipelined_requests_are_answered_in_order(url):
    paths = [b"/health", b"/nowhere", b"/health"] * 3
    requests = b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path for path in paths)
    statuses, closed = _pipelined(url, requests + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses == [b"200", b"404", b"200"] * 3 + [b"200"] and closed


def test_a_connection_queueing_too_many_pipelined_requests_is_closed(url, http):
    """A client that sends thousands of requests without reading an answer cannot make the server queue them all;
    the answer in progress when the connection closes is dropped quietly, not logged as an error."""
    errors = _RecordsAtOrAbove(logging.ERROR)
    logging.getLogger("uvicorn.error").addHandler(errors)
    try:
        statuses, closed = _pipelined(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 4000)
        time.sleep(0.2)  # the answer in progress finishes
    finally:
        logging.getLogger("uvicorn.error").removeHandler(errors)
    assert errors.records == []
    assert closed and len(statuses) <= MAX_PIPELINED + 1
    assert http.get("/health").status_code == 200, "other clients are still served"


def test_beyond_max_connections_new_requests_get_503(exported):
    settings = Settings(model_uri=str(exported["path"]), port=free_port(), max_connections=2, log_level="warning")
    with in_thread(settings) as base:
        host, port = base.removeprefix("http://").split(":")
        with contextlib.ExitStack() as stack:
            for held in range(3):
                with httpx.Client(base_url=base, timeout=30) as http:  # the next connection, while `held` stay open
                    assert http.get("/health").status_code == (200 if held < 2 else 503), f"with {held} held"
                sock = stack.enter_context(socket.create_connection((host, int(port))))  # a keep-alive connection
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.settimeout(5)
                assert sock.recv(4096).startswith(b"HTTP/1.1 200" if held < 2 else b"HTTP/1.1 503")
        deadline = time.monotonic() + 10
        while (status := httpx.get(f"{base}/health", timeout=30).status_code) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)  # the server notices the held connection close
        assert status == 200


def _refusals(http: httpx.Client) -> dict[str, float]:
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    return {s.labels["reason"]: s.value for s in families["ballot_http_refused"].samples if s.name.endswith("_total")}


def test_refusals_of_the_http_layer_are_counted_by_reason(exported):
    settings = Settings(model_uri=str(exported["path"]), port=free_port(), read_timeout=READ_TIMEOUT,
                        max_connections=2, log_level="warning")
    with in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as http:
        host, port = base.removeprefix("http://").split(":")

        def send(raw: bytes) -> bytes:
            with socket.create_connection((host, int(port))) as sock:
                with contextlib.suppress(OSError):
                    sock.sendall(raw)
                sock.settimeout(READ_TIMEOUT + 5)
                answer = b""
                with contextlib.suppress(OSError):
                    while chunk := sock.recv(65536):
                        answer += chunk
                return answer

        assert _refusals(http) == dict.fromkeys(REFUSALS, 0.0), "every reason is exported from the start"
        assert send(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * MAX_HEAD_BYTES)).startswith(
            b"HTTP/1.1 431")
        assert send(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n").startswith(b"HTTP/1.1 400")
        send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
        assert send(b"GET /hea") == b"", "a head cut off at read_timeout"
        assert send(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{") == b"", "a body cut off"
        refused = opened = 0
        with contextlib.ExitStack() as stack:  # keep-alive connections, held open, until one is refused
            while not refused:
                sock = stack.enter_context(socket.create_connection((host, int(port))))
                opened += 1
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.settimeout(5)
                refused += sock.recv(4096).startswith(b"HTTP/1.1 503")
            assert opened <= 3, "max_connections=2, the metrics client's connection included"
        deadline = time.monotonic() + 10
        while http.get("/health").status_code == 503 and time.monotonic() < deadline:  # until the server sees them go
            refused += 1
            time.sleep(0.05)
        assert _refusals(http) == {"head_too_large": 1, "malformed": 1, "pipeline_too_deep": 1, "read_timeout": 1,
                                   "over_capacity": refused}
        families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
        answered = {(s.labels["route"], s.labels["status"]): s.value
                    for s in families["ballot_http_requests"].samples if s.name.endswith("_total")}
        assert answered[("/predict", "499")] == 1, "a cut-off body reached the application, which counts it"
        assert ("/health", "503") not in answered and ("unmatched", "400") not in answered


def test_a_request_head_within_its_limit_is_served(http):
    assert http.get("/health", headers={f"X-Pad-{i}": "c" * 4000 for i in range(10)}).status_code == 200


def test_a_file_without_a_model_card_answers_404_naming_where_a_card_goes(http):
    answer = http.get("/model-card")
    assert answer.status_code == 404 and answer.headers["content-type"] == "application/json"
    assert "has no model card" in answer.json()["detail"] and "model_card.md next to it" in answer.json()["detail"]


def test_head_health_is_200(http):
    answer = http.head("/health")
    assert answer.status_code == 200 and answer.content == b""


def test_dense_json_within_the_byte_limit_is_refused_before_decoding(http):
    body = b'{"inputs": [[' + b"0," * 20000 + b'0]]}'
    assert len(body) < MAX_BODY
    answer = http.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and "more than the limit" in answer.json()["detail"]
    v2 = http.post(f"/v2/models/{NAME}/infer", content=body, headers={"Content-Type": "application/json"})
    assert v2.status_code == 413 and "more than the limit" in v2.json()["error"]
    # no header switches the count off: what is JSON follows from the route
    for path, headers in [("/predict", {"Inference-Header-Content-Length": "0"}),
                          ("/predict", {"Content-Type": "application/octet-stream"}),
                          (f"/v2/models/{NAME}/infer", {"Content-Type": "application/octet-stream"})]:
        answer = http.post(path, content=body, headers={"Content-Type": "application/json", **headers})
        assert answer.status_code == 413, (path, headers, answer.text)
    # nor does a header given twice, the count reading one copy and the protocol the other
    for name, values in [("Inference-Header-Content-Length", (str(len(body)), "1")),
                         ("Content-Encoding", ("gzip", "identity"))]:
        twice = [("Content-Type", "application/json"), *((name, value) for value in values)]
        answer = http.post(f"/v2/models/{NAME}/infer", content=body, headers=twice)
        assert answer.status_code == 400 and f"header '{name.lower()}' is given more than once" in answer.json()["error"]
    assert http.get("/health").status_code == 200


def test_a_hundred_silent_connections_are_all_closed(url):
    host, port = url.removeprefix("http://").split(":")
    sockets = [socket.create_connection((host, int(port))) for _ in range(100)]
    try:
        time.sleep(READ_TIMEOUT + 1)
        for sock in sockets:
            sock.settimeout(2)
            assert sock.recv(1) == b""
    finally:
        for sock in sockets:
            sock.close()
