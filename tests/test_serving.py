"""The HTTP service end to end: a real registry (sqlite), a real ONNX file, real uvicorn over loopback HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterator

import httpx
import numpy as np
import pytest
import torch
from packaging.utils import canonicalize_name
from PIL import Image

from ballot.cli import main as ballot_main
from ballot.experiment import model_metrics
from ballot.export import bake, export_onnx
from ballot.masks import Mask, magnitude_scores
from ballot.model_card import render as render_card
from ballot.models import build_model
from serving.client import ClientError, encode_png
from serving.client import main as client_main
from serving.client import predict as client_predict
from serving.server import build_server, load_model
from serving.settings import Settings

REPO = Path(__file__).resolve().parents[1]
NAME = "ballot-digits-test"
MAX_BATCH = 16
MAX_BODY = 64 * 1024


# ---------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def in_thread(settings: Settings) -> Iterator[str]:
    """The service of ``settings`` in a uvicorn thread; yields its base URL."""
    server = build_server(load_model(settings), settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(15)


@contextmanager
def in_subprocess(command: list[str], env: dict[str, str], cwd: Path, port: int) -> Iterator[str]:
    """Run ``command`` (a server on ``port``) until /ready answers; terminate it afterwards."""
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert process.returncode in (0, -signal.SIGTERM), f"server exited with {process.returncode}:\n{output}"


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early ({process.returncode}):\n{process.stdout.read()}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server never became ready")


def png_base64(pixels: np.ndarray, mode: str = "L") -> str:
    """[H, W] floats in [0, 1] as a base64 8-bit PNG (RGB: the gray value in all three channels)."""
    gray = np.round(pixels * 255).astype(np.uint8)
    image = Image.fromarray(gray) if mode == "L" else Image.fromarray(np.stack([gray] * 3, axis=-1))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def torch_probabilities(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()


def serving_env(**values: str) -> dict[str, str]:
    """The current environment without BALLOT_* / MLFLOW_TRACKING_URI, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALLOT_") and k != "MLFLOW_TRACKING_URI"}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", **values}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def exported(tiny_data, tiny_dense, tmp_path_factory):
    """A trained, magnitude-pruned digits MLP, baked and exported with the registry contract's metadata."""
    model = build_model("mlp", tiny_data.input_shape, tiny_data.num_classes)
    model.load_state_dict(tiny_dense.trained_state)
    mask = Mask.top_k(magnitude_scores(model), 0.1)
    baked = bake(model, mask)
    metrics = model_metrics(baked, tiny_data, "cpu")
    meta = {"density": mask.density(), "acc": metrics["acc"], "cwv": metrics["cwv"], "mcd": metrics["mcd"],
            "worst_class": metrics["worst_class"], "dataset": "digits", "method": "magnitude", "model": "mlp",
            "class_names": tiny_data.class_names, "input_shape": list(tiny_data.input_shape)}
    path = export_onnx(baked, tiny_data.input_shape, tmp_path_factory.mktemp("onnx") / "digits.onnx", meta)
    return {"model": baked, "path": path, "meta": meta, "x": tiny_data.test.x[:64].numpy()}


def markdown_card(exported: dict) -> str:
    """The pipeline's markdown model card of the exported model."""
    return render_card(exported["meta"], [], exported["path"].stat().st_size)


@pytest.fixture(scope="module")
def registry(exported, tmp_path_factory):
    """A sqlite MLflow registry holding the model as the contract says: v1 champion (with a model card), v2
    challenger (without)."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("serving-test", artifact_location=str(folder / "artifacts"))
    example = exported["x"][:2]
    signature = infer_signature(example, torch_probabilities(exported["model"], example))
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        for method in ("magnitude", "ballot"):
            proto = onnx.load_model(str(exported["path"]))  # log_model moves weights out of the proto it gets
            with mlflow.start_run(experiment_id=experiment):
                if method == "magnitude":  # as the register stage does: the card in the run's model/ folder
                    mlflow.log_text(markdown_card(exported), "model/model_card.md")
                info = mlflow.onnx.log_model(onnx_model=proto, name="model", registered_model_name=NAME,
                                             signature=signature, input_example=example)
            version = str(info.registered_model_version)
            tags = {**{k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in exported["meta"].items()},
                    "method": method}
            for key, value in tags.items():
                client.set_model_version_tag(NAME, version, key, value)
            client.set_registered_model_alias(NAME, "challenger", version)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    client.set_registered_model_alias(NAME, "champion", "1")
    return uri


@pytest.fixture(scope="module")
def service(registry):
    """The champion served from the registry, with small limits so that they are easy to exceed."""
    settings = Settings(model_uri=f"models:/{NAME}@champion", tracking_uri=registry, port=free_port(),
                        max_batch=MAX_BATCH, max_body_bytes=MAX_BODY, log_level="warning")
    with in_thread(settings) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


# ---------------------------------------------------------------- endpoints

def test_health_ready_and_metadata_describe_the_registered_champion(service, exported):
    assert service.get("/health").json() == {"status": "ok"}
    assert service.get("/ready").json() == {"ready": True, "model": NAME, "version": "1"}
    card = service.get("/metadata").json()
    meta = exported["meta"]
    assert (card["name"], card["version"], card["alias"]) == (NAME, "1", "champion")
    assert card["input_shape"] == [1, 8, 8] and card["class_names"] == meta["class_names"]
    assert card["method"] == "magnitude" and card["dataset"] == "digits" and card["model"] == "mlp"
    for key in ("density", "acc", "cwv", "mcd", "worst_class"):
        assert card[key] == pytest.approx(meta[key], rel=1e-6)
    assert card["providers"][-1] == "CPUExecutionProvider" and card["max_batch"] == MAX_BATCH
    assert card["granularity"] is None and card["onnx_format"] is None and card["quantization"] is None  # not recorded
    # MLflow keeps the weights in an external-data file next to model.onnx; both count
    assert card["file_bytes"] == pytest.approx(exported["path"].stat().st_size, rel=0.01)


def test_the_registered_versions_model_card_is_served_as_markdown(service, registry, exported):
    answer = service.get("/model-card")
    assert answer.status_code == 200 and answer.headers["content-type"] == "text/markdown; charset=utf-8"
    assert answer.text == markdown_card(exported) and answer.text.startswith("# Model card: magnitude / mlp")
    assert load_model(Settings(model_uri=f"models:/{NAME}@challenger", tracking_uri=registry)).card_markdown is None


def test_a_files_model_card_is_the_model_card_md_next_to_it(exported, tmp_path, capsys):
    path = Path(shutil.copy(exported["path"], tmp_path / "digits.onnx"))
    text = "# Model card: digits\n\nAccuracy — 0.93 ✓ (test split)\n"
    (tmp_path / "model_card.md").write_text(text, encoding="utf-8")
    settings = Settings(model_uri=str(path), port=free_port(), log_level="warning")
    with in_thread(settings) as url, httpx.Client(base_url=url) as client:
        answer = client.get("/model-card")
        assert answer.status_code == 200 and answer.headers["content-type"] == "text/markdown; charset=utf-8"
        assert answer.content == text.encode("utf-8")
        assert client.get("/metadata").json()["file_bytes"] == path.stat().st_size
    (tmp_path / "model_card.md").write_bytes(b"# card \xff\xfe")
    assert "model_card.md' is not UTF-8 text" in _serve_error(capsys, "--model-uri", str(path))


def test_openapi_schema_documents_every_endpoint(service):
    schema = service.get("/openapi.json").json()
    assert {"/health", "/ready", "/metadata", "/model-card", "/predict", "/predict/raw", "/metrics", "/v2/health/live",
            "/v2/models/{name}", "/v2/models/{name}/infer"} <= set(schema["paths"])
    infer = schema["paths"]["/v2/models/{name}/infer"]["post"]
    assert [(p["name"], p["in"], p["required"]) for p in infer["parameters"]] == [("name", "path", True)]
    predict = schema["paths"]["/predict"]["post"]
    assert {"200", "413", "422"} <= set(predict["responses"])
    assert {"inputs", "images"} <= set(schema["components"]["schemas"]["PredictRequest"]["properties"])


def test_predict_matches_pytorch_on_nested_and_flat_inputs(service, exported):
    x = exported["x"][:MAX_BATCH]
    expected = torch_probabilities(exported["model"], x)
    for inputs in (x.tolist(), x.reshape(len(x), -1).tolist()):
        answer = service.post("/predict", json={"inputs": inputs})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["model"], body["version"]) == (NAME, "1")
        got = np.array([p["probabilities"] for p in body["predictions"]])
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert [p["class_index"] for p in body["predictions"]] == expected.argmax(1).tolist()
        names = exported["meta"]["class_names"]
        assert [p["class_name"] for p in body["predictions"]] == [names[i] for i in expected.argmax(1)]


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_predict_matches_pytorch_on_png_images(service, exported, mode):
    x = exported["x"][:8]
    quantised = (np.round(x * 255) / 255).astype(np.float32)
    images = [png_base64(item[0], mode) for item in x]
    answer = service.post("/predict", json={"images": images})
    assert answer.status_code == 200, answer.text
    got = np.array([p["probabilities"] for p in answer.json()["predictions"]])
    np.testing.assert_allclose(got, torch_probabilities(exported["model"], quantised), atol=1e-4)


def test_client_example_talks_to_the_service(service, exported, tmp_path, capsys):
    x = exported["x"][:3]
    paths = []
    for index, item in enumerate(x):
        paths.append(tmp_path / f"digit{index}.png")
        paths[-1].write_bytes(base64.b64decode(png_base64(item[0])))
    url = str(service.base_url)
    assert client_main([*map(str, paths), "--url", url]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = client_predict(url, images=[encode_png(p) for p in paths])["predictions"]
    assert [line.split("\t")[1] for line in lines] == [p["class_name"] for p in expected]
    with pytest.raises(ClientError, match="422.*empty batch"):
        client_predict(url, inputs=[])


# ---------------------------------------------------------------- bad input: 4xx with a message, never a 500

def _png_bytes(size: tuple[int, int], mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_16bit_rgb(size: tuple[int, int], text_first: bool = False) -> bytes:
    """A 16-bit colour PNG written by hand (Pillow writes none): Pillow reads it back as 8-bit RGB; ``text_first``
    puts a tEXt chunk before IHDR, which Pillow reads too (byte 24 then is no bit depth)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    width, height = size
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
    rows = b"".join(b"\x00" + bytes(range(6 * width)) for _ in range(height))  # filter 0, then RGB 16-bit samples
    text = chunk(b"tEXt", b"Comment\x00" + b"\x01" * 16) if text_first else b""
    return (b"\x89PNG\r\n\x1a\n" + text + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _item(value=0.5) -> list:
    """One item of the test model's shape [1, 8, 8] filled with ``value``."""
    return [[[value] * 8 for _ in range(8)]]


ITEM = _item()


def _with_token(token: str) -> str:
    """A valid one-item body whose first value is replaced by a raw JSON token."""
    return json.dumps({"inputs": [ITEM]}).replace("0.5", token, 1)


BAD_REQUESTS = {
    "wrong shape": ({"inputs": [[[[0.5] * 7] * 8]]}, 422, "got items of shape [1, 8, 7]"),
    "flat vector of the wrong size": ({"inputs": [[0.5] * 63]}, 422, "flat list of 64 numbers"),
    "scalar item": ({"inputs": [0.5]}, 422, "inputs[0]: Input should be a valid list"),
    "nesting too deep": ({"inputs": [_item([[0.5]])]}, 422, "items nest 5 levels deep"),
    "ragged item": ({"inputs": [[ITEM[0][:7] + [[0.5] * 9]]]}, 422, "ragged"),
    "flat and nested items in one batch": ({"inputs": [ITEM, [0.5] * 64]}, 422, "one form for the whole batch"),
    "string value": ({"inputs": [_item("0.5")]}, 422, "found string"),
    "boolean value": ({"inputs": [_item(True)]}, 422, "found boolean"),
    "null value": ({"inputs": [_item(None)]}, 422, "found null"),
    "NaN": (_with_token("NaN"), 422, "item 0 holds NaN"),
    "Infinity": (_with_token("-Infinity"), 422, "finite"),
    "pixel above 1": ({"inputs": [_item(255.0)]}, 422, "[0, 1]"),
    "float32 overflow": ({"inputs": [_item(1e39)]}, 422, "finite"),
    "huge integer": (_with_token("1" + "0" * 400), 422, "too large for float32"),
    "empty batch": ({"inputs": []}, 422, "empty batch"),
    "batch above the limit": ({"inputs": [ITEM] * (MAX_BATCH + 1)}, 413, f"limit of {MAX_BATCH}"),
    "both inputs and images": ({"inputs": [ITEM], "images": []}, 422, "exactly one of"),
    "neither": ({}, 422, "exactly one of"),
    "unknown field": ({"images": [], "extra": 1}, 422, "extra"),
    "not JSON": ("{inputs: [", 422, "not valid JSON"),
    "JSON nested too deeply": ("[" * 5000 + "]" * 5000, 422, "not valid JSON (nested too deeply)"),
    "integer beyond Python's digit limit": (_with_token("1" * 5000), 422, "not valid JSON (Exceeds the limit"),
    "not UTF-8": (b'{"inputs": [[0.5, "\xff"]]}', 422, "not valid JSON (not UTF-8"),
    "JSON array body": ([ITEM], 422, "must be a JSON object"),
    "invalid base64": ({"images": ["***"]}, 422, "images[0] is not valid base64"),
    "not an image": ({"images": [_b64(b"hello world")]}, 422, "images[0] is not a PNG image"),
    "JPEG instead of PNG": ({"images": [_b64(b"\xff\xd8\xff\xe0" + bytes(100))]}, 422, "not a PNG image"),
    "truncated PNG": ({"images": [_b64(_png_bytes((8, 8))[:40])]}, 422, "images[0]"),
    "wrong image size": ({"images": [_b64(_png_bytes((28, 28)))]}, 422, "is 28x28 pixels; the model takes 8x8"),
    "16-bit PNG": ({"images": [_b64(_png_bytes((8, 8), "I;16"))]}, 422, "8-bit"),
    "16-bit colour PNG": ({"images": [_b64(_png_16bit_rgb((8, 8)))]}, 422, "has 16-bit samples"),
    "PNG whose first chunk is not IHDR": ({"images": [_b64(_png_16bit_rgb((8, 8), text_first=True))]}, 422,
                                          "its first chunk is not IHDR"),
    "images as numbers": ({"images": [1, 2]}, 422, "images[0]: Input should be a valid string"),
}


def _send(client: httpx.Client, body) -> httpx.Response:
    if isinstance(body, (str, bytes)):
        return client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    return client.post("/predict", json=body)


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_naming_the_problem(service, case):
    body, status, message = BAD_REQUESTS[case]
    answer = _send(service, body)
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and detail
    assert message in detail, detail


def test_bodies_above_the_size_limit_get_413_with_and_without_content_length(service):
    big = json.dumps({"inputs": [_item(0.123456789)] * 200}).encode()
    assert len(big) > MAX_BODY
    declared = service.post("/predict", content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and f"limit of {MAX_BODY} bytes" in declared.json()["detail"]

    def chunks(body: bytes):  # no Content-Length: the server has to count what arrives
        for start in range(0, len(body), 8192):
            yield body[start:start + 8192]

    streamed = service.post("/predict", content=chunks(big), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    raw = bytes(MAX_BODY + 4)  # float32 zeros: no JSON to count, only bytes
    streamed_raw = service.post("/predict/raw", content=chunks(raw),
                                headers={"Content-Type": "application/octet-stream", "X-Tensor-Shape": "1,1,8,8"})
    assert streamed_raw.status_code == 413 and f"limit of {MAX_BODY} bytes" in streamed_raw.json()["detail"]
    assert service.get("/health").status_code == 200


def test_wrong_methods_and_paths_are_4xx(service):
    assert service.get("/predict").status_code == 405
    assert service.post("/metadata").status_code == 405
    assert service.get("/nope").status_code == 404


def test_tabular_models_take_any_finite_values_but_not_ones_that_overflow_the_model(tmp_path):
    torch.manual_seed(0)
    path = export_onnx(build_model("mlp", (4,), 3), (4,), tmp_path / "tabular.onnx", {"class_names": ["a", "b", "c"]})
    settings = Settings(model_uri=str(path), port=free_port(), log_level="warning")
    with in_thread(settings) as url, httpx.Client(base_url=url) as client:
        fine = client.post("/predict", json={"inputs": [[-3.0, 200.0, 0, 1]]})
        assert fine.status_code == 200 and fine.json()["predictions"][0]["class_name"] in ("a", "b", "c")
        overflow = client.post("/predict", json={"inputs": [[0, 0, 0, 0], [3e38, -3e38, 3e38, 3e38]]})
        assert overflow.status_code == 422 and "item 1 drives the model's outputs to infinity" in overflow.text


# ---------------------------------------------------------------- model resolution and start-up failures

def test_aliases_and_versions_resolve_to_their_registry_version(registry):
    for uri, version, method in ((f"models:/{NAME}@challenger", "2", "ballot"), (f"models:/{NAME}/1", "1", "magnitude")):
        card = load_model(Settings(model_uri=uri, tracking_uri=registry)).card
        assert (card.version, card.method) == (version, method)


def _serve_error(capsys, *flags: str) -> str:
    with pytest.raises(SystemExit) as stop:
        ballot_main(["serve", "--port", str(free_port()), *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ballot serve: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_start_up_fails_clearly_for_missing_registry_entries(registry, capsys):
    err = _serve_error(capsys, "--model-uri", f"models:/{NAME}@production", "--tracking-uri", registry)
    assert "has no alias 'production'" in err and "champion -> version 1" in err
    err = _serve_error(capsys, "--model-uri", "models:/no-such-model@champion", "--tracking-uri", registry)
    assert "'no-such-model'" in err and "not found" in err
    err = _serve_error(capsys, "--model-uri", f"models:/{NAME}/9", "--tracking-uri", registry)
    assert "version 9" in err and "not found" in err
    assert "must look like models:/NAME@ALIAS" in _serve_error(capsys, "--model-uri", "models:/x@")


def test_start_up_fails_clearly_for_missing_or_corrupt_files(exported, tmp_path, capsys):
    assert "not found" in _serve_error(capsys, "--model-uri", str(tmp_path / "absent.onnx"))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a model" * 50)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported["path"].read_bytes()[:5000])
    for path in (garbage, truncated):
        assert "is not a loadable ONNX model" in _serve_error(capsys, "--model-uri", str(path))
    assert "port (BALLOT_PORT)" in _serve_error(capsys, "--model-uri", str(garbage), "--port", "70000")


def test_ballot_serve_runs_until_terminated(exported):
    port = free_port()
    command = [sys.executable, "-m", "ballot.cli", "serve", "--model-uri", str(exported["path"]), "--port", str(port),
               "--max-batch", "4", "--log-level", "warning"]
    with in_subprocess(command, serving_env(), REPO, port) as url:
        card = httpx.get(f"{url}/metadata").json()
        assert (card["name"], card["version"], card["max_batch"]) == ("digits", None, 4)


# ---------------------------------------------------------------- the Docker image's command, outside Docker

def dockerfile() -> dict[str, list[str] | str]:
    """FROM, USER, CMD and HEALTHCHECK command of the Dockerfile, and the paths it copies."""
    found: dict[str, list[str] | str] = {"COPY": []}
    for line in (REPO / "Dockerfile").read_text().splitlines():
        word, _, rest = line.strip().partition(" ")
        if word in ("FROM", "USER"):
            found[word] = rest.strip()
        elif word == "CMD":
            found["CMD"] = json.loads(rest)
        elif word == "HEALTHCHECK":
            found["HEALTHCHECK"] = json.loads(rest.split(" CMD ", 1)[1])
        elif word == "COPY":
            found["COPY"].extend(rest.split()[:-1])  # type: ignore[union-attr]  # every source; the last is the target
    return found


def test_dockerfile_is_slim_non_root_and_runtime_only():
    spec = dockerfile()
    assert str(spec["FROM"]).endswith("-slim") and spec["USER"] not in ("root", "0")
    assert spec["CMD"] and spec["HEALTHCHECK"]
    lines = (REPO / "requirements-serve.txt").read_text().splitlines()
    listed = {canonicalize_name(line) for line in lines if line.strip() and not line.startswith("#")}  # bare names
    training = {canonicalize_name(name) for name in ("torch", "torchvision", "dvc", "optuna", "onnxscript",
                                                      "scikit-learn", "ballot")}
    assert not listed & training, listed & training
    # docker-py (an mlflow dependency) applies .dockerignore as the Docker engine does
    from docker.utils.build import exclude_paths

    context = exclude_paths(str(REPO), (REPO / ".dockerignore").read_text().splitlines())
    for source in spec["COPY"]:  # type: ignore[union-attr]
        path = REPO / source
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        assert files, f"{source} does not exist or is empty"
        missing = [str(f.relative_to(REPO)) for f in files if str(f.relative_to(REPO)) not in context]
        assert not missing, f"{source}: {missing} are not in the build context"


@dataclass
class ImageLayout:
    """The image's file layout outside Docker: /app holds serving/ only; torch and ballot cannot be imported."""

    app: Path
    env: dict[str, str]
    port: int

    def command(self, instruction: str) -> list[str]:
        """The Dockerfile's CMD or HEALTHCHECK command, with this interpreter as ``python``."""
        command = dockerfile()[instruction]
        assert isinstance(command, list)
        return [sys.executable, *command[1:]] if command[0] == "python" else command

    def run(self) -> ContextManager[str]:
        return in_subprocess(self.command("CMD"), self.env, self.app, self.port)

    def healthcheck(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.command("HEALTHCHECK"), env=self.env, cwd=self.app, capture_output=True, text=True)


def image_layout(folder: Path, **env: str) -> ImageLayout:
    app = folder / "app"
    shutil.copytree(REPO / "serving", app / "serving", ignore=shutil.ignore_patterns("__pycache__"))
    blocker = folder / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nfor name in ('torch', 'torchvision', 'ballot', 'sklearn'):\n    sys.modules[name] = None\n")
    port = free_port()
    values = {"PYTHONPATH": str(blocker), "BALLOT_HOST": "127.0.0.1", "BALLOT_PORT": str(port),
              "BALLOT_LOG_LEVEL": "warning", **env}
    return ImageLayout(app, serving_env(**values), port)


def test_image_command_serves_a_mounted_model_without_torch_or_the_library(exported, tmp_path):
    """Run the Dockerfile's CMD and HEALTHCHECK as written, in the image's layout."""
    image = image_layout(tmp_path, BALLOT_MODEL_URI=str(exported["path"]))
    with image.run() as url:
        x = exported["x"][:4]
        answer = httpx.post(f"{url}/predict", json={"inputs": x.tolist()})
        got = np.array([p["probabilities"] for p in answer.json()["predictions"]])
        np.testing.assert_allclose(got, torch_probabilities(exported["model"], x), atol=1e-4)
        assert image.healthcheck().returncode == 0
    stopped = image.healthcheck()
    assert stopped.returncode == 1 and "not ready" in stopped.stderr


# ---------------------------------------------------------------- registry over HTTP (slow), fuzz, load

@pytest.mark.slow
def test_image_command_serves_the_champion_from_an_mlflow_tracking_server(exported, tmp_path):
    """The image's registry path: mlflow-skinny over HTTP against `mlflow server` (sqlite behind it)."""
    import mlflow
    import onnx

    port = free_port()
    server_command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                      "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                      "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"]
    tracking = subprocess.Popen(server_command, cwd=tmp_path, env=serving_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not _answers(f"{uri}/health"):
            assert tracking.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.25)
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        run = client.create_run(client.create_experiment("serving-http")).info.run_id
        client.log_text(run, markdown_card(exported), "model/model_card.md")  # through the artifact proxy
        previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            with mlflow.start_run(run_id=run):
                info = mlflow.onnx.log_model(onnx_model=onnx.load_model(str(exported["path"])), name="model",
                                             registered_model_name=NAME, input_example=exported["x"][:2])
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])
        version = str(info.registered_model_version)
        client.set_model_version_tag(NAME, version, "method", "ballot")
        client.set_registered_model_alias(NAME, "champion", version)
        image = image_layout(tmp_path / "image", BALLOT_MODEL_URI=f"models:/{NAME}@champion",
                             MLFLOW_TRACKING_URI=uri, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        with image.run() as url:
            card = httpx.get(f"{url}/metadata").json()
            assert (card["name"], card["version"], card["alias"], card["method"]) == (NAME, version, "champion",
                                                                                      "ballot")
            assert card["acc"] == pytest.approx(exported["meta"]["acc"])  # from the ONNX file's metadata
            assert httpx.get(f"{url}/model-card").text == markdown_card(exported)
    finally:
        tracking.terminate()
        tracking.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _nest(values: list, shape: tuple[int, ...]) -> list:
    """``values`` (len = prod(shape)) as nested lists of ``shape``."""
    if len(shape) <= 1:
        return list(values)
    step = len(values) // shape[0] if shape[0] else 0
    return [_nest(values[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _fuzz_strategies():
    from hypothesis import strategies as st

    leaf = (st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats() | st.text(max_size=8))
    json_value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                              | st.dictionaries(st.sampled_from(["inputs", "images", "x", ""]) | st.text(max_size=6),
                                                inner, max_size=3), max_leaves=20)
    deep: list = [0.5]
    for _ in range(70):
        deep = [deep]
    poison = st.sampled_from([float("nan"), float("inf"), -0.1, 1.5, 255, "0.5", True, None, [], [0.5], {}, 10**400,
                              1e39, -1e39, 0, 1, deep])

    @st.composite
    def nested_body(draw):
        shape = draw(st.sampled_from([(1, 8, 8), (64,), (1, 8, 7), (8, 8), (1, 8, 8, 1), (0,), (1, 0, 8), (65,)]))
        count = draw(st.integers(0, 3) | st.integers(MAX_BATCH - 1, MAX_BATCH + 2))
        size = int(np.prod(shape))
        items = []
        for _ in range(count):
            values: list = [draw(st.floats(0, 1))] * size
            for position, value in draw(st.lists(st.tuples(st.integers(0, max(size - 1, 0)), poison), max_size=2)):
                if size:
                    values[position] = value
            whole = draw(st.integers(0, 9)) == 0  # now and then an item that is itself a poison value
            items.append(draw(poison) if whole else _nest(values, shape))
        return {"inputs": items}

    @st.composite
    def png_text(draw):
        side = draw(st.sampled_from([8, 8, 8, 7, 28, 1]))
        pixels = np.full((side, side), draw(st.integers(0, 255)), dtype=np.uint8)
        mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I;16"]))
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
        data = bytearray(buffer.getvalue())
        for position, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                                             max_size=3)):
            data[position] = value
        cut = draw(st.integers(1, len(data)))
        text = base64.b64encode(bytes(data[:cut])).decode()
        return draw(st.sampled_from([text, "data:image/png;base64," + text, text[:-1], text + "!"]))

    images_body = st.builds(lambda images: {"images": images},
                            st.lists(png_text() | st.text(max_size=20) | st.binary(max_size=40).map(
                                lambda b: base64.b64encode(b).decode()), max_size=MAX_BATCH + 2))
    # valid items but too many of them: must be 413 whatever else the fuzzer draws
    over_limit = st.integers(MAX_BATCH + 1, MAX_BATCH + 3).map(
        lambda count: {"inputs": [_nest([0.5] * 64, (1, 8, 8))] * count})
    structured = (nested_body() | images_body | json_value | over_limit).map(lambda body: json.dumps(body).encode())
    truncated = st.tuples(nested_body(), st.floats(0, 1)).map(
        lambda pair: json.dumps(pair[0]).encode()[:int(len(json.dumps(pair[0])) * pair[1])])
    body = structured | truncated | st.binary(max_size=300)
    content_type = st.sampled_from(["application/json"] * 6 + ["text/plain", "multipart/form-data; boundary=x",
                                                               "application/x-www-form-urlencoded", ""])
    target = st.sampled_from([("POST", "/predict")] * 12 + [
        ("GET", "/predict"), ("PUT", "/predict"), ("DELETE", "/predict"), ("POST", "/metadata"), ("GET", "/health"),
        ("GET", "/ready"), ("GET", "/metadata"), ("GET", "/openapi.json"), ("POST", "/predict/"), ("GET", "/nope")])
    return st.tuples(target, content_type, body)


FUZZ_REQUESTS = 1200


@pytest.mark.slow  # 1,200 requests, about 25 s: the fast subset stays under its 5 minutes
def test_fuzzed_requests_never_get_a_5xx_and_the_service_stays_up(service):
    from hypothesis import HealthCheck, given, settings

    statuses: list[int] = []

    @settings(max_examples=FUZZ_REQUESTS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(_fuzz_strategies())
    def fuzz(request):
        (method, path), content_type, body = request
        headers = {"Content-Type": content_type} if content_type else {}
        answer = service.request(method, path, content=body, headers=headers)
        statuses.append(answer.status_code)
        assert answer.status_code < 500, (method, path, body[:300], answer.text)
        if answer.status_code >= 400:
            assert isinstance(answer.json()["detail"], str)
        elif path == "/predict":
            predictions = answer.json()["predictions"]
            assert 1 <= len(predictions) <= MAX_BATCH
            for item in predictions:
                assert sum(item["probabilities"]) == pytest.approx(1.0, abs=1e-6)

    fuzz()
    counts = {code: statuses.count(code) for code in sorted(set(statuses))}
    print(f"\nfuzz: {len(statuses)} requests, status counts {counts}")
    assert len(statuses) >= 1000
    assert counts.get(200, 0) > 0 and counts.get(422, 0) > 0 and counts.get(413, 0) > 0
    assert service.get("/health").status_code == 200 and service.get("/ready").status_code == 200


LOAD_REQUESTS, CONCURRENCY = 2000, 16


def test_load_of_2000_requests_at_concurrency_16_has_no_errors(exported, tmp_path):
    """The image's command under load; every answer must be the right one for its own input."""
    from concurrent.futures import ThreadPoolExecutor

    x = exported["x"]
    expected = torch_probabilities(exported["model"], x).argmax(1)
    image = image_layout(tmp_path, BALLOT_MODEL_URI=str(exported["path"]))

    def worker(url: str, indices: range) -> list[tuple[float, bool]]:
        results = []
        with httpx.Client(base_url=url, timeout=60) as client:
            for index in indices:
                sample = index % len(x)
                start = time.perf_counter()
                answer = client.post("/predict", json={"inputs": [x[sample].tolist()]})
                elapsed = time.perf_counter() - start
                ok = answer.status_code == 200 and answer.json()["predictions"][0]["class_index"] == expected[sample]
                results.append((elapsed, ok))
        return results

    with image.run() as url:
        share = LOAD_REQUESTS // CONCURRENCY
        start = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            parts = list(pool.map(lambda w: worker(url, range(w * share, (w + 1) * share)), range(CONCURRENCY)))
        seconds = time.perf_counter() - start
    results = [r for part in parts for r in part]
    latencies = np.array([r[0] for r in results]) * 1000
    errors = sum(not r[1] for r in results)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    print(f"\nload: {len(results)} requests at concurrency {CONCURRENCY} in {seconds:.1f}s = "
          f"{len(results) / seconds:.0f} req/s; latency p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms; "
          f"errors {errors}")
    assert len(results) >= LOAD_REQUESTS and errors == 0
