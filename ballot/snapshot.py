"""A dataset snapshot: the seeded train / val / test splits as safetensors files, so later stages never re-read raw data.

Layout of a snapshot folder::

    train.safetensors, val.safetensors, test.safetensors   x (float32), y (int64), optional group (int64)
    splits.safetensors                                      train_index, val_index (positions in the training pool)
    summary.json                                            class names, input shape, sizes, per-class counts, provenance
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ballot.data import DataBundle, Split
from ballot.errors import StorageError
from ballot.storage import atomic_save_tensors, load_tensors, read_json, write_json

SPLITS = ("train", "val", "test")


def save_snapshot(data: DataBundle, folder: str | Path, provenance: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``folder`` (one atomic write per file); ``provenance`` goes into summary.json."""
    folder = Path(folder)
    for name in SPLITS:
        split: Split = getattr(data, name)
        tensors = {"x": split.x, "y": split.y}
        if split.group is not None:
            tensors["group"] = split.group
        atomic_save_tensors(tensors, folder / f"{name}.safetensors")
    atomic_save_tensors({"train_index": data.train_index, "val_index": data.val_index}, folder / "splits.safetensors")
    write_json(folder / "summary.json", {
        "class_names": data.class_names,
        "input_shape": list(data.input_shape),
        "sizes": {name: len(getattr(data, name)) for name in SPLITS},
        "class_counts": {name: torch.bincount(getattr(data, name).y, minlength=data.num_classes).tolist()
                         for name in SPLITS},
        **(provenance or {}),
    })


def load_snapshot(folder: str | Path) -> DataBundle:
    """The DataBundle saved by ``save_snapshot``; StorageError names a missing or inconsistent file."""
    folder = Path(folder)
    summary_path = folder / "summary.json"
    summary = read_json(summary_path, f"data snapshot '{folder}' has no summary.json: run the prepare stage first")
    names = summary.get("class_names") if isinstance(summary, dict) else None
    if not isinstance(names, list) or not names:
        raise StorageError(f"'{summary_path}' is not a snapshot summary: it needs a non-empty list 'class_names'")
    class_names = [str(name) for name in names]
    splits = {name: _load_split(folder / f"{name}.safetensors", len(class_names)) for name in SPLITS}
    index = load_tensors(folder / "splits.safetensors", "split indices")
    if set(index) != {"train_index", "val_index"}:
        raise StorageError(f"'{folder / 'splits.safetensors'}' must hold train_index and val_index, has {sorted(index)}")
    shapes = {tuple(s.x.shape[1:]) for s in splits.values()}
    if len(shapes) != 1:
        raise StorageError(f"data snapshot '{folder}': splits disagree on the input shape {sorted(shapes)}")
    return DataBundle(splits["train"], splits["val"], splits["test"], class_names,
                      index["train_index"], index["val_index"])


def _load_split(path: Path, num_classes: int) -> Split:
    tensors = load_tensors(path, "data split")
    if not {"x", "y"} <= set(tensors):
        raise StorageError(f"data split '{path}' must hold x and y, has {sorted(tensors)}")
    x, y, group = tensors["x"], tensors["y"], tensors.get("group")
    if x.dtype != torch.float32 or x.dim() < 2:
        raise StorageError(f"data split '{path}': x must be float32 with a sample dimension and at least one more, "
                           f"is {x.dtype} of shape {tuple(x.shape)}")
    for key, tensor in (("y", y), ("group", group)):
        if tensor is not None and (tensor.dtype != torch.int64 or tensor.dim() != 1):
            raise StorageError(f"data split '{path}': {key} must be a one-dimensional int64 tensor, is "
                               f"{tensor.dtype} of shape {tuple(tensor.shape)}")
    if len(x) != len(y) or (group is not None and len(group) != len(y)):
        raise StorageError(f"data split '{path}': x, y (and group) differ in length")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise StorageError(f"data split '{path}': labels outside [0, {num_classes})")
    return Split(x, y, group)
