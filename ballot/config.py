"""Typed, validated configuration.

Every concern has a dataclass whose fields carry a default that works and a help text. ``from_dict``
builds one from a plain mapping (a ``params.yaml`` group) and rejects unknown keys and ill-typed
values with a message that names the offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from ballot.errors import ConfigError
from ballot.knobs import Knob, parse_space, shown, to_float

T = TypeVar("T")




def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _check(condition: bool, where: str, message: str) -> None:
    """Raise ConfigError("<where>: <message>") unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{where}: {message}")


def _check_finite(config: Any, infinite_ok: tuple[str, ...] = ()) -> None:
    """ConfigError naming the first float field of ``config`` that is NaN or infinite (the fields in ``infinite_ok``,
    whose inf has a meaning, may be infinite)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float):
            ok = math.isfinite(value) or (f.name in infinite_ok and math.isinf(value))
            _check(ok, f.name, f"must be a finite number, got {value}")


@dataclass
class BaseConfig:
    """Settings shared by every stage."""

    seed: int = _help("Seed for splits, initialisation, batching and random masks.", 0)
    dataset: str = _help("Dataset name from the registry in ballot.data.", "fashion-mnist")
    model: str = _help("Model name from the registry in ballot.models.", "mlp")
    density: float = _help("Fraction of prunable weights kept, in (0, 1].", 0.05)
    device: str = _help("'auto' (cuda when available), 'cpu' or 'cuda[:N]'.", "auto")

    def __post_init__(self) -> None:
        _check_finite(self)
        check_density(self.density, "density")
        _check(-2**63 <= self.seed < 2**64, "seed",
               f"must be in [-2**63, 2**64) (torch's range), got {shown(self.seed)}")


@dataclass
class DataConfig:
    """Where the data comes from and how it is split."""

    root: str | None = _help("Folder holding dataset files (defaults depend on the dataset).", None)
    path: str | None = _help("File or folder for the 'npz' and 'imagefolder' datasets.", None)
    val_fraction: float = _help("Fraction of the training set held out for validation.", 0.1)
    imbalance_ratio: float = _help(
        "Long-tail ratio: largest / smallest training class size (1 = untouched).", 1.0
    )
    image_size: int | None = _help("Resize images to this square size (imagefolder only).", None)
    max_train_samples: int | None = _help("Cap on training-pool samples, for quick runs.", None)
    max_test_samples: int | None = _help("Cap on test samples, for quick runs.", None)
    download: bool = _help("Allow torchvision to download when files are absent.", True)

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _check(self.imbalance_ratio >= 1.0, "imbalance_ratio", f"must be >= 1, got {self.imbalance_ratio}")
        for name in ("max_train_samples", "max_test_samples", "image_size"):
            value = getattr(self, name)
            _check(value is None or value > 0, name, f"must be positive, got {value}")


SCHEDULES = ("constant", "step", "cosine", "plateau")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adam")


# every schedule with a min_steps floor, as a parameter group ('group.min_steps=0' turns one off)
FLOORED_SCHEDULES = ("train_dense", "prune.retrain", "prune.ballot.refine_train", "prune.safecompress",
                     "prune.fairscratch")
MIN_STEPS_HELP = ("Fewest optimiser steps: on a training split so small that `epochs` passes make fewer, the "
                  "epochs (and every setting counted in epochs) are stretched to reach this; 0 = exactly `epochs`.")


@dataclass
class TrainConfig:
    """One training run: optimiser and learning-rate schedule."""

    epochs: int = _help("Passes over the training split.", 10)
    batch_size: int = _help("Mini-batch size.", 128)
    optimizer: str = _help("'sgd' or 'adam'.", "sgd")
    lr: float = _help("Peak learning rate.", 0.05)
    momentum: float = _help("SGD momentum.", 0.9)
    weight_decay: float = _help("L2 weight decay.", 5e-4)
    schedule: str = _help("'constant', 'step', 'cosine' or 'plateau' (plateau needs a validation metric).", "cosine")
    warmup_epochs: float = _help("Linear warm-up length in epochs (fractions allowed).", 0.0)
    step_epochs: int = _help("Step schedule: decay every this many epochs.", 10)
    gamma: float = _help("Step / plateau schedule: multiply the lr by this on decay.", 0.1)
    patience: int = _help("Plateau schedule: epochs without improvement before decaying.", 2)
    precision: str = _help("'fp32', or mixed precision: 'bf16' (autocast) or 'fp16' (autocast and a gradient "
                           "scaler); meant for GPUs, where they are fast.", "fp32")
    min_steps: int = _help(MIN_STEPS_HELP, 500)

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.epochs >= 0, "epochs", f"must be >= 0, got {self.epochs}")
        _check(self.min_steps >= 0, "min_steps", f"must be >= 0, got {self.min_steps}")
        _check(self.precision in PRECISIONS, "precision", f"unknown '{self.precision}', choose from {PRECISIONS}")
        _check(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        _check(self.optimizer in OPTIMIZERS, "optimizer", f"unknown '{self.optimizer}', choose from {OPTIMIZERS}")
        _check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        _check(self.schedule in SCHEDULES, "schedule", f"unknown '{self.schedule}', choose from {SCHEDULES}")
        _check(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(self.step_epochs > 0, "step_epochs", f"must be positive, got {self.step_epochs}")
        _check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        _check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.patience >= 0, "patience", f"must be >= 0, got {self.patience}")


@dataclass
class DenseConfig(TrainConfig):
    """Dense training, plus where to save the rewind state."""

    epochs: int = _help("Passes over the training split.", 20)
    rewind_fraction: float = _help("Save the rewind state theta_k after this fraction of the dense training's "
                                   "optimiser steps (so the default fits any dataset size).", 0.1)
    rewind_iter: int | None = _help("Exact optimiser step of theta_k instead of rewind_fraction (null = use the "
                                    "fraction).", None)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.rewind_fraction <= 1, "rewind_fraction", f"must be in [0, 1], got {self.rewind_fraction}")
        _check(self.rewind_iter is None or self.rewind_iter >= 0, "rewind_iter", f"must be >= 0, got {self.rewind_iter}")
        _check(self.schedule != "plateau", "schedule", NO_PLATEAU)


NO_PLATEAU = ("'plateau' needs a validation objective, which only the refined training "
              "(prune.ballot.refine_train) watches; use constant, step or cosine here")


def check_density(density: float, where: str = "density") -> None:
    """Raise ConfigError unless ``density`` is a number in (0, 1]."""
    ok = isinstance(density, (int, float)) and math.isfinite(density) and 0.0 < density <= 1.0
    _check(ok, where, f"must be in (0, 1], got {density}")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from ``data``, naming any unknown key or ill-typed value."""
    _check(data is None or isinstance(data, Mapping), where, f"expected a group of keys, got {data!r}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names), key=str)
    _check(not unknown, where, f"unknown key(s) {unknown}; allowed keys: {names}")
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        # A partial nested group overrides the field's own default, not the nested class's defaults.
        # (A plain mapping field, such as tune.space, is replaced whole.)
        if (f.name in data and isinstance(data[f.name], Mapping) and f.default_factory is not dataclasses.MISSING
                and dataclasses.is_dataclass(hints[f.name])):
            data[f.name] = {**dataclasses.asdict(f.default_factory()), **data[f.name]}
    kwargs = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as error:  # raised by __post_init__ with the bare field name
        raise ConfigError(f"{where}.{error}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: must not be null")
    if dataclasses.is_dataclass(hint):
        _check(isinstance(value, Mapping), where, f"expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        _check(isinstance(value, (list, tuple)), where, f"expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return origin(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        _check(isinstance(value, bool), where, f"expected true/false, got {value!r}")
        return value
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), where, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        return to_float(value, where)
    if hint is str:
        _check(isinstance(value, str), where, f"expected a string, got {value!r}")
        return value
    if hint is Any:
        return value
    raise ConfigError(f"{where}: unsupported field type {hint}")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay as values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict view of a config dataclass (for logging and YAML)."""
    return dataclasses.asdict(config)


DATA_LOCATION_KEYS = ("root", "download")


def data_identity(data: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` group's settings (``to_dict`` of a DataConfig, or one read back from a file) less where the files
    are read from (``DATA_LOCATION_KEYS``): what decides the data, for manifests, fingerprints and provenance."""
    return {key: value for key, value in data.items() if key not in DATA_LOCATION_KEYS}


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently). Merge keys
    (``<<: *anchor``) work as in safe_load: a key the mapping sets itself overrides a merged one."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Check a mapping's own keys before its first flattening prepends the merged ones (a merge source may be
        # flattened before it is constructed itself).
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            self._check_keys(node)
        super().flatten_mapping(node)

    def _check_keys(self, node: yaml.MappingNode) -> None:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if not isinstance(key, typing.Hashable):
                raise yaml.constructor.ConstructorError(None, None, "a key must be a string or a number",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing, binary or malformed file or a duplicate key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (it is not UTF-8)") from None
    except (yaml.YAMLError, ValueError) as error:  # ValueError: an integer over 4300 digits, a date out of range
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


OBS_LOSSES = ("fair", "plain")
CONFLICT_RULES = ("protect", "veto", "share", "none")
LAYER_BUDGETS = ("blend", "erk", "ticket", "max")
REFINE_STARTS = ("rewind", "trained", "best")
# the methods whose refined final training starts from the rewound dense state (PruneContext.train_rewound), where
# prune.ballot.refine_start applies; magnitude and unit pruning start from theta_T
REWINDING_METHODS = ("lth", "random", "ballot", "safecompress", "fairscratch")


@dataclass
class BallotConfig:
    """Ballot's knobs (method.md section 5, docs/ballot.md). Defaults work; Optuna searches the marked ones."""

    rounds: int = _help("Rounds R at densities density ** (r / R): round 1 keeps theta_T's largest weights, each "
                        "further round trains the mask from theta_k and votes (1 = no voting).", 3)
    obs_epochs: int = _help("Epochs of each observation round (prune.retrain's schedule over this length).", 20)
    obs_loss: str = _help("The observer's training loss: 'fair' (class-reweighted) or 'plain' cross-entropy.", "fair")
    collect_every: int = _help("Collect gradients on every N-th observation step (1 = every step).", 4)
    ballot_every: int = _help("Cast a ballot every N observation steps (0 = once per epoch).", 0)
    layer_budget: str = _help("Per-layer counts (prune.granularity 'weight'): 'blend', the mean of the 'erk' density "
                              "(Evci et al. 2020) and the 'ticket' density (each layer's share of theta_T's global "
                              "magnitude top-k), either alone, or 'max', the larger of the two scaled to the budget "
                              "(docs/ballot.md, 'Per-layer budget rule').", "blend")
    layer_floor: float = _help("Every layer keeps at least this fraction of its uniform share (floor x density x "
                               "layer size) under every budget rule.", 0.5)
    conflict: str = _help("What a conflict between the accuracy and fairness signals does: 'protect' the "
                          "contested weights the fairness gradient relies on, 'veto' them, 'share': protect the "
                          "weights some class leans on most (per-class saliency retention), or 'none' (the default: "
                          "none helped on validation, docs/ballot.md).", "none")
    conflict_threshold: float = _help(
        "tau: a weight is contested when the strength -g_hat*f_hat exceeds tau (inf = never).", 0.5
    )
    protect_fraction: float = _help("'protect' and 'share': share of each layer's count reserved for the protected "
                                    "weights, ranked by their fairness saliency -w*f_hat ('protect') or class share "
                                    "('share') summed over the ballots.", 0.2)
    share_samples: int = _help("'share': training samples per class in the probe that measures the class shares.",
                               32)
    class_weight_floor: float = _help("delta in w_c = 1/max(acc_c, delta) for the fairness loss (1/delta caps the "
                                      "ratio of two class weights).", 0.2)
    class_weight_prior_images: float = _help(
        "K: acc_c in w_c is shrunk toward the balanced validation accuracy b as if each class had K more validation "
        "images at b, (n_c acc_c + K b) / (n_c + K), so classes measured on a few images get near-average weights "
        "(0, the default = the raw per-class accuracy; reports/class_weights/).", 0.0)
    refine_train: TrainConfig = _help("Refined-training schedule (any method with prune.final_train refined).",
                                      factory=lambda: TrainConfig(epochs=20, schedule="cosine"))
    fairness_loss_weight: float = _help("lambda in [0, 1]: mix of the fairness-weighted loss in refined training.", 1.0)
    fairness_start: float = _help(
        "Fraction of the refined training's steps run on plain cross-entropy before the class weights apply "
        "(deferred re-weighting, Cao et al. 2019; 0 = weighted from the first step; reports/deferred_weights/).", 0.0)
    refine_start: str = _help(
        "Where a refined final training starts: 'rewind' (the survivors rewound to theta_k, as LTH), 'trained' "
        "(theta_T's survivors with the refined schedule restarted: learning-rate rewinding, Renda et al. 2020) or "
        "'best' (both, keeping the higher validation objective, val acc - objective_mcd_weight x val MCD; ties: "
        "rewind; one more training; reports/refine_start/). Applies to the refined final training of "
        f"{', '.join(REWINDING_METHODS)} (weight granularity) and to the refine guard's plain training ('best': from "
        "theta_k); magnitude and unit pruning start from theta_T anyway. Not in the default Optuna space: the "
        "per-epoch pruner would favour 'trained' (docs/tuning.md).", "best")
    refine_guard: bool = _help(
        "After a refined final training, train the same mask from the same start plainly too (prune.retrain, "
        "cross-entropy) and keep the model with the higher validation objective (val acc - objective_mcd_weight x "
        "val MCD): one more training, against refined trainings that break down (reports/refine_guard/).", False)
    objective_mcd_weight: float = _help(
        "Plateau schedule, refine_start 'best' and refine_guard: val acc - this * val MCD.", 0.5)

    def __post_init__(self) -> None:
        _check_finite(self, infinite_ok=("conflict_threshold",))
        _check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        _check(self.obs_epochs >= 1, "obs_epochs", f"must be >= 1, got {self.obs_epochs}")
        _check(self.obs_loss in OBS_LOSSES, "obs_loss", f"unknown '{self.obs_loss}', choose from {OBS_LOSSES}")
        _check(self.collect_every >= 1, "collect_every", f"must be >= 1, got {self.collect_every}")
        _check(self.ballot_every >= 0, "ballot_every", f"must be >= 0, got {self.ballot_every}")
        _check(self.layer_budget in LAYER_BUDGETS, "layer_budget",
               f"unknown '{self.layer_budget}', choose from {LAYER_BUDGETS}")
        _check(0 <= self.layer_floor <= 1, "layer_floor", f"must be in [0, 1], got {self.layer_floor}")
        _check(self.conflict in CONFLICT_RULES, "conflict", f"unknown '{self.conflict}', choose from {CONFLICT_RULES}")
        _check(self.conflict_threshold >= 0, "conflict_threshold", f"must be >= 0 (or .inf), got {self.conflict_threshold}")
        _check(0 <= self.protect_fraction <= 1, "protect_fraction", f"must be in [0, 1], got {self.protect_fraction}")
        _check(self.share_samples >= 1, "share_samples", f"must be >= 1, got {self.share_samples}")
        _check(0 < self.class_weight_floor <= 1, "class_weight_floor", f"must be in (0, 1], got {self.class_weight_floor}")
        _check(self.class_weight_prior_images >= 0, "class_weight_prior_images",
               f"must be >= 0, got {self.class_weight_prior_images}")
        _check(0 <= self.fairness_loss_weight <= 1, "fairness_loss_weight",
               f"must be in [0, 1], got {self.fairness_loss_weight}")
        _check(0 <= self.fairness_start < 1, "fairness_start", f"must be in [0, 1), got {self.fairness_start}")
        _check(self.refine_start in REFINE_STARTS, "refine_start",
               f"unknown '{self.refine_start}', choose from {REFINE_STARTS}")
        _check(self.objective_mcd_weight >= 0, "objective_mcd_weight", f"must be >= 0, got {self.objective_mcd_weight}")


GROWTHS = ("random", "gradient")
SAFE_FAIR_LOSSES = ("variance", "reweighted", "none")


@dataclass
class SafeCompressConfig:
    """SafeCompress (Zhu et al., ASE 2022) with a fairness test in place of its attack test (docs/baselines.md)."""

    epochs: int = _help("Sparse training epochs from theta_0 (60 = LTH's 3 rounds x 20 epochs of prune.retrain).", 60)
    batch_size: int = _help("Mini-batch size.", 128)
    lr: float = _help("SGD learning rate.", 0.1)
    momentum: float = _help("SGD momentum.", 0.9)
    nesterov: bool = _help("Nesterov momentum.", True)
    weight_decay: float = _help("L2 weight decay.", 5e-4)
    lr_milestones: list[float] = _help("Fractions of the epochs after which the lr is multiplied by lr_gamma.",
                                       factory=lambda: [0.5, 0.75])
    lr_gamma: float = _help("Learning-rate decay factor at each milestone.", 0.1)
    update_frequency: int | None = _help("Optimiser steps between mask updates (null = spread `updates` evenly).",
                                         None)
    updates: int = _help("About this many mask updates over training when update_frequency is null.", 30)
    rescale_init: bool = _help("Scale theta_0's kept weights by 1 / sqrt(layer density) so a sparse network "
                               "without BatchNorm starts at a dense one's activation scale.", True)
    death_rate: float = _help("Share of each layer's active weights dropped (and regrown) at the first update.", 0.5)
    death_rate_min: float = _help("The death rate is cosine-annealed from death_rate down to this.", 0.005)
    growth: list[str] = _help("Update strategies, one candidate mask each: 'random' and/or 'gradient' regrowth.",
                              factory=lambda: ["random"])
    tolerance: float = _help("A candidate passes the validation test when its score is at least the current "
                             "model's score minus this; else the update is rejected.", 0.02)
    cwv_weight: float = _help("mu in the test's score val acc - mu * val CWV (also picks the checkpoint kept).", 10.0)
    fair_loss: str = _help("Fairness term added to the loss: 'reweighted' cross-entropy (the dense model's class "
                           "weights, prune.ballot.class_weight_floor), 'variance' of the batch's per-class mean "
                           "losses, or 'none'.", "reweighted")
    fair_loss_weight: float = _help("lambda: loss = cross-entropy + lambda * fairness term.", 1.0)

    min_steps: int = _help(MIN_STEPS_HELP + " 1500 = 3 x prune.retrain's 500, as epochs is 3 x 20.", 1500)

    def __post_init__(self) -> None:
        _check_finite(self)
        for name in ("epochs", "batch_size", "updates"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        _check(self.min_steps >= 0, "min_steps", f"must be >= 0, got {self.min_steps}")
        _check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        _check(not self.nesterov or self.momentum > 0, "nesterov", "needs momentum > 0")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(all(0 < m < 1 for m in self.lr_milestones), "lr_milestones",
               f"must be fractions in (0, 1), got {self.lr_milestones}")
        _check(0 < self.lr_gamma <= 1, "lr_gamma", f"must be in (0, 1], got {self.lr_gamma}")
        _check(self.update_frequency is None or self.update_frequency >= 1, "update_frequency",
               f"must be >= 1 (or null), got {self.update_frequency}")
        _check(0 < self.death_rate < 1, "death_rate", f"must be in (0, 1), got {self.death_rate}")
        _check(0 <= self.death_rate_min <= self.death_rate, "death_rate_min",
               f"must be in [0, death_rate], got {self.death_rate_min}")
        _check(bool(self.growth) and all(g in GROWTHS for g in self.growth), "growth",
               f"must list one or more of {GROWTHS}, got {self.growth}")
        _check(self.tolerance >= 0, "tolerance", f"must be >= 0, got {self.tolerance}")
        _check(self.cwv_weight >= 0, "cwv_weight", f"must be >= 0, got {self.cwv_weight}")
        _check(self.fair_loss in SAFE_FAIR_LOSSES, "fair_loss",
               f"unknown '{self.fair_loss}', choose from {SAFE_FAIR_LOSSES}")
        _check(self.fair_loss_weight >= 0, "fair_loss_weight", f"must be >= 0, got {self.fair_loss_weight}")


SCRATCH_SELECTIONS = ("global", "per_layer")
SCRATCH_PENALTIES = ("auto", "class_variance", "group_parity", "none")


@dataclass
class FairScratchConfig:
    """Fair Scratch Tickets (Tang et al., CVPR 2023): a mask learnt on frozen signed-constant weights (docs/baselines.md)."""

    epochs: int = _help("Score-training epochs (60 = LTH's 3 rounds x 20 epochs of prune.retrain).", 60)
    batch_size: int = _help("Mini-batch size.", 128)
    lr: float = _help("SGD learning rate of the scores (cosine-annealed per epoch).", 0.01)
    momentum: float = _help("SGD momentum.", 0.9)
    weight_decay: float = _help("L2 weight decay on the scores.", 1e-4)
    scale_fan: bool = _help("Signed constant sqrt(2 / (fan_in x density)) instead of sqrt(2 / fan_in), so a sparse "
                            "network without BatchNorm keeps its activation scale (the original's --scale-fan).", True)
    selection: str = _help("Mask = top-k |score| 'global' (network-wide, each layer's scores divided by their "
                           "initial scale 1/sqrt(fan_in)) or 'per_layer' (each layer keeps the density of its own "
                           "weights, as in the original); either way exactly the budget.", "per_layer")
    penalty: str = _help("Fairness penalty: 'group_parity' (demographic-parity gap over data's sensitive "
                         "attribute), 'class_variance' (variance of per-class losses), 'auto' (group_parity when "
                         "the data has a group, else class_variance) or 'none'.", "auto")
    fairness_weight: float = _help("lambda: loss = cross-entropy + lambda * penalty.", 0.1)

    min_steps: int = _help(MIN_STEPS_HELP + " 1500 = 3 x prune.retrain's 500, as epochs is 3 x 20.", 1500)

    def __post_init__(self) -> None:
        _check_finite(self)
        for name in ("epochs", "batch_size"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        _check(self.min_steps >= 0, "min_steps", f"must be >= 0, got {self.min_steps}")
        _check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.selection in SCRATCH_SELECTIONS, "selection",
               f"unknown '{self.selection}', choose from {SCRATCH_SELECTIONS}")
        _check(self.penalty in SCRATCH_PENALTIES, "penalty",
               f"unknown '{self.penalty}', choose from {SCRATCH_PENALTIES}")
        _check(self.fairness_weight >= 0, "fairness_weight", f"must be >= 0, got {self.fairness_weight}")


FINAL_TRAININGS = ("auto", "plain", "refined")
GRANULARITIES = ("weight", "unit")
UNIT_METHODS = ("magnitude", "ballot")  # the methods with a structured (unit) variant


@dataclass
class PruneConfig:
    """Which pruner runs and the settings the baselines share."""

    method: str = _help("Pruning method from the registry in ballot.pruning.", "ballot")
    retrain: TrainConfig = _help("Retraining / fine-tuning schedule of magnitude, lth and random.",
                                 factory=lambda: TrainConfig(epochs=20))
    final_train: str = _help("Training of the final mask: 'plain' (prune.retrain, cross-entropy), 'refined' "
                             "(prune.ballot.refine_train with the fairness-weighted loss) or 'auto' (refined for "
                             "ballot, plain for the baselines).", "auto")
    granularity: str = _help("'weight' (unstructured) or 'unit': whole neurons / output channels (residual-coupled "
                             "ones together) go, one keep ratio in every layer but the classifier, chosen so the "
                             "weight density is as close to base.density as whole units allow; magnitude becomes "
                             "L1-norm filter pruning (docs/deploy.md).", "weight")
    lth_rounds: int = _help("LTH: iterative magnitude pruning rounds n ((1-p)^n = density; 1 = one-shot).", 3)
    min_per_layer: int = _help("Every layer keeps at least this many weights.", 1)
    recalibrate_bn: bool = _help("Re-estimate BatchNorm running statistics on the training split after the final "
                                 "training (one forward pass; no effect on models without BatchNorm).", True)
    ballot: BallotConfig = _help("Ballot's knobs.", factory=BallotConfig)
    safecompress: SafeCompressConfig = _help("SafeCompress's knobs.", factory=SafeCompressConfig)
    fairscratch: FairScratchConfig = _help("FairScratch's knobs.", factory=FairScratchConfig)

    def __post_init__(self) -> None:
        _check(self.retrain.schedule != "plateau", "retrain.schedule", NO_PLATEAU)
        _check(self.final_train in FINAL_TRAININGS, "final_train",
               f"unknown '{self.final_train}', choose from {FINAL_TRAININGS}")
        _check(self.granularity in GRANULARITIES, "granularity",
               f"unknown '{self.granularity}', choose from {GRANULARITIES}")
        if self.granularity == "unit":
            _check(self.method in UNIT_METHODS, "granularity",
                   f"'unit' is available for {UNIT_METHODS}, not for '{self.method}'")
            _check(self.method != "ballot" or self.ballot.conflict == "none", "granularity",
                   f"'unit' Ballot votes on unit norms alone: set prune.ballot.conflict none "
                   f"(got '{self.ballot.conflict}')")
        _check(self.lth_rounds >= 1, "lth_rounds", f"must be >= 1, got {self.lth_rounds}")
        _check(self.min_per_layer >= 0, "min_per_layer", f"must be >= 0, got {self.min_per_layer}")

    def for_method(self, method: str) -> "PruneConfig":
        """These settings with ``method`` instead (as the sweep runs each of its methods); ConfigError when the
        settings do not fit it."""
        return dataclasses.replace(self, method=method)

    def refined(self) -> bool:
        """Whether the final mask is trained with the refined, fairness-weighted schedule."""
        return self.final_train == "refined" or (self.final_train == "auto" and self.method == "ballot")

    def rewinds(self) -> bool:
        """Whether a refined final training starts from the rewound dense state, where prune.ballot.refine_start
        applies (REWINDING_METHODS at weight granularity)."""
        return self.method in REWINDING_METHODS and self.granularity == "weight"

    def final_schedules(self) -> list[TrainConfig]:
        """The schedules of the final trainings PruneContext.final_train runs one after another: the refined one, once
        more from theta_T's survivors with refine_start 'best' (rewinding methods), and prune.retrain's with
        refine_guard; prune.retrain's alone for a plain final training (SafeCompress and FairScratch have none: their
        search is their training)."""
        if not self.refined():
            return [self.retrain]
        both_starts = self.ballot.refine_start == "best" and self.rewinds()
        return [self.ballot.refine_train] * (2 if both_starts else 1) + [self.retrain] * self.ballot.refine_guard

    def observation(self) -> TrainConfig:
        """The schedule of a Ballot observation round: prune.retrain's, over prune.ballot.obs_epochs epochs."""
        return dataclasses.replace(self.retrain, epochs=self.ballot.obs_epochs)


@dataclass
class EvaluateConfig:
    """The evaluate stage: metrics.json and the per-class plot."""

    plot_image: bool = _help("Also draw plots/per_class.png (the JSON plot data is always written).", True)


@dataclass
class SweepConfig:
    """The sweep stage: accuracy and CWV against density, one curve per method, on the pipeline's dense model."""

    densities: list[float] = _help("Densities of the curve; empty = the stage is off (the default run stays short).",
                                   factory=list)
    methods: list[str] = _help("Pruning methods, one curve each (Ballot takes the tuned values, like prune).",
                               factory=lambda: ["lth", "ballot"])

    def __post_init__(self) -> None:
        for i, density in enumerate(self.densities):
            check_density(density, f"densities[{i}]")
        _check(len(set(self.densities)) == len(self.densities), "densities", f"duplicate values in {self.densities}")
        _check(bool(self.methods), "methods", "must name at least one method")
        _check(len(set(self.methods)) == len(self.methods), "methods", f"duplicate values in {self.methods}")


@dataclass
class ExportConfig:
    """The export stage: ONNX with masks baked in, checked against PyTorch; optionally compact and INT8."""

    QUANTIZE_MODES = ("none", "dynamic", "static")  # a class constant, not a field

    parity_samples: int = _help("Test inputs on which ONNX Runtime and PyTorch logits are compared.", 256)
    parity_tolerance: float = _help("Fail the export when a logit differs by more than this times (1 + |logit|): "
                                    "about absolute for small logits, relative for large ones, whose float32 "
                                    "rounding grows with them. A compact INT8 file must match the quantizer's own "
                                    "file within this, absolutely (the same arithmetic).", 1e-4)
    compact: bool = _help("Remove dead units, store sparse weights packed (values + gaps or bitmask, rebuilt inside "
                          "the graph) and minify the graph; false writes the plain dense file.", True)
    quantize: str = _help("INT8 quantization with onnxruntime.quantization: 'none', 'dynamic' or 'static' "
                          "(activation ranges calibrated on training inputs).", "none")
    max_quant_acc_drop: float = _help("Refuse the INT8 model when its test accuracy is more than this below the "
                                      "float model's.", 0.01)
    max_quant_cwv_rise: float = _help("Refuse the INT8 model when its test CWV exceeds the float model's by more "
                                      "than this (absolute).", 0.005)
    calibration_samples: int = _help("Training inputs that calibrate static quantization, class-stratified "
                                     "(ballot.quantize.calibration_index).", 512)

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.parity_samples > 0, "parity_samples", f"must be positive, got {self.parity_samples}")
        _check(self.parity_tolerance > 0, "parity_tolerance", f"must be positive, got {self.parity_tolerance}")
        _check(self.quantize in self.QUANTIZE_MODES, "quantize",
               f"must be one of {list(self.QUANTIZE_MODES)}, got '{self.quantize}'")
        for name in ("max_quant_acc_drop", "max_quant_cwv_rise"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _check(self.calibration_samples > 0, "calibration_samples", f"must be positive, got {self.calibration_samples}")


@dataclass
class RegisterConfig:
    """The register stage: one MLflow run per pipeline execution and a new registered model version."""

    model_name: str = _help("Registered model name in the MLflow model registry.", "ballot-fashion-mnist")
    experiment: str = _help("MLflow experiment that holds the pipeline runs.", "ballot")
    tracking_uri: str = _help("MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable wins.",
                              "sqlite:///mlflow.db")

    def __post_init__(self) -> None:
        for name in ("model_name", "experiment", "tracking_uri"):
            _check(bool(getattr(self, name).strip()), name, "must not be empty")


@dataclass
class PromoteConfig:
    """The gate of `ballot promote`: when a version may become the champion."""

    max_acc_drop: float = _help("Refuse when test accuracy is more than this below the dense model's.", 0.02)
    cwv_tolerance: float = _help("Refuse when CWV exceeds the current champion's CWV times this.", 1.0)

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(0 <= self.max_acc_drop <= 1, "max_acc_drop", f"must be in [0, 1], got {self.max_acc_drop}")
        _check(self.cwv_tolerance > 0, "cwv_tolerance", f"must be positive, got {self.cwv_tolerance}")


TUNE_MODES = ("single", "multi")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "halving", "none")


def default_space() -> dict[str, Any]:
    """The search space params.yaml declares (docs/tuning.md); it contains Ballot's defaults."""
    return {
        "prune.ballot.conflict": {"type": "categorical", "choices": ["none", "protect", "share"]},
        "prune.ballot.layer_budget": {"type": "categorical", "choices": ["blend", "erk", "ticket", "max"]},
        "prune.ballot.protect_fraction": {"type": "float", "low": 0.05, "high": 0.5},
        "prune.ballot.obs_epochs": {"type": "int", "low": 8, "high": 20, "step": 4},
        "prune.ballot.class_weight_floor": {"type": "float", "low": 0.1, "high": 0.5},
        "prune.ballot.fairness_loss_weight": {"type": "float", "low": 0.0, "high": 1.0},
        "prune.ballot.refine_train.epochs": {"type": "int", "low": 8, "high": 20, "step": 4},
        "prune.ballot.refine_train.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
        "prune.ballot.refine_train.schedule": {"type": "categorical", "choices": ["cosine", "step", "plateau"]},
        "prune.ballot.refine_train.warmup_epochs": {"type": "float", "low": 0.0, "high": 2.0},
    }


@dataclass
class TuneConfig:
    """The Optuna study over Ballot's knobs (docs/tuning.md): search space, objective, budget, storage."""

    space: Any = _help("Search space {dotted prune.ballot.* key: {type: float|int|categorical, ...}}; a given "
                       "space replaces this one whole (docs/tuning.md).", factory=default_space)
    mode: str = _help("'single' (maximise val acc - mcd_weight * val MCD) or 'multi' (val acc up, val CWV down).",
                      "single")
    n_trials: int = _help("Finished (complete or pruned) trials the study must hold, over all workers.", 20)
    timeout_s: float | None = _help("Each process starts no new trial after this many seconds (null = no limit).",
                                    None)
    sampler: str = _help("'tpe' or 'random', seeded with tune.seed (+ the worker's index).", "tpe")
    seed: int = _help("Sampler seed.", 0)
    pruner: str = _help("Single mode only: 'median', 'halving' (successive halving) or 'none'.", "median")
    pruner_startup_trials: int = _help("Median pruner: trials that must finish before any is pruned.", 5)
    pruner_warmup_epochs: int = _help("Refined-training epochs every trial runs before it may be pruned.", 2)
    mcd_weight: float = _help("lambda in the objective: val acc - lambda * val MCD.", 0.5)
    max_acc_drop: float = _help("A trial is feasible when val acc >= dense val acc - this.", 0.02)
    storage: str | None = _help("Optuna storage URL (null = sqlite in the output folder; postgresql://... "
                                "for workers on several machines).", None)
    study_name: str | None = _help("Study name (null = 'ballot-' + fingerprint of the configuration and dense "
                                   "model).", None)
    workers: int = _help("Worker processes started on the study (each uses one torch thread when > 1).", 1)
    heartbeat_s: int = _help("Heartbeat interval in seconds; a RUNNING trial silent for twice this is marked FAIL.",
                             10)
    experiment: str = _help("MLflow experiment holding the study's parent run.", "ballot-tune")
    use_best: bool = _help("The prune stage applies best_params.yaml over prune.* when the file exists.", True)

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.mode in TUNE_MODES, "mode", f"unknown '{self.mode}', choose from {TUNE_MODES}")
        _check(self.sampler in SAMPLERS, "sampler", f"unknown '{self.sampler}', choose from {SAMPLERS}")
        _check(self.pruner in PRUNERS, "pruner", f"unknown '{self.pruner}', choose from {PRUNERS}")
        for name in ("n_trials", "workers", "heartbeat_s"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("pruner_startup_trials", "pruner_warmup_epochs"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _check(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32) (Optuna's seeds), got {shown(self.seed)}")
        _check(self.timeout_s is None or self.timeout_s > 0, "timeout_s", f"must be positive, got {self.timeout_s}")
        _check(self.mcd_weight >= 0, "mcd_weight", f"must be >= 0, got {self.mcd_weight}")
        _check(0 <= self.max_acc_drop <= 1, "max_acc_drop", f"must be in [0, 1], got {self.max_acc_drop}")
        _check(bool(self.experiment.strip()), "experiment", "must not be empty")
        if self.study_name is not None:
            _check(bool(self.study_name.strip()), "study_name", "must not be empty (null names the study by its "
                   "fingerprint)")
            _check(len(self.study_name) <= MAX_STUDY_NAME, "study_name",
                   f"at most {MAX_STUDY_NAME} characters (Optuna's storage), got {len(self.study_name)}")
        self.knobs()
        if self.storage is not None:
            check_storage_url(self.storage, where="storage")

    def knobs(self) -> list[Knob]:
        """The search space as typed knobs (ConfigError names a malformed entry)."""
        return parse_space(self.space, where="space")


MAX_STUDY_NAME = 512  # Optuna's RDB storage keeps study names in a column of this length


def check_storage_url(url: str, where: str = "tune.storage") -> Any:
    """The parsed SQLAlchemy URL; ConfigError naming ``where`` when ``url`` is not one."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigError(f"{where}: '{url}' is not a database URL; use sqlite:///path/study.db or "
                          "postgresql://user@host:5432/db") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(f"{where}: '{url}' is an in-memory database, which dies with its process (no resume, no "
                          "shared workers); use sqlite:///path/study.db")
    return parsed


@dataclass
class ExperimentConfig:
    """The library's part of params.yaml: one group per concern."""

    base: BaseConfig = _help("Shared settings.", factory=BaseConfig)
    data: DataConfig = _help("Dataset location and splits.", factory=DataConfig)
    train_dense: DenseConfig = _help("Dense training.", factory=DenseConfig)
    prune: PruneConfig = _help("Pruning method and settings.", factory=PruneConfig)
    evaluate: EvaluateConfig = _help("Pipeline: evaluate stage.", factory=EvaluateConfig)
    sweep: SweepConfig = _help("Pipeline: the density sweep (opt-in).", factory=SweepConfig)
    export: ExportConfig = _help("Pipeline: ONNX export stage.", factory=ExportConfig)
    register: RegisterConfig = _help("Pipeline: MLflow tracking and registry.", factory=RegisterConfig)
    promote: PromoteConfig = _help("Pipeline: promotion gate of `ballot promote`.", factory=PromoteConfig)
    tune: TuneConfig = _help("Optuna study over Ballot's knobs (tune stage, `ballot tune`).", factory=TuneConfig)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'group.key=value' -> (['group', 'key'], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' must look like group.key=value")
    try:
        return key.split("."), yaml.load(raw, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, ValueError) as error:  # ValueError: an integer over 4300 digits, a date out of range
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"override '{text}': the value is not valid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"override '{text[:80]}...': the value is nested too deeply to read") from None


def apply_overrides(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``params`` with each 'a.b.c=value' set (creating groups as needed)."""
    merged = copy.deepcopy(params)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            if node.get(part) is None:  # absent, or an empty group (a bare `data:` line)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a group")
        node[path[-1]] = value
    return merged


def experiment_from_params(params: Mapping[str, Any]) -> ExperimentConfig:
    """ExperimentConfig from a params mapping (a whole params.yaml); an unknown group is an error."""
    names = [f.name for f in dataclasses.fields(ExperimentConfig)]
    unknown = sorted(set(params) - set(names), key=str)
    if unknown:
        raise ConfigError(f"params: unknown group(s) {unknown}; allowed groups: {names}")
    hints = typing.get_type_hints(ExperimentConfig)
    return ExperimentConfig(**{k: from_dict(hints[k], v, k) for k, v in params.items()})
