"""CIFAR-10 and CIFAR-100 read from their published archives without running anything a file asks for.

The binary version (``cifar-10-batches-bin``, ``cifar-100-binary``) is plain bytes: a label byte (CIFAR-100: coarse
then fine) and 3,072 pixel bytes per image, class names in text files. The python version (``cifar-10-batches-py``,
``cifar-100-python``, what torchvision downloads) is pickled; torchvision's own loader unpickles it with every global
allowed, so here it goes through an unpickler that builds nothing but numpy arrays of plain number types, and only
the way numpy's own pickles build them (Python's documented "restricting globals" recipe, narrowed per global): a
file naming any other class or function, an array of any other type, or any other call is refused, never run.
"""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ballot.errors import DatasetError

PIXELS = 3 * 32 * 32  # bytes of one image, channel-major (all red, then green, then blue)


@dataclass(frozen=True)
class Layout:
    """Where one version of one CIFAR keeps its files."""

    folder: str
    train: tuple[str, ...]
    test: str
    names: str  # binary: a text file of class names; python: the pickled meta file


BINARY = {10: Layout("cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin",
                     "batches.meta.txt"),
          100: Layout("cifar-100-binary", ("train.bin",), "test.bin", "fine_label_names.txt")}
PYTHON = {10: Layout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                     "batches.meta"),
          100: Layout("cifar-100-python", ("train",), "test", "meta")}
LABEL_KEY = {10: "labels", 100: "fine_labels"}  # python version: a batch's labels
NAMES_KEY = {10: "label_names", 100: "fine_label_names"}  # python version: the meta file's class names


PLAIN_DTYPES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f4", "f8"})


def _plain_dtype(name: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """numpy's shared instance of a plain number type, whatever ``copy`` asks: its ``__setstate__`` changes nothing,
    whereas a copied (or a structured, void or object) dtype can be rewritten by the file to describe raw bytes as
    object pointers."""
    if name not in PLAIN_DTYPES:
        raise pickle.UnpicklingError(f"it holds an array of type {name!r}, which a CIFAR file never holds")
    return np.dtype(name)


def _array_class(*args: Any) -> None:
    """What a file gets for ``numpy.ndarray``: a token to hand to ``_reconstruct``, refusing to be called itself."""
    raise pickle.UnpicklingError("it calls numpy's array constructor, which numpy's own pickles never do")


def _empty_array(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """The one call a pickled array begins with, ``_reconstruct(ndarray, (0,), b'b')``: an empty array that the
    file's state then fills (shape, plain dtype, bytes, checked by numpy). Any other call is refused: numpy's
    constructor and ``_reconstruct`` take a dtype as text ('O', 'V8', ...) and a buffer, offset and strides, with
    which a file builds object arrays from raw bytes or reads outside its buffer."""
    from numpy._core import multiarray  # type: ignore[import-not-found]

    if subtype is not _array_class or shape != (0,) or typecode not in ("b", b"b"):
        raise pickle.UnpicklingError("it builds an array otherwise than numpy's own pickles do")
    return multiarray._reconstruct(np.ndarray, (0,), b"b")


def _array_globals() -> dict[tuple[str, str], Any]:
    """The only globals pickled numpy arrays and scalars need (numpy 2 moved ``numpy.core`` to ``numpy._core``), each
    narrowed to what numpy's own pickles do with it, and the text-to-bytes codec of Python 3's protocol 2."""
    from numpy._core import multiarray  # type: ignore[import-not-found]

    builders = {("numpy", "ndarray"): _array_class, ("numpy", "dtype"): _plain_dtype,
                ("_codecs", "encode"): codecs.encode}
    for package in ("numpy.core", "numpy._core"):
        builders[(f"{package}.multiarray", "_reconstruct")] = _empty_array
        builders[(f"{package}.multiarray", "scalar")] = multiarray.scalar
    return builders


class _ArraysOnly(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; any other global is refused before it is called."""

    allowed = _array_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR file never holds") from None


def _unpickle(path: Path) -> dict[str, Any]:
    """A pickled CIFAR dict, keys as text (the files were written by Python 2: byte-string keys)."""
    try:
        with open(path, "rb") as handle:
            loaded = _ArraysOnly(handle, encoding="latin1").load()
    except Exception as error:  # anything a damaged or hostile file makes the unpickler or numpy raise
        raise DatasetError(f"'{path}' is not a CIFAR python batch: {error or type(error).__name__}") from None
    if not isinstance(loaded, dict):
        raise DatasetError(f"'{path}' is not a CIFAR python batch: it holds a {type(loaded).__name__}, not a dict")
    return {key.decode("latin1") if isinstance(key, bytes) else str(key): value for key, value in loaded.items()}


def _python_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    missing = [key for key in ("data", LABEL_KEY[num_classes]) if key not in batch]
    if missing:
        raise DatasetError(f"'{path}' is not a CIFAR-{num_classes} python batch: no '{missing[0]}' entry")
    pixels = np.asarray(batch["data"])
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != PIXELS:
        raise DatasetError(f"'{path}': 'data' is {pixels.dtype} of shape {pixels.shape}, not uint8 (N, {PIXELS})")
    labels = np.asarray(batch[LABEL_KEY[num_classes]])
    if labels.shape != (len(pixels),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"'{path}': {len(pixels)} images but labels of shape {labels.shape} ({labels.dtype})")
    return pixels, labels.astype(np.int64)


def _binary_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    label_bytes = 1 if num_classes == 10 else 2  # CIFAR-100: coarse label, then fine label
    record = label_bytes + PIXELS
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise DatasetError(f"'{path}' holds {raw.size} bytes, not a whole number of {record}-byte CIFAR-{num_classes}"
                           " records")
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:], rows[:, label_bytes - 1].astype(np.int64)


def _class_names(root: Path, layout: Layout, num_classes: int, binary: bool) -> list[str]:
    path = root / layout.names
    if binary:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        names = [name.decode("latin1") if isinstance(name, bytes) else str(name)
                 for name in _unpickle(path).get(NAMES_KEY[num_classes], [])]
    if len(names) != num_classes:
        raise DatasetError(f"'{path}' names {len(names)} classes, not CIFAR-{num_classes}'s {num_classes}")
    return names


def find(root: Path, num_classes: int) -> tuple[Path, Layout, bool] | None:
    """The extracted archive under ``root`` (the binary version first): its folder, layout and whether it is binary."""
    for binary, layouts in ((True, BINARY), (False, PYTHON)):
        layout = layouts[num_classes]
        if (root / layout.folder).is_dir():
            return root / layout.folder, layout, binary
    return None


def read(folder: Path, layout: Layout, binary: bool, num_classes: int
         ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str]]:
    """(train pixels, labels), (test pixels, labels) and the class names of an extracted archive; pixels are uint8
    ``N x 3 x 32 x 32``. DatasetError naming a missing or malformed file."""
    absent = [name for name in (*layout.train, layout.test, layout.names) if not (folder / name).is_file()]
    if absent:
        raise DatasetError(f"'{folder}' lacks {', '.join(absent)}: extract the whole CIFAR-{num_classes} archive")
    read_batch = _binary_batch if binary else _python_batch

    def split(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        parts = [read_batch(folder / name, num_classes) for name in names]
        pixels = np.concatenate([p for p, _ in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([y for _, y in parts])
        beyond = labels[(labels < 0) | (labels >= num_classes)]
        if beyond.size:
            raise DatasetError(f"'{folder}': a label of {int(beyond[0])} in CIFAR-{num_classes}'s {num_classes} classes")
        return pixels, labels

    return split(layout.train), split((layout.test,)), _class_names(folder, layout, num_classes, binary)
