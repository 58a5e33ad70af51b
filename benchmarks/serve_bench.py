"""Serving speed: ONNX Runtime through the HTTP service and in-process, against PyTorch eager on the same model.

Throughput and p50 / p99 latency at batch 1 and 64, printed with the ratios to PyTorch eager; over HTTP, JSON
(/predict), raw float32 (/predict/raw) and the Open Inference Protocol's binary tensors (/v2/models/NAME/infer),
each also as a fraction of in-process ONNX Runtime. The engines take turns in ``--rounds`` rounds, so that a
machine whose load changes during the run slows all of them alike and the ratios compare like with like.

The HTTP client is one persistent connection of the standard library's http.client sending one request after
the other, as a caller that waits for each answer (batching is the way to throughput: on the 2-core machine two
or four concurrent connections measured no more items/s, as their threads take the cores the service needs).
Its own cost is printed as the client floor: the same requests against a socket that answers at once. ``--load``
adds a load test (requests at a concurrency, the three paths in turn, errors and the service's peak RSS). The
default model is LeNet-300-100 (`mlp`) on 1x28x28 inputs with random weights and a 5% magnitude mask;
``--model-uri`` benchmarks a registered model or an .onnx file instead. Its PyTorch twin is rebuilt from the ONNX
weights and checked for parity first; where the file's weights do not map back onto the architecture's parameters
(a compact file: packed weights, removed units; BatchNorm folded into convolutions) PyTorch eager is left out, says
so, and the ratios are to in-process ONNX Runtime only.

    .venv/bin/python benchmarks/serve_bench.py [--model-uri models:/NAME@champion] [--threads 2] [--seconds 3]
                                               [--rounds 5] [--load 3000 --concurrency 32]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import torch
from torch import nn

from ballot.export import bake, check_parity, export_onnx
from ballot.masks import Mask, magnitude_scores
from ballot.models import build_model
from serving.model_source import fetch_model
from serving.runtime import OnnxModel

BATCHES = (1, 64)
HTTP_PATHS = ("JSON", "raw float32", "v2 binary")


def default_model(folder: Path) -> tuple[nn.Module, Path]:
    """The seeded LeNet-300-100 with a 5% magnitude mask, baked and exported to ``folder``."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10)
    baked = bake(model, Mask.top_k(magnitude_scores(model), 0.05))
    meta = {"model": "mlp", "density": 0.05, "input_shape": [1, 28, 28], "class_names": [str(c) for c in range(10)]}
    return baked, export_onnx(baked, (1, 28, 28), folder / "bench.onnx", meta)


def torch_twin(onnx_path: Path, onnx_model: OnnxModel) -> tuple[nn.Module | None, str]:
    """The PyTorch model of the ONNX file (architecture from its metadata, weights from its initializers), or None
    and the reason it cannot be rebuilt."""
    import onnx
    from onnx import numpy_helper

    card = onnx_model.card
    if not card.model:
        return None, f"{card.uri} records no 'model' (architecture) to rebuild in PyTorch"
    model = build_model(card.model, card.input_shape, len(card.class_names))
    proto = onnx.load_model(str(onnx_path))
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}
    state = model.state_dict()
    missing = [name for name in state if name not in weights or weights[name].shape != state[name].shape]
    if missing:
        return None, (f"the initializers of this {card.onnx_format or 'dense'} file do not rebuild '{card.model}', "
                      f"missing or reshaped: {', '.join(missing[:3])}")
    model.load_state_dict({name: weights[name] for name in state})
    return model.eval(), ""


def measure(calls: dict[tuple[str, int], Callable[[], object]], seconds: float, rounds: int
            ) -> dict[tuple[str, int], dict[str, float]]:
    """Each call (engine, batch) repeatedly for ``seconds`` in all, in ``rounds`` turns after a warm-up; items/s and
    latency percentiles in ms."""
    latencies: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
    elapsed = dict.fromkeys(calls, 0.0)
    for call in calls.values():
        for _ in range(10):
            call()
    for _ in range(rounds):
        for key, call in calls.items():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / rounds or len(latencies[key]) < 30:
                begin = time.perf_counter()
                call()
                latencies[key].append(time.perf_counter() - begin)
            elapsed[key] += time.perf_counter() - start
    results = {}
    for (engine, batch), times in latencies.items():
        p50, p99 = np.percentile(np.array(times) * 1000, [50, 99])
        results[engine, batch] = {"items_per_s": batch * len(times) / elapsed[engine, batch], "p50_ms": float(p50),
                                  "p99_ms": float(p99), "calls": len(times)}
    return results


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(onnx_path: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """`python -m serving` on a loopback port, as the Docker image runs it."""
    port = free_port()
    env = {**os.environ, "BALLOT_MODEL_URI": str(onnx_path), "BALLOT_PORT": str(port), "BALLOT_HOST": "127.0.0.1",
           "BALLOT_THREADS": str(threads), "BALLOT_MAX_BATCH": str(max(BATCHES)), "BALLOT_LOG_LEVEL": "warning"}
    process = subprocess.Popen([sys.executable, "-m", "serving"], env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    sys.exit("serve_bench: the service did not become ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", help="an .onnx file or models:/NAME@ALIAS (default: seeded LeNet-300-100)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ URIs")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for PyTorch and ONNX Runtime alike (default 1: on a busy 2-core machine, "
                             "more PyTorch threads spin against each other)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per engine and batch size")
    parser.add_argument("--rounds", type=int, default=5, help="turns the engines take, each of seconds / rounds")
    parser.add_argument("--load", type=int, default=0, help="also send this many batch-1 requests (e.g. 3000)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients of the load test")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder:
        baked, uri = None, args.model_uri
        if not uri:
            baked, path = default_model(Path(folder))
            uri = str(path)
        with fetch_model(uri, args.tracking_uri) as source:
            ort_model = OnnxModel.load(source, device="cpu", threads=args.threads)
            model, why = (baked, "") if baked is not None else torch_twin(source.path, ort_model)
            if model is None:
                print(f"serve_bench: no PyTorch eager twin ({why}); the ratios are to in-process ONNX Runtime")
            results, floor, load = run_all(model, ort_model, source.path, args)
    report(results, floor)
    if load:
        print(load)
    return 0


def requests_for(path: str, batch: np.ndarray, model_name: str) -> tuple[str, bytes, dict[str, str]]:
    """URL path, body and headers of one request carrying ``batch`` on one of the HTTP_PATHS."""
    if path == "JSON":
        return "/predict", json.dumps({"inputs": batch.tolist()}).encode(), {"Content-Type": "application/json"}
    raw = batch.astype("<f4").tobytes()
    shape = list(batch.shape)
    if path == "raw float32":
        return "/predict/raw", raw, {"Content-Type": "application/octet-stream",
                                     "X-Tensor-Shape": ",".join(map(str, shape))}
    header = json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "class_index", "parameters": {"binary_data": True}}]}).encode()
    return (f"/v2/models/{model_name}/infer", header + raw,
            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})


def run_all(model: nn.Module | None, ort_model: OnnxModel, onnx_path: Path, args: argparse.Namespace
            ) -> tuple[dict[tuple[str, int], dict[str, float]], float, str]:
    """Every engine (PyTorch eager only with a ``model``) at every batch size, on the same random inputs; the
    client floor of the binary path at the largest batch (ms); and the load test's summary line."""
    shape = ort_model.card.input_shape
    rng = np.random.default_rng(0)
    inputs = {b: rng.random((b, *shape), dtype=np.float32) for b in BATCHES}
    parity = ""
    if model is not None:
        checked = check_parity(model, onnx_path, torch.from_numpy(inputs[max(BATCHES)]))
        parity = (f"; parity max |diff| {checked['max_abs_diff']:.2e}, argmax agreement "
                  f"{checked['argmax_agreement']:.3f}")
    print(f"{ort_model.card.label()}; input {list(shape)}; threads {args.threads}{parity}")
    process, url = start_service(onnx_path, args.threads)
    load = ""
    try:
        # the standard library's client: about 0.9 ms less per request than httpx here, which is not the service's
        connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=60)
        calls: dict[tuple[str, int], Callable[[], object]] = {}
        for batch in BATCHES:
            if model is not None:
                calls["pytorch eager", batch] = partial(eager, model, torch.from_numpy(inputs[batch]))
            calls["onnxruntime in-process", batch] = partial(ort_model.predict, inputs[batch])
        for path in HTTP_PATHS:
            for batch in BATCHES:
                calls[f"HTTP {path}", batch] = partial(post, connection, *requests_for(path, inputs[batch],
                                                                                       ort_model.card.name))
        results = measure(calls, args.seconds, args.rounds)
        connection.close()
        floor = client_floor(requests_for("v2 binary", inputs[max(BATCHES)], ort_model.card.name), args.seconds)
        if args.load:
            load = load_test(url, process.pid, ort_model, args.load, args.concurrency)
    finally:
        process.terminate()
        process.wait(30)
    return results, floor, load


def eager(model: nn.Module, batch: torch.Tensor) -> None:
    with torch.inference_mode():
        model(batch)


def post(connection: http.client.HTTPConnection, route: str, body: bytes, headers: dict[str, str]) -> bytes:
    """One request on the persistent ``connection``; the answer's body (exit unless 200)."""
    connection.request("POST", route, body=body, headers=headers)
    answer = connection.getresponse()
    content = answer.read()
    if answer.status != 200:
        sys.exit(f"serve_bench: {route} answered {answer.status}: {content[:200]!r}")
    return content


def client_floor(request: tuple[str, bytes, dict[str, str]], seconds: float) -> float:
    """Median ms of ``request`` sent as the benchmark sends it, to a socket that answers each one at once: what
    the client and the loopback take, without the service."""
    listener = socket.create_server(("127.0.0.1", 0))
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 512\r\n\r\n" + bytes(512)

    def serve() -> None:
        peer, _ = listener.accept()
        with peer:
            pending = b""
            while chunk := peer.recv(1 << 20):
                pending += chunk
                while (end := pending.find(b"\r\n\r\n")) >= 0:
                    length = int(re.search(rb"content-length: *(\d+)", pending[:end].lower()).group(1))
                    if len(pending) < end + 4 + length:
                        break
                    pending = pending[end + 4 + length:]
                    peer.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    connection = http.client.HTTPConnection("127.0.0.1", listener.getsockname()[1], timeout=60)
    result = measure({("floor", 1): partial(post, connection, *request)}, seconds, 1)
    connection.close()
    thread.join(10)
    listener.close()
    return result["floor", 1]["p50_ms"]


def load_test(url: str, pid: int, ort_model: OnnxModel, total: int, concurrency: int) -> str:
    """``total`` batch-1 requests from ``concurrency`` clients, the HTTP paths in turn, each answer checked."""
    items = np.random.default_rng(1).random((64, *ort_model.card.input_shape), dtype=np.float32)
    expected = ort_model.predict(items).argmax(axis=1)
    bodies = [[requests_for(path, items[i:i + 1], ort_model.card.name) for path in HTTP_PATHS]
              for i in range(len(items))]

    def worker(indices: range) -> list[tuple[float, bool]]:
        results = []
        with httpx.Client(base_url=url, timeout=60) as client:
            for index in indices:
                item, path = index % len(items), index % len(HTTP_PATHS)
                route, body, headers = bodies[item][path]
                start = time.perf_counter()
                answer = client.post(route, content=body, headers=headers)
                elapsed = time.perf_counter() - start
                results.append((elapsed, answer.status_code == 200 and answered_class(answer) == expected[item]))
        return results

    share = -(-total // concurrency)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        parts = list(pool.map(lambda w: worker(range(w * share, min(total, (w + 1) * share))), range(concurrency)))
    seconds = time.perf_counter() - start
    results = [r for part in parts for r in part]
    p50, p99 = np.percentile(np.array([r[0] for r in results]) * 1000, [50, 99])
    errors = sum(not ok for _, ok in results)
    return (f"load: {len(results)} requests at concurrency {concurrency} in {seconds:.1f} s = "
            f"{len(results) / seconds:.0f} req/s; p50 {p50:.1f} ms, p99 {p99:.1f} ms; errors {errors}; "
            f"service peak RSS {peak_rss_mb(pid):.0f} MB")


def answered_class(answer: httpx.Response) -> int:
    """The first item's class from a /predict, /predict/raw or binary v2 answer."""
    length = answer.headers.get("Inference-Header-Content-Length")
    if length is None:
        return answer.json()["predictions"][0]["class_index"]
    return int(np.frombuffer(answer.content[int(length):], dtype="<i8")[0])


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (Linux /proc), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def report(results: dict[tuple[str, int], dict[str, float]], floor: float) -> None:
    print(f"\n{'engine':<26}{'batch':>6}{'items/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'calls':>8}{'vs eager':>10}"
          f"{'vs ORT':>9}")
    has_eager = ("pytorch eager", 1) in results
    for (engine, batch), r in results.items():
        ratio = f"{r['items_per_s'] / results['pytorch eager', batch]['items_per_s']:>9.2f}x" if has_eager else "n/a"
        of_ort = r["items_per_s"] / results["onnxruntime in-process", batch]["items_per_s"]
        print(f"{engine:<26}{batch:>6}{r['items_per_s']:>12.0f}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}"
              f"{r['calls']:>8.0f}{ratio:>10}{of_ort:>8.1%}")
    if has_eager:
        one = results["onnxruntime in-process", 1]["items_per_s"] / results["pytorch eager", 1]["items_per_s"]
        print(f"\nONNX Runtime / PyTorch eager throughput at batch 1: {one:.2f}x (aim >= 2x)")
    big = max(BATCHES)
    in_process = results["onnxruntime in-process", big]["items_per_s"]
    shares = ", ".join(f"{path} {results[f'HTTP {path}', big]['items_per_s'] / in_process:.1%}" for path in HTTP_PATHS)
    print(f"HTTP items/s at batch {big} as a share of in-process ONNX Runtime: {shares} (aim: binary >= 25%; one "
          "sequential client on the same machine)")
    binary = results["HTTP v2 binary", big]["p50_ms"]
    print(f"client floor at batch {big} (the binary requests against a socket answering at once): p50 {floor:.3f} ms, "
          f"{floor / binary:.0%} of the binary path's p50 {binary:.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
