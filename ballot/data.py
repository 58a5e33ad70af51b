"""Datasets as in-memory tensors: a registry of loaders, seeded splits and long-tail subsampling.

Every loader returns pixels scaled to [0, 1] as float32 ``N x C x H x W`` (or ``N x D`` for tabular
``npz`` data) with int64 labels; normalisation lives inside the model (see ``ballot.models``), so a
deployed model takes the same raw inputs as the loader produces.
"""

from __future__ import annotations

import gzip
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ballot import cifar, distributed
from ballot.config import DataConfig
from ballot.errors import DatasetError


@dataclass
class Split:
    """Inputs, labels and (optionally) a sensitive attribute per sample."""

    x: torch.Tensor
    y: torch.Tensor
    group: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: torch.Tensor) -> "Split":
        """The samples at ``index``."""
        group = None if self.group is None else self.group[index]
        return Split(self.x[index], self.y[index], group)


@dataclass
class RawDataset:
    """What a loader returns before splitting; ``notes``: lines a run prints before training."""

    train: Split
    test: Split
    class_names: list[str]
    notes: tuple[str, ...] = ()


@dataclass
class DataBundle:
    """Train / validation / test splits plus what a model needs to know about the inputs."""

    train: Split
    val: Split
    test: Split
    class_names: list[str]
    train_index: torch.Tensor  # positions in the loader's training pool
    val_index: torch.Tensor
    notes: tuple[str, ...] = ()  # the loader's lines to print before training

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def training_digest(self) -> str:
        """SHA-256 (hex) of the training and validation inputs and labels: what a dense model was trained and
        checked on, whatever file they came from."""
        return distributed.digest({f"{name}.{part}": getattr(split, part) for name, split in
                                   (("train", self.train), ("val", self.val)) for part in ("x", "y")}).hex()

    def input_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the training inputs: per channel for images, per feature otherwise; DatasetError when
        float32 cannot hold them or the standardised inputs (values near float32's largest overflow its sums)."""
        x = self.train.x
        dims = [0, 2, 3] if x.dim() == 4 else [0]
        mean = x.mean(dim=dims, keepdim=True)[0]
        std = x.std(dim=dims, keepdim=True)[0].clamp_min(1e-3)
        reach = torch.maximum(x.amax(dim=dims, keepdim=True)[0] - mean, mean - x.amin(dim=dims, keepdim=True)[0]) / std
        if not (mean.isfinite().all() and std.isfinite().all() and reach.isfinite().all()):
            raise DatasetError(f"training inputs reach {x.abs().max().item():.3g}: too large to standardise in "
                               "float32; rescale them (e.g. divide by their largest value)")
        return mean, std


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz",
}
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzipped or not) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: cannot be read ({error}); delete it so that it is downloaded again, or "
                           "replace it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: truncated (expected {int(np.prod(shape))} values, found {body.size})")
    return body.reshape(shape)


def _find_fashion_dir(cfg: DataConfig) -> Path | None:
    candidates = [Path(cfg.root)] if cfg.root else []
    candidates += [Path(cfg.root) / "FashionMNIST" / "raw"] if cfg.root else []
    candidates.append(DEBIAN_FASHION_DIR)
    for folder in candidates:
        if all((folder / name).exists() or (folder / name[:-3]).exists() for name in FASHION_FILES.values()):
            return folder
    return None


def _load_fashion_mnist(cfg: DataConfig) -> RawDataset:
    folder = _find_fashion_dir(cfg)
    if folder is None:
        folder = _download_fashion_mnist(cfg)
    arrays = {}
    for key, name in FASHION_FILES.items():
        path = folder / name if (folder / name).exists() else folder / name[:-3]
        arrays[key] = _read_idx(path)
    as_images = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)  # noqa: E731
    return RawDataset(
        train=Split(as_images(arrays["train_x"]), torch.from_numpy(arrays["train_y"].astype(np.int64))),
        test=Split(as_images(arrays["test_x"]), torch.from_numpy(arrays["test_y"].astype(np.int64))),
        class_names=list(FASHION_CLASSES),
    )


def _download_fashion_mnist(cfg: DataConfig) -> Path:
    root = Path(cfg.root or "data/torchvision")
    hint = ("install Debian's 'dataset-fashion-mnist' package (files in /usr/share/datasets/fashion-mnist) "
            "or set data.root to a folder with the four idx .gz files")
    if not cfg.download:
        raise DatasetError(f"Fashion-MNIST files not found and data.download is false: {hint}")
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
    except Exception as error:  # network errors come in many types
        raise DatasetError(f"Fashion-MNIST not found and could not be downloaded ({error}): {hint}") from None
    return root / "FashionMNIST" / "raw"


def _load_digits(cfg: DataConfig) -> RawDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    # A fixed, seed-independent 80/20 train/test cut so test metrics compare across seeds.
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1797))
    cut = int(0.8 * len(y))
    return RawDataset(Split(x[order[:cut]], y[order[:cut]]), Split(x[order[cut:]], y[order[cut:]]),
                      [str(d) for d in range(10)])


def _load_cifar(cfg: DataConfig, num_classes: int) -> RawDataset:
    """CIFAR-10/100 from its extracted binary or python archive under ``data.root`` (``ballot.cifar``: nothing is
    unpickled beyond numpy arrays); with ``data.download``, torchvision fetches the python archive (MD5-checked)."""
    root = Path(cfg.root or "data/torchvision")
    found = cifar.find(root, num_classes)
    if found is None and cfg.download:
        from torchvision import datasets
        from torchvision.datasets.utils import download_and_extract_archive

        source = datasets.CIFAR10 if num_classes == 10 else datasets.CIFAR100
        try:
            download_and_extract_archive(source.url, str(root), filename=source.filename, md5=source.tgz_md5)
        except Exception as error:  # network errors come in many types
            raise DatasetError(f"CIFAR-{num_classes} is not in '{root}' and could not be downloaded "
                               f"({type(error).__name__}: {error}); {_cifar_hint(num_classes)}") from None
        found = cifar.find(root, num_classes)
    if found is None:
        raise DatasetError(f"CIFAR-{num_classes} is not in '{root}'; {_cifar_hint(num_classes)}")
    (train_x, train_y), (test_x, test_y), names = cifar.read(*found, num_classes)
    as_tensor = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0)  # noqa: E731
    return RawDataset(Split(as_tensor(train_x), torch.from_numpy(train_y)),
                      Split(as_tensor(test_x), torch.from_numpy(test_y)), names)


def _cifar_hint(num_classes: int) -> str:
    folders = " or ".join(f"'{layouts[num_classes].folder}'" for layouts in (cifar.BINARY, cifar.PYTHON))
    return f"extract the binary or python archive there (a folder {folders}) or set data.root"


def _read_image(folder_set: Any, index: int) -> tuple[torch.Tensor, int]:
    """Image ``index`` of a torchvision ImageFolder and its label; DatasetError naming a file PIL cannot read."""
    from PIL import Image, UnidentifiedImageError

    try:
        return folder_set[index]
    # PIL reports a broken file as OSError (UnidentifiedImageError: empty, not an image; truncated), ValueError or
    # SyntaxError (a corrupt header), EOFError, or DecompressionBombError (a header declaring billions of pixels)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        reason = "not an image file PIL can identify" if isinstance(error, UnidentifiedImageError) else error
        raise DatasetError(f"imagefolder: cannot read image '{folder_set.samples[index][0]}': {reason}") from None


IMAGE_SUFFIXES = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"})
READ_AS_IMAGES = f"(images: {' '.join(sorted(IMAGE_SUFFIXES))})"  # what messages about skipped files add
SPLIT_FOLDERS = {"train": ("train", "training"), "test": ("test", "testing")}  # matched in any letter case


def _split_folder(root: Path, split: str) -> Path | None:
    """The sub-folder of ``root`` that holds ``split`` ('train' or 'test', by a name of SPLIT_FOLDERS), if any."""
    if not root.is_dir():
        return None
    found = [child for child in sorted(root.iterdir()) if child.is_dir() and child.name.lower() in SPLIT_FOLDERS[split]]
    if len(found) > 1:
        raise DatasetError(f"imagefolder: '{root}' has {len(found)} {split} folders ({', '.join(p.name for p in found)})"
                           "; keep one")
    return found[0] if found else None


def _load_rgb(path: str) -> Any:
    """An image file as 8-bit RGB. Wider grey levels, which PIL's RGB conversion clips, are scaled into 8 bits: 16-bit
    (PIL's ``I;16`` modes, and 32-bit integer ``I`` images whose levels fit 16 bits) by 65535, floating-point
    (``F``) levels in [0, 1] by 1; other ranges are refused, as no scale is known for them."""
    from PIL import Image

    with open(path, "rb") as handle:
        image = Image.open(handle)
        if image.mode.startswith("I") or image.mode == "F":
            levels = np.asarray(image, dtype=np.float64)
            full = 1.0 if image.mode == "F" else 65535.0
            if levels.size and not (np.isfinite(levels).all() and levels.min() >= 0 and levels.max() <= full):
                raise ValueError(f"its {image.mode}-mode grey levels span [{levels.min():g}, {levels.max():g}], "
                                 f"beyond the [0, {full:g}] that is scaled to 8 bits; convert it to 8 or 16 bits")
            image = Image.fromarray(np.rint(levels / full * 255.0).astype(np.uint8))
        return image.convert("RGB")


def _load_imagefolder(cfg: DataConfig) -> RawDataset:
    """``path`` holds ``train/<class>/*`` and optionally ``test/<class>/*`` (else a stratified 20% of train is the
    test set); split folders match in any letter case (``Train``, ``training``), and folders whose names start with
    a dot (``.ipynb_checkpoints``) are not classes."""
    from torchvision import datasets, transforms

    class VisibleClasses(datasets.ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            classes = sorted(entry.name for entry in Path(directory).iterdir()
                             if entry.is_dir() and not entry.name.startswith("."))
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {name: index for index, name in enumerate(classes)}

    if not cfg.path:
        raise DatasetError("dataset 'imagefolder' needs data.path: a folder with train/<class>/ image folders")
    root = Path(cfg.path)
    train_dir = _split_folder(root, "train") or root
    if not train_dir.is_dir():
        raise DatasetError(f"imagefolder: '{root}' is not a folder")
    steps = [transforms.Resize((cfg.image_size, cfg.image_size))] if cfg.image_size else []
    transform = transforms.Compose(steps + [transforms.ToTensor()])

    notes: list[str] = []

    def read(folder: Path) -> tuple[Split, list[str]]:
        skipped: Counter[str] = Counter()

        def readable(path: str) -> bool:
            suffix = Path(path).suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                return True
            if not Path(path).name.startswith("."):
                skipped[suffix or "no extension"] += 1
            return False

        try:
            folder_set = VisibleClasses(str(folder), transform=transform, loader=_load_rgb, is_valid_file=readable)
        except (FileNotFoundError, OSError) as error:
            known = f" {READ_AS_IMAGES}" if "no valid file" in str(error) else ""
            raise DatasetError(f"imagefolder: cannot read '{folder}': {str(error).strip()}{known}") from None
        images, labels = zip(*(_read_image(folder_set, i) for i in range(len(folder_set))))
        shapes = {tuple(img.shape) for img in images}
        if len(shapes) > 1:
            raise DatasetError(f"imagefolder: images in '{folder}' differ in size {sorted(shapes)}; set data.image_size")
        loose = sum(1 for entry in folder.iterdir() if entry.is_file() and not entry.name.startswith("."))
        parts = [f"{sum(skipped.values())} files of other types ("
                 + ", ".join(f"{suffix}: {count}" for suffix, count in sorted(skipped.items())) + ")"] if skipped else []
        parts += [f"{loose} files outside the class folders"] if loose else []
        if parts:
            notes.append(f"note: imagefolder '{folder}': skipped {'; '.join(parts)} {READ_AS_IMAGES}")
        return Split(torch.stack(images), torch.tensor(labels, dtype=torch.int64)), folder_set.classes

    train, classes = read(train_dir)
    test_dir = _split_folder(root, "test")
    if test_dir is not None:
        test, test_classes = read(test_dir)
        if test_classes != classes:
            only_train, only_test = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
            raise DatasetError("imagefolder: the train and test splits must have the same class folders; "
                               + "; ".join(f"only {split} has {_listed(names)}" for split, names in
                                           (("train", only_train), ("test", only_test)) if names))
        if test.x.shape[1:] != train.x.shape[1:]:
            raise DatasetError(f"imagefolder: test images are {tuple(test.x.shape[1:])} but training images "
                               f"{tuple(train.x.shape[1:])}; set data.image_size")
        return RawDataset(train, test, classes, tuple(notes))
    return RawDataset(*_test_cut(train), classes, tuple(notes))


TEST_FRACTION = 0.2  # of a dataset without a test split


def _test_cut(pool: Split) -> tuple[Split, Split]:
    """(train, test) of a dataset that comes without a test split: 20% of every class (at least one sample of each
    class with two or more) is the test split, drawn with a fixed seed so that it does not depend on base.seed."""
    train, test = stratified_split(pool.y, TEST_FRACTION, torch.Generator().manual_seed(0))
    return pool.subset(train), pool.subset(test)


def _fits_int64(values: np.ndarray) -> bool:
    """Whether an integer array converts to int64 unchanged (uint64 values from 2**63 up would wrap to negatives)."""
    return len(values) == 0 or int(values.max()) <= np.iinfo(np.int64).max


# how a user turns any labels (strings, gaps such as 3, 7, 9) into the class numbers 0..C-1 every loader needs
RENUMBER = "renumber them: classes, y = np.unique(y, return_inverse=True), and save class_names=classes"


def _npz_member(archive: Any, key: str, path: Path) -> Any:
    """Member ``key`` of an open npz ``archive``; DatasetError naming it when it holds Python objects, which numpy
    would have to unpickle (ballot does not)."""
    try:
        return archive[key]
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise
        raise DatasetError(f"npz: member '{key}' of '{path}' holds Python objects (dtype object), which ballot does "
                           "not unpickle; save it as a number or string array (names: np.array(names, dtype=str))") \
            from None


def _load_npz(cfg: DataConfig) -> RawDataset:
    """Arrays ``x``, ``y`` and optional ``group``, ``x_test``, ``y_test``, ``group_test``, ``class_names``."""
    if not cfg.path:
        raise DatasetError("dataset 'npz' needs data.path: a .npz file with arrays x and y")
    path = Path(cfg.path)
    if path.is_dir():
        raise DatasetError(f"npz: '{path}' is a folder; data.path must name an .npz file")
    if not path.is_file():
        raise DatasetError(f"npz: file '{path}' not found")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy file: one array
            raise DatasetError(f"npz: '{path}' holds a single array (.npy), not an .npz archive of named arrays "
                               "(x, y, ...; numpy.savez writes one)")
        with loaded as archive:
            arrays = {key: _npz_member(archive, key, path) for key in archive.files}
    except DatasetError:  # a RuntimeError too, already naming the problem
        raise
    # zipfile: RuntimeError (encrypted), NotImplementedError (a compression it lacks); numpy: MemoryError (a header
    # declaring a huge shape)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError, MemoryError) as error:
        raise DatasetError(f"npz: cannot read '{path}': {error or type(error).__name__}") from None
    not_arrays = sorted(key for key, value in arrays.items() if not isinstance(value, np.ndarray))
    if not_arrays:  # numpy hands back a member that is not in .npy format as raw bytes
        raise DatasetError(f"npz: member(s) {not_arrays} of '{path}' are not .npy arrays (write the file with "
                           "numpy.savez)")
    missing = {"x", "y"} - set(arrays)
    if missing:
        raise DatasetError(f"npz: '{path}' lacks array(s) {sorted(missing)}; it has {sorted(arrays)}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DatasetError(f"npz: '{path}' must hold both x_test and y_test, or neither")
    if "x_test" in arrays and ("group" in arrays) != ("group_test" in arrays):
        raise DatasetError(f"npz: '{path}' has x_test: give group and group_test together, or neither")

    def split(suffix: str) -> Split:
        x, y = arrays["x" + suffix], arrays["y" + suffix]
        if x.ndim < 2 or y.ndim != 1:
            raise DatasetError(f"npz: x{suffix} must have shape (samples, features...) and y{suffix} shape (samples,); "
                               f"got {x.shape} and {y.shape}")
        if len(x) == 0:
            raise DatasetError(f"npz: x{suffix} has no rows")
        if 0 in x.shape[1:]:
            raise DatasetError(f"npz: x{suffix} samples have shape {x.shape[1:]}: a dimension of size 0 holds no "
                               "features")
        if len(x) != len(y):
            raise DatasetError(f"npz: x{suffix} has {len(x)} rows but y{suffix} has {len(y)}")
        if not np.issubdtype(y.dtype, np.integer):
            whole = np.issubdtype(y.dtype, np.floating) and bool(np.all(np.isfinite(y) & (y == np.round(y))))
            mend = f"whole numbers stored as floats: y{suffix}.astype(np.int64)" if whole else RENUMBER
            raise DatasetError(f"npz: y{suffix} has dtype {y.dtype}; class labels must be integers 0..C-1 ({mend})")
        if y.min() < 0 or not _fits_int64(y):
            raise DatasetError(f"npz: y{suffix} must hold non-negative integer class labels (below 2**63)")
        if x.dtype != np.bool_ and not (np.issubdtype(x.dtype, np.number)
                                        and not np.issubdtype(x.dtype, np.complexfloating)):
            raise DatasetError(f"npz: x{suffix} must hold real numbers, not dtype {x.dtype}")
        with np.errstate(over="ignore"):
            values = x.astype(np.float32)
        if not np.isfinite(values).all():
            raise DatasetError(f"npz: x{suffix} must be finite in float32 (it holds NaN, inf or values beyond "
                               f"{np.finfo(np.float32).max:.3g})")
        group = arrays.get("group" + suffix)
        if group is not None and group.ndim != 1:
            raise DatasetError(f"npz: group{suffix} must have shape (samples,); got {group.shape}")
        if group is not None and len(group) != len(y):
            raise DatasetError(f"npz: group{suffix} has {len(group)} rows but y{suffix} has {len(y)}")
        if group is not None and not np.issubdtype(group.dtype, np.integer):
            raise DatasetError(f"npz: group{suffix} must hold integer attribute values, got dtype {group.dtype}")
        if group is not None and not _fits_int64(group):
            raise DatasetError(f"npz: group{suffix} holds values above 2**63 - 1 (int64's largest)")
        return Split(torch.from_numpy(values), torch.from_numpy(y.astype(np.int64)),
                     None if group is None else torch.from_numpy(group.astype(np.int64)))

    pool = split("")
    if len(pool) < 2 and "x_test" not in arrays:
        raise DatasetError(f"npz: '{path}' has {len(pool)} row; without x_test it needs two or more (a fifth "
                           "become the test split)")
    if "x_test" in arrays:
        train, test = pool, split("_test")
        if test.x.shape[1:] != train.x.shape[1:]:
            raise DatasetError(f"npz: x_test samples have shape {tuple(test.x.shape[1:])} but x samples "
                               f"{tuple(train.x.shape[1:])}")
    else:
        train, test = _test_cut(pool)
    labels = torch.cat([train.y, test.y])
    num_classes = int(labels.max()) + 1
    if num_classes > len(labels):  # some label is missing from 0..max; check_labels names which, if there are few
        raise DatasetError(f"npz: labels go up to {num_classes - 1} but there are {len(labels)} samples; labels "
                           f"must number the classes 0..C-1 ({RENUMBER})")
    if "class_names" in arrays and arrays["class_names"].ndim != 1:
        raise DatasetError(f"npz: class_names must be a list (shape (classes,)), got shape "
                           f"{arrays['class_names'].shape}")
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise DatasetError(f"npz: class_names has {len(names)} entries but the labels number {num_classes} classes "
                           f"(0..{num_classes - 1})")
    if len(set(names)) < len(names):
        raise DatasetError(f"npz: class_names repeats {sorted({n for n in names if names.count(n) > 1})[:5]}; each "
                           "class needs its own name")
    return RawDataset(train, test, names)


DATASETS: dict[str, Callable[[DataConfig], RawDataset]] = {
    "fashion-mnist": _load_fashion_mnist,
    "digits": _load_digits,
    "cifar10": lambda cfg: _load_cifar(cfg, 10),
    "cifar100": lambda cfg: _load_cifar(cfg, 100),
    "imagefolder": _load_imagefolder,
    "npz": _load_npz,
}


COLOUR_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def layout_notice(input_shape: tuple[int, ...]) -> str | None:
    """A note when image inputs look channels-last ((H, W, C) where (C, H, W) is expected: an npz written from
    numpy or PIL images), else None."""
    if len(input_shape) == 3 and input_shape[-1] in COLOUR_CHANNELS and input_shape[0] not in COLOUR_CHANNELS:
        return (f"note: inputs of shape {input_shape} are read as {input_shape[0]} channels of "
                f"{input_shape[1]}x{input_shape[2]}; if the last axis holds the colour channels, store x "
                "channels-first (numpy: x.transpose(0, 3, 1, 2))")
    return None


def dataset_loader(name: str) -> Callable[[DataConfig], RawDataset]:
    """The registered loader for ``name``; DatasetError listing the choices otherwise."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset '{name}'; choose from {sorted(DATASETS)}")
    return DATASETS[name]


def long_tail_index(y: torch.Tensor, num_classes: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a long-tailed subsample: class c keeps n_max * ratio^(-c/(C-1)) samples, at least two (as many as it
    has when fewer), so that the stratified split can give it a training and a validation sample.

    ``n_max`` is the size of the smallest class, so every class can supply its quota; the order of
    classes (largest first) is the label order, as in the CIFAR-LT convention.
    """
    counts = torch.bincount(y, minlength=num_classes)
    n_max = int(counts[counts > 0].min())
    keep = []
    for c in range(num_classes):
        members = torch.nonzero(y == c).flatten()
        if len(members) == 0:
            continue
        quota = max(2, int(n_max * ratio ** (-c / max(num_classes - 1, 1))))  # 2: one for training, one for val
        keep.append(members[torch.randperm(len(members), generator=generator)[:quota]])
    return torch.sort(torch.cat(keep)).values


def stratified_split(y: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices with ``fraction`` of every class in val (at least one sample where possible)."""
    train, val = [], []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(val)).values


def _listed(labels: list[Any], limit: int = 5) -> str:
    shown = ", ".join(map(str, labels[:limit]))
    return f"{shown}, ... ({len(labels)} in all)" if len(labels) > limit else shown


def _absent_classes(y: torch.Tensor, num_classes: int) -> list[int]:
    """The classes 0..num_classes-1 with no sample in ``y``, in order."""
    present = set(torch.unique(y).tolist())
    return [c for c in range(num_classes) if c not in present]


def check_labels(raw: RawDataset, name: str) -> None:
    """DatasetError unless the training split has every class 0..C-1 (C >= 2) and the test split no other."""
    seen = set(torch.unique(raw.train.y).tolist())
    if len(seen) < 2:
        raise DatasetError(f"{name}: the training data holds {len(seen)} class(es); a classifier needs two or more")
    unseen = sorted(set(torch.unique(raw.test.y).tolist()) - seen)
    if unseen:
        raise DatasetError(f"{name}: test labels {_listed(unseen)} never occur in the training data")
    beyond = sorted({label for split in (raw.train, raw.test) for label in torch.unique(split.y).tolist()
                     if label >= len(raw.class_names)})
    if beyond:
        raise DatasetError(f"{name}: labels {_listed(beyond)} are beyond the {len(raw.class_names)} classes "
                           f"(0..{len(raw.class_names) - 1}) the dataset names")
    absent = _absent_classes(raw.train.y, len(raw.class_names))
    if absent:
        raise DatasetError(f"{name}: labels must number the classes 0..{len(raw.class_names) - 1} with each present in "
                           f"training; absent: {_listed(absent)} ({RENUMBER})")


def load_data(name: str, cfg: DataConfig | None = None, seed: int = 0) -> DataBundle:
    """Load dataset ``name`` and carve a seeded validation split (after optional long-tail subsampling). Under
    torch.distributed the processes load (and download) in turns, rank 0 first (``distributed.in_turns``)."""
    cfg = cfg or DataConfig()
    raw = distributed.in_turns(lambda: dataset_loader(name)(cfg))
    check_labels(raw, name)
    num_classes = len(raw.class_names)
    generator = torch.Generator().manual_seed(seed)
    pool_index = torch.arange(len(raw.train))
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(pool_index):
        pool_index = torch.sort(torch.randperm(len(pool_index), generator=generator)[: cfg.max_train_samples]).values
        absent = _absent_classes(raw.train.y[pool_index], num_classes)
        if absent:
            raise DatasetError(f"{name}: data.max_train_samples={cfg.max_train_samples} leaves class(es) "
                               f"{_listed(absent)} without a training sample; raise the cap")
    if cfg.imbalance_ratio > 1.0:
        pool_index = pool_index[long_tail_index(raw.train.y[pool_index], num_classes, cfg.imbalance_ratio, generator)]
    train_pos, val_pos = stratified_split(raw.train.y[pool_index], cfg.val_fraction, generator)
    train_index, val_index = pool_index[train_pos], pool_index[val_pos]
    test = raw.test
    if cfg.max_test_samples is not None and cfg.max_test_samples < len(test):
        test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: cfg.max_test_samples])
    notes = raw.notes
    unseen = _absent_classes(raw.train.y[val_index], num_classes) if len(val_index) else []
    if unseen:
        notes += (f"note: class(es) {_listed([raw.class_names[c] for c in unseen])} have no validation sample (too "
                  "few samples to split): validation does not measure them, and Ballot's class weights give them the "
                  "balanced accuracy",)
    return DataBundle(raw.train.subset(train_index), raw.train.subset(val_index), test,
                      raw.class_names, train_index, val_index, notes)

