"""Errors of the serving package; each message says what is wrong and what to do."""

from __future__ import annotations


class ServingError(ValueError):
    """Base class: a problem the operator or the client can fix."""


class SettingsError(ServingError):
    """A configuration value (environment variable or flag) is invalid."""


class ModelSourceError(ServingError):
    """The model URI points at nothing usable: a missing file, registered model, alias or version."""


class ModelLoadError(ServingError):
    """The model file exists but ONNX Runtime cannot load or run it, or it breaks the serving contract."""


class InputError(ServingError):
    """A request's inputs cannot be fed to the model; answered with HTTP 422."""


class BatchSizeError(InputError):
    """A request holds more items than the service accepts; answered with HTTP 413."""


class NotServedError(ServingError):
    """A request names a model or version this service does not serve; answered with HTTP 404."""
