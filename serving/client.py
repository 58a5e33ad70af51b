"""A minimal client of the service, standard library only.

    python -m serving.client --url http://127.0.0.1:8000 shirt.png boot.png

or from Python: ``predict(url, inputs=[...])`` / ``predict(url, images=[encode_png(path)])``.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class ClientError(RuntimeError):
    """The service answered with an error status; the message carries its explanation."""


def encode_png(path: str | Path) -> str:
    """A PNG file as the base64 text /predict takes in ``images``."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def predict(url: str, *, inputs: list[Any] | None = None, images: list[str] | None = None,
            timeout: float = 30.0) -> dict[str, Any]:
    """POST a batch to ``url``/predict; the decoded JSON answer, or ClientError with the service's message."""
    body = {"inputs": inputs} if inputs is not None else {"images": images}
    request = urllib.request.Request(f"{url.rstrip('/')}/predict", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["detail"]
        except (ValueError, KeyError, TypeError):
            pass
        raise ClientError(f"HTTP {error.code}: {detail}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.client", description="Classify PNG images.")
    parser.add_argument("images", nargs="+", help="PNG files of the model's input size")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="service address")
    args = parser.parse_args(argv)
    try:
        answer = predict(args.url, images=[encode_png(p) for p in args.images])
    except (ClientError, urllib.error.URLError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path, item in zip(args.images, answer["predictions"]):
        print(f"{path}\t{item['class_name']}\t{max(item['probabilities']):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
