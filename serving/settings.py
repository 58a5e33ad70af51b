"""Service configuration: environment variables, overridden by `ballot serve` flags."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from serving.errors import SettingsError

DEFAULT_MODEL_URI = "models:/ballot-fashion-mnist@champion"
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True)
class Settings:
    """Everything the service needs to start; see ``ENV`` for the variable behind each field."""

    model_uri: str = DEFAULT_MODEL_URI  # an .onnx path, models:/NAME@ALIAS or models:/NAME/VERSION
    tracking_uri: str | None = None  # MLflow tracking / registry URI; None = MLflow's default
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto: CUDA when onnxruntime offers it, else CPU
    threads: int = 0  # ONNX Runtime intra-op threads; 0 = one per physical core
    max_batch: int = 256  # most items in one /predict request
    max_body_bytes: int = 16 * 2**20  # largest accepted request body
    read_timeout: float = 10.0  # seconds a request may take to arrive in full; slower connections are closed
    max_connections: int = 128  # open connections (and requests in flight) beyond which uvicorn answers 503
    registry_timeout: float = 15.0  # seconds each registry request may take before the start-up gives up
    log_level: str = "info"
    access_log: bool = False  # one uvicorn log line per request; off by default, as it costs time on every request

    def __post_init__(self) -> None:
        _require(bool(self.model_uri.strip()), "model_uri", "must not be empty")
        _require(bool(self.host.strip()), "host", "must not be empty")
        _require(1 <= self.port <= 65535, "port", f"must be in 1..65535, got {self.port}")
        _require(self.device in DEVICES, "device", f"must be one of {DEVICES}, got {self.device!r}")
        _require(self.threads >= 0, "threads", f"must be >= 0 (0 = automatic), got {self.threads}")
        _require(self.max_batch >= 1, "max_batch", f"must be >= 1, got {self.max_batch}")
        _require(self.max_body_bytes >= 1024, "max_body_bytes", f"must be >= 1024, got {self.max_body_bytes}")
        _require(self.max_connections >= 1, "max_connections", f"must be >= 1, got {self.max_connections}")
        _require(0 < self.read_timeout <= 3600, "read_timeout", f"must be in (0, 3600] seconds, got {self.read_timeout}")
        _require(0 < self.registry_timeout <= 600, "registry_timeout",
                 f"must be in (0, 600] seconds, got {self.registry_timeout}")
        _require(self.log_level in LOG_LEVELS, "log_level", f"must be one of {LOG_LEVELS}, got {self.log_level!r}")


ENV = {
    "model_uri": "BALLOT_MODEL_URI",
    "tracking_uri": "MLFLOW_TRACKING_URI",
    "host": "BALLOT_HOST",
    "port": "BALLOT_PORT",
    "device": "BALLOT_DEVICE",
    "threads": "BALLOT_THREADS",
    "max_batch": "BALLOT_MAX_BATCH",
    "max_body_bytes": "BALLOT_MAX_BODY_BYTES",
    "read_timeout": "BALLOT_READ_TIMEOUT",
    "max_connections": "BALLOT_MAX_CONNECTIONS",
    "registry_timeout": "BALLOT_REGISTRY_TIMEOUT",
    "log_level": "BALLOT_LOG_LEVEL",
    "access_log": "BALLOT_ACCESS_LOG",
}
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise SettingsError(f"{name} ({ENV[name]}): {message}")


def load_settings(environ: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from ``environ`` (default ``os.environ``); non-None ``overrides`` (field name -> value) win."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(Settings)
    values: dict[str, Any] = {}
    for name, variable in ENV.items():
        raw = environ.get(variable, "").strip()
        if raw:
            values[name] = _parse(raw, hints[name], name)
    unknown = sorted(set(overrides or {}) - set(ENV))
    if unknown:
        raise SettingsError(f"unknown setting(s) {unknown}; known: {sorted(ENV)}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Settings(**values)


def _parse(raw: str, hint: Any, name: str) -> Any:
    if hint is bool:
        if raw.lower() not in BOOLEANS:
            raise SettingsError(f"{name} ({ENV[name]}): expected true or false (or 1 / 0), got {raw!r}")
        return BOOLEANS[raw.lower()]
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{name} ({ENV[name]}): expected an integer, got {raw!r}") from None
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise SettingsError(f"{name} ({ENV[name]}): expected a number of seconds, got {raw!r}") from None
    return raw

