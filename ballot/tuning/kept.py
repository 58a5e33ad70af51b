"""Kept trial models: the tune stage keeps the chosen trial's pruned model so that prune need not train it again.

A trial is one ``run_prune`` call; when the prune stage would make the very same call (same recipe: data settings,
seed, model, density, device and every prune.* value after the tuned ones are applied, on the same dense states),
its result is the trial's, so the stage reuses the kept files instead of training for another minute. On the
same device and thread count the two are bitwise equal (tests/test_tune.py checks it); any difference in the
recipe and prune trains as usual.

Layout: ``<folder>/trial-<number>/`` holds what ``experiment.save_pruned`` writes plus ``kept.json``
({trial, recipe, seconds}); after the study only the chosen trial's folder remains.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ballot.config import ExperimentConfig, data_identity, to_dict
from ballot.experiment import save_pruned
from ballot.pruning import DenseArtifacts, PruneResult
from ballot.storage import read_json, staged_folder, write_json
from ballot.train import resolve_device

KEPT_FILE = "kept.json"
TRIAL_PREFIX = "trial-"


def update_with_states(digest: Any, states: Iterable[Mapping[str, torch.Tensor]]) -> None:
    """Feed every tensor of ``states`` (names sorted, bytes on the CPU) into the hashlib object ``digest``."""
    for state in states:
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())


def prune_recipe(cfg: ExperimentConfig, dense: DenseArtifacts) -> str:
    """SHA-256 of everything ``run_prune(cfg, data, dense)`` depends on."""
    d = to_dict(cfg)
    payload = {
        "base": {"dataset": d["base"]["dataset"], "model": d["base"]["model"], "density": d["base"]["density"],
                 "seed": d["base"]["seed"], "device": resolve_device(cfg.base.device)},
        "data": data_identity(d["data"]),
        "prune": d["prune"],
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    update_with_states(digest, (dense.rewind_state, dense.trained_state))
    return digest.hexdigest()


@dataclass(frozen=True)
class KeptTrial:
    """A kept trial model: its folder (save_pruned's layout), trial number and training seconds."""

    folder: Path
    trial: int
    seconds: float


def keep_trial(folder: str | Path, number: int, result: PruneResult, cfg: ExperimentConfig, dense: DenseArtifacts,
               tuned_params: dict[str, Any], val_metrics: dict[str, Any], seconds: float) -> None:
    """Write trial ``number``'s result under ``folder`` (complete or not at all)."""
    with staged_folder(Path(folder) / f"{TRIAL_PREFIX}{number}") as staged:
        save_pruned(staged, result, {"val": val_metrics}, cfg, tuned_params=tuned_params)
        write_json(staged / KEPT_FILE, {"trial": number, "recipe": prune_recipe(cfg, dense), "seconds": seconds})


def keep_only(folder: str | Path, number: int | None) -> None:
    """Remove every kept trial of ``folder`` except ``number`` (None: remove them all). The folder exists afterwards,
    empty when it was removed by hand (the pipeline's output; prune then trains the chosen trial's model itself)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    for path in Path(folder).glob(f"{TRIAL_PREFIX}*"):
        if path.name != f"{TRIAL_PREFIX}{number}":
            shutil.rmtree(path)


def find_kept(folder: str | Path, recipe: str) -> KeptTrial | None:
    """The kept trial of ``folder`` made with ``recipe``, or None."""
    for path in sorted(Path(folder).glob(f"{TRIAL_PREFIX}*/{KEPT_FILE}")):
        info = read_json(path, f"'{path}' not found")
        if info.get("recipe") == recipe:
            return KeptTrial(path.parent, int(info["trial"]), float(info["seconds"]))
    return None
