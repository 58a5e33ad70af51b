"""The operations a run is made of, shared by the CLI and the DVC stage scripts."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ballot import distributed
from ballot.config import ExperimentConfig, data_identity, flatten, to_dict
from ballot.data import DataBundle, dataset_loader, layout_notice, load_data
from ballot.errors import ConfigError, ModelError, StorageError
from ballot.fairness import balanced_accuracy, evaluate
from ballot.masks import Mask, prunable_names, unpruned_parameters
from ballot.models import build_model, check_logits, model_builder
from ballot.pruning import DATA_PARALLEL, DenseArtifacts, PruneContext, PruneResult, get_pruner
from ballot.pruning.fairscratch import penalty_kind
from ballot.pruning.units import unit_groups
from ballot.storage import atomic_save_tensors, load_state, load_tensors, read_json, save_state, write_json
from ballot.train import (TrainResult, floored, resolve_device, seed_everything,
                          steps_per_epoch, stretched, train)

RUN_CONFIG = "config.json"  # in every `ballot prune` output folder: the configuration that ran
DENSE_MANIFEST = "dense.json"
DENSE_FILES = {"init_state": "init.safetensors", "rewind_state": "rewind.safetensors",
               "trained_state": "dense.safetensors"}


def check_experiment(cfg: ExperimentConfig, processes: int | None = None) -> None:
    """Fail fast, before any work, when the dataset, model or method is not in its registry, a method of a sweep
    that will run does not fit the prune settings, the device is unusable, or the method cannot run in ``processes``
    processes (default: as many as torchrun started)."""
    dataset_loader(cfg.base.dataset)
    model_builder(cfg.base.model)
    for method in (cfg.prune.method, *cfg.sweep.methods):
        get_pruner(method)
    for index, method in enumerate(cfg.sweep.methods if cfg.sweep.densities else []):  # no densities: no sweep
        try:
            cfg.prune.for_method(method)
        except ConfigError as error:
            raise ConfigError(f"sweep.methods[{index}]: '{method}' does not fit the prune settings "
                              f"(prune.{error})") from None
    if (processes or distributed.requested_processes()) > 1 and cfg.prune.method not in DATA_PARALLEL:
        raise ConfigError(f"prune.method: '{cfg.prune.method}' trains in its own loop and runs in one process only; "
                          f"data-parallel methods: {sorted(DATA_PARALLEL)}")
    usable_device(cfg.base.device, "base.device")


def usable_device(name: str, where: str) -> torch.device:
    """The torch device ``name`` resolves to; ConfigError naming ``where`` when it is malformed or absent here."""
    try:
        return resolve_device(name)
    except (ValueError, RuntimeError) as error:  # torch.device raises RuntimeError for a malformed name
        raise ConfigError(f"{where}: {error}") from None


def prepare_data(cfg: ExperimentConfig) -> DataBundle:
    """Load the configured dataset with its seeded splits, checked by ``check_fits``."""
    data = load_data(cfg.base.dataset, cfg.data, cfg.base.seed)
    check_fits(cfg, data)
    return data


def _probe_model(cfg: ExperimentConfig, data: DataBundle) -> nn.Module:
    """A model of the configured kind to inspect before training, built without moving the seeded random stream."""
    with torch.random.fork_rng(devices=[]):
        return build_model(cfg.base.model, data.input_shape, data.num_classes)


def check_fits(cfg: ExperimentConfig, data: DataBundle) -> None:
    """A UserError, before any training, when the configured method needs something the data lacks (FairScratch's
    group_parity penalty: a sensitive attribute), the model does not return logits (``check_logits``), has layers no
    method can prune (a computed weight) or can retrain (a frozen weight), or the configured granularity cannot (unit:
    grouped convolutions, attention, recurrent layers, tied weights, a model Torch-Pruning cannot trace). The
    pipeline's stages call it on the snapshot, since the prepare stage does not run again when the model or the
    method changes."""
    if cfg.prune.method == "fairscratch":
        penalty_kind(cfg.prune.fairscratch, has_group=data.train.group is not None)
    try:
        model = _probe_model(cfg, data)
        check_logits(cfg.base.model, model, data.train.x[:2], data.num_classes)
    except ModelError as error:  # channels-last images often do not fit: say so with the model's refusal
        notice = layout_notice(data.input_shape)
        if notice is None:
            raise
        raise ModelError(f"{error}; {notice.removeprefix('note: ')}") from None
    params = dict(model.named_parameters())
    # prunable_names refuses a computed weight (weight_norm) here, before training rather than after
    frozen = [name for name in prunable_names(model) if not params[name].requires_grad]
    if frozen:
        raise ModelError(f"model '{cfg.base.model}' freezes prunable weight(s) {frozen[:3]} (requires_grad False): "
                         "every method retrains the weights it keeps, and Ballot votes with their gradients; unfreeze "
                         "them, or keep a frozen feature extractor outside the model and give ballot its features")
    if cfg.prune.granularity == "unit":
        unit_groups(model, data.input_shape)


def new_model(cfg: ExperimentConfig, data: DataBundle) -> nn.Module:
    """A freshly initialised (seeded) model whose first layer standardises with the training statistics."""
    seed_everything(cfg.base.seed)
    mean, std = data.input_stats()
    return build_model(cfg.base.model, data.input_shape, data.num_classes, mean, std)


def rewind_step(cfg: ExperimentConfig, train_samples: int) -> int:
    """The optimiser step whose state is theta_k: train_dense.rewind_iter, else rewind_fraction of dense training."""
    dense = stretched(cfg.train_dense, train_samples)
    steps = dense.epochs * steps_per_epoch(train_samples, dense.batch_size)
    if dense.rewind_iter is None:
        return round(dense.rewind_fraction * steps)
    if dense.rewind_iter > steps:
        raise ConfigError(f"train_dense.rewind_iter ({dense.rewind_iter}) is beyond the {steps} steps of dense "
                          f"training: theta_k would be theta_T; lower it, train longer, or set it to null to use "
                          f"train_dense.rewind_fraction")
    return dense.rewind_iter


def stretch_notice(cfg: ExperimentConfig, train_samples: int, method: str | None = None) -> str | None:
    """One line naming the schedules of ``method`` (default prune.method) that their ``min_steps`` lengthens on
    this training split, or None."""
    prune = cfg.prune.for_method(method or cfg.prune.method)
    final = ({"prune.ballot.refine_train": (prune.ballot.refine_train, stretched)} if prune.refined()
             else {"prune.retrain": (prune.retrain, stretched)})
    own = {"ballot": {"prune.ballot.obs_epochs": (prune.observation(), stretched)} if prune.ballot.rounds > 1 else {},
           "lth": {"prune.retrain": (prune.retrain, stretched)},
           "safecompress": {"prune.safecompress": (prune.safecompress, floored)},
           "fairscratch": {"prune.fairscratch": (prune.fairscratch, floored)}}.get(prune.method, {})
    if prune.method in ("safecompress", "fairscratch") and not prune.refined():
        final = {}  # their own loop trains the final mask
    phases = {"train_dense": (cfg.train_dense, stretched), **own, **final}
    runs = {name: (schedule.epochs, rule(schedule, train_samples).epochs) for name, (schedule, rule) in phases.items()}
    longer = [f"{name} {given} -> {run}" for name, (given, run) in runs.items() if run != given]
    if not longer:
        return None
    return (f"note: {train_samples} training samples make few optimiser steps an epoch, so the schedules below their "
            f"min_steps run longer (epochs): {', '.join(longer)}; min_steps=0 keeps a schedule's epochs as given")


# a model with more than this share of its parameters outside the prunable layers gets a note: density counts only
# the prunable ones, so "95% pruned" would overstate how much smaller the model becomes
UNPRUNED_NOTICE_SHARE = 0.1


def coverage_notice(model: nn.Module) -> str | None:
    """One line when more than UNPRUNED_NOTICE_SHARE of ``model``'s parameters are outside the prunable layers,
    naming the largest such parameters, or None."""
    total = sum(p.numel() for p in model.parameters())
    sizes = unpruned_parameters(model)
    unpruned = sum(sizes.values())
    if not total or unpruned <= UNPRUNED_NOTICE_SHARE * total:
        return None
    largest = sorted(sizes.items(), key=lambda item: item[1], reverse=True)[:3]
    named = ", ".join(f"{name} ({size:,})" for name, size in largest)
    return (f"note: {unpruned:,} of the model's {total:,} parameters ({unpruned / total:.1%}) are outside the layers "
            f"a method prunes (linear, convolutional, attention input and recurrent weights) and stay dense; "
            f"base.density applies to the other {total - unpruned:,}. Largest: {named}")


def notices_before_training(cfg: ExperimentConfig, data: DataBundle, method: str | None = None) -> list[str]:
    """The notes a run prints before it trains: the loader's (files an image folder skipped), inputs that look
    channels-last, the schedules of ``method`` (default prune.method) that min_steps lengthens, and the share of the
    model's parameters no method prunes (when above UNPRUNED_NOTICE_SHARE)."""
    notices = (*data.notes, layout_notice(data.input_shape), stretch_notice(cfg, len(data.train), method),
               coverage_notice(_probe_model(cfg, data)))
    return [line for line in notices if line]


def train_dense(cfg: ExperimentConfig, data: DataBundle, progress: bool | None = None
                ) -> tuple[nn.Module, DenseArtifacts, TrainResult]:
    """theta_0 -> theta_T, keeping the rewind state theta_k."""
    model = new_model(cfg, data)
    init_state = copy.deepcopy(model.state_dict())
    result = train(model, data.train, cfg.train_dense, seed=cfg.base.seed, device=resolve_device(cfg.base.device),
                   rewind_iter=rewind_step(cfg, len(data.train)), desc="dense", progress=progress)
    assert result.rewind_state is not None
    dense = DenseArtifacts(init_state, result.rewind_state, copy.deepcopy(model.state_dict()))
    return model, dense, result


def dense_manifest(cfg: ExperimentConfig) -> dict[str, Any]:
    """What decides the dense states: written beside them so a reuse can be checked."""
    return {"dataset": cfg.base.dataset, "model": cfg.base.model, "seed": cfg.base.seed,
            "data": data_identity(to_dict(cfg.data)), "train_dense": to_dict(cfg.train_dense)}


DATA_DIGEST_KEY = "data_sha256"  # dense.json: DataBundle.training_digest of the data the states were trained on


def save_dense(dense: DenseArtifacts, folder: str | Path, cfg: ExperimentConfig | None = None,
               data: DataBundle | None = None) -> None:
    """Write theta_0, theta_k and theta_T as safetensors files in ``folder`` (and, given ``cfg``, dense.json; given
    ``data`` too, with the digest of the data they were trained on)."""
    for attr, name in DENSE_FILES.items():
        save_state(getattr(dense, attr), Path(folder) / name)
    if cfg is not None:
        digest = {DATA_DIGEST_KEY: data.training_digest()} if data is not None else {}
        write_json(Path(folder) / DENSE_MANIFEST, {**dense_manifest(cfg), **digest})


def check_dense_reuse(folder: str | Path, cfg: ExperimentConfig, data: DataBundle) -> None:
    """StorageError unless ``folder``'s dense.json records the configuration ``cfg`` would train with and, where it
    records one, the digest of ``data`` (a data file changed in place keeps its configuration)."""
    path = Path(folder) / DENSE_MANIFEST
    manifest = read_json(path, f"'{folder}' has no {DENSE_MANIFEST}, so it cannot be checked against this "
                               "configuration; point --dense at a folder written by `ballot prune` or at a new folder")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("data"), dict):
        raise StorageError(f"'{path}' is not a dense-state manifest (a JSON object with a 'data' object); "
                           "use another --dense folder")
    recorded_digest = manifest.pop(DATA_DIGEST_KEY, None)  # older manifests have none
    saved = flatten({**manifest, "data": data_identity(manifest["data"])})  # older manifests recorded the location
    wanted = flatten(json.loads(json.dumps(dense_manifest(cfg))))
    differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differ:
        raise StorageError(f"dense states in '{folder}' were trained with other settings ({', '.join(differ)}); "
                           f"use another --dense folder")
    if recorded_digest is not None and recorded_digest != data.training_digest():
        raise StorageError(f"dense states in '{folder}' were trained on other data: the same settings, but the "
                           "training or validation split's contents differ (a data file changed?); use another "
                           "--dense folder")


def load_dense(folder: str | Path) -> DenseArtifacts:
    """Read the states written by ``save_dense``."""
    return DenseArtifacts(**{attr: load_tensors(Path(folder) / name, "dense weights")
                             for attr, name in DENSE_FILES.items()})


def run_prune(cfg: ExperimentConfig, data: DataBundle, dense: DenseArtifacts, progress: bool | None = None,
              on_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> PruneResult:
    """Run the configured pruning method on the dense phase's states (``on_epoch``: see PruneContext)."""
    pruner = get_pruner(cfg.prune.method)
    ctx = PruneContext(data=data, model_name=cfg.base.model, density=cfg.base.density, seed=cfg.base.seed,
                       dense=dense, config=cfg.prune, device=resolve_device(cfg.base.device), progress=progress,
                       on_epoch=on_epoch)
    seed_everything(cfg.base.seed)
    result = pruner(ctx)
    ctx.recalibrate(result.model)
    ctx.agree(result.mask, f"{cfg.prune.method}'s final mask")
    return result


# a dense model whose balanced validation accuracy covers less than this share of the way from chance to perfect
# has not learned enough to prune: every method degenerates on it (docs/ballot.md, "Known limits")
WEAK_DENSE_SHARE = 0.25


def weak_dense_warning(val: dict[str, Any]) -> str | None:
    """A one-line warning when the dense model's validation metrics ``val`` (``evaluate``'s) put its balanced
    accuracy (the mean over the classes present) below WEAK_DENSE_SHARE of the way from chance to perfect."""
    balanced, chance = balanced_accuracy(val["per_class"]), 1 / len(val["per_class"])
    if math.isnan(balanced) or balanced >= chance + WEAK_DENSE_SHARE * (1 - chance):
        return None
    return (f"warning: the dense model's balanced validation accuracy is {balanced:.3f} against a chance level of "
            f"{chance:.3f}; pruning a model this weak gives unreliable results for every method (Ballot's class "
            f"weights are noise): train it longer first (raise train_dense.min_steps or epochs, and the prune "
            f"schedules' with them)")


def lost_learning_warning(val: dict[str, Any], dense_val: dict[str, Any]) -> str | None:
    """A one-line warning when the pruned model's validation metrics ``val`` keep less than WEAK_DENSE_SHARE of the
    way the dense model's ``dense_val`` rose from chance (balanced accuracies): the pruned network did not train (a
    density too low for the model, schedules too short). None as well when the dense model is weak itself
    (``weak_dense_warning`` speaks then), and for metrics of another number of classes. A class without validation
    samples may be NaN, or None as JSON stores it."""
    pruned, reference = ([math.nan if a is None else a for a in m["per_class"]] for m in (val, dense_val))
    if len(pruned) != len(reference) or weak_dense_warning({"per_class": reference}):
        return None
    balanced, dense, chance = balanced_accuracy(pruned), balanced_accuracy(reference), 1 / len(pruned)
    if math.isnan(balanced) or math.isnan(dense) or balanced >= chance + WEAK_DENSE_SHARE * (dense - chance):
        return None
    return (f"warning: the pruned model's balanced validation accuracy is {balanced:.3f} against the dense model's "
            f"{dense:.3f} (chance {chance:.3f}): it lost most of what the dense model learned; try a higher "
            f"base.density, longer schedules (prune.retrain.min_steps or epochs) or another method")


def model_metrics(model: nn.Module, data: DataBundle, device: str = "auto") -> dict[str, Any]:
    """Test-split metrics at the top level and validation metrics under 'val'."""
    dev = resolve_device(device)
    test = evaluate(model, data.test.x, data.test.y, data.num_classes, data.test.group, device=dev)
    val = evaluate(model, data.val.x, data.val.y, data.num_classes, data.val.group, device=dev)
    return {**test, "class_names": data.class_names, "val": val}


def save_pruned(folder: str | Path, result: PruneResult, metrics: dict[str, Any], cfg: ExperimentConfig,
                tuned_params: dict[str, Any] | None = None) -> None:
    """mask.safetensors, model.safetensors, metrics.json, details.json (the method's details, plus the record of
    competing final trainings and the tuned values that ran, if any), history.json (per epoch of the final training) and
    <name>.safetensors per extra tensor artifact (Ballot: votes.safetensors)."""
    folder = Path(folder)
    for name, tensors in result.tensors.items():
        atomic_save_tensors(tensors, folder / f"{name}.safetensors")
    result.mask.save(folder / "mask.safetensors")
    save_state(result.model, folder / "model.safetensors")
    details = result.details.to_json()
    if result.final_choice is not None:
        details["final_choice"] = result.final_choice
    if tuned_params is not None:
        details["tuned_params"] = tuned_params
    write_json(folder / "details.json", details)
    write_json(folder / "history.json", result.history)
    write_json(folder / RUN_CONFIG, to_dict(cfg))
    write_json(folder / "metrics.json", metrics)


def load_pruned(folder: str | Path, cfg: ExperimentConfig, data: DataBundle) -> tuple[nn.Module, Mask]:
    """The sparse model and mask saved by ``save_pruned``."""
    folder = Path(folder)
    model = build_model(cfg.base.model, data.input_shape, data.num_classes)
    load_state(model, folder / "model.safetensors")
    mask = Mask.load(folder / "mask.safetensors")
    mask.validate(model)
    return model, mask


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn(*args, **kwargs), seconds it took)."""
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start
