"""Every error a user can cause, in one place; the ground floor: it imports nothing.

Each is a ``UserError``: the command line and the DVC stages print its one-line message and exit with 2.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a missing prerequisite; the message names it and says what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value or key is invalid; the message names it."""


class StorageError(UserError, ValueError):
    """A file is missing or unreadable; the message names it."""


class MaskError(UserError, ValueError):
    """A mask does not fit its model, or a mask file holds something other than 0/1 tensors."""


class ModelError(UserError, ValueError):
    """Unknown model name or a model that cannot take the dataset's inputs."""


class UntraceableModelError(ModelError):
    """Torch-Pruning cannot trace which layers a model's units couple: unit pruning and dead-unit removal cannot
    run on it (weight pruning can)."""


class DatasetError(UserError, RuntimeError):
    """A dataset is unknown, missing or malformed; the message says which and what to do."""


class UnknownMethodError(UserError, ValueError):
    """The requested pruning method is not in the registry."""


class PromotionError(UserError, ValueError):
    """The model or version does not exist, lacks the tags the gate reads, its registration did not complete, or the
    registry refused to answer; the message says which."""


class TuneError(UserError, RuntimeError):
    """A study cannot be joined or a worker failed; the message says why."""


class ParityError(UserError, ValueError):
    """ONNX Runtime's logits differ from PyTorch's by more than the configured tolerance."""


class RegistryError(UserError, ValueError):
    """A registry request this project does not allow (e.g. moving ``champion`` outside the gate) or MLflow
    refuses (a name it does not accept, a deleted experiment)."""


class QuantizationError(UserError, ValueError):
    """The INT8 model loses more accuracy or fairness than the export's limits allow."""
