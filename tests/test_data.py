import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ballot.config import DataConfig, ExperimentConfig
from ballot.data import DEBIAN_FASHION_DIR, load_data, long_tail_index, stratified_split
from ballot.errors import DatasetError
from ballot.experiment import notices_before_training


def _write_npz(path: Path, n: int = 200, with_test: bool = True, **extra) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"x": rng.random((n, 6)).astype(np.float32), "y": rng.integers(0, 3, n), "group": rng.integers(0, 2, n)}
    if with_test:
        arrays.update(x_test=rng.random((50, 6)).astype(np.float32), y_test=rng.integers(0, 3, 50),
                      group_test=rng.integers(0, 2, 50))
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def test_npz_with_groups_and_test_split(tmp_path):
    path = _write_npz(tmp_path / "d.npz")
    data = load_data("npz", DataConfig(path=str(path), val_fraction=0.2), seed=0)
    assert data.input_shape == (6,) and data.num_classes == 3
    assert len(data.train) + len(data.val) == 200 and len(data.test) == 50
    assert data.test.group is not None and data.train.group is not None
    assert set(data.train_index.tolist()).isdisjoint(data.val_index.tolist())


def test_npz_without_test_arrays_holds_out_a_fifth_of_every_class(tmp_path):
    path = _write_npz(tmp_path / "d.npz", with_test=False)
    data = load_data("npz", DataConfig(path=str(path)))
    counts = np.bincount(np.load(path)["y"], minlength=3)
    assert torch.bincount(data.test.y, minlength=3).tolist() == [round(0.2 * n) for n in counts]
    assert len(data.train) + len(data.val) + len(data.test) == 200
    assert load_data("npz", DataConfig(path=str(path)), seed=1).test.y.tolist() == data.test.y.tolist(), \
        "the test cut does not depend on base.seed"


def test_a_rare_class_of_an_npz_without_test_arrays_stays_in_training(tmp_path):
    """Three samples of class 2 that a plain random cut would all send to test."""
    y = np.array([2, 0, 1, 0, 2, 2] + [0, 1] * 98)
    path = tmp_path / "rare.npz"
    np.savez(path, x=np.random.default_rng(0).random((len(y), 4)), y=y)
    data = load_data("npz", DataConfig(path=str(path), val_fraction=0.3))
    assert (data.train.y == 2).sum() == 1 and (data.val.y == 2).sum() == 1 and (data.test.y == 2).sum() == 1


@pytest.mark.parametrize("extra, message", [
    ({"y": np.zeros(3, dtype=np.int64)}, "x has 200 rows but y has 3"),
    ({"y": np.full(200, -1)}, "non-negative integer"),
    ({"x": np.full((200, 6), np.nan)}, "finite"),
    ({"x": np.zeros((200, 6), dtype="U1")}, "numbers, not dtype <U1"),
])
def test_malformed_npz_is_named(tmp_path, extra, message):
    path = _write_npz(tmp_path / "d.npz", with_test=False, **extra)
    with pytest.raises(DatasetError, match=message):
        load_data("npz", DataConfig(path=str(path)))


def test_missing_npz_and_pickled_npz_are_rejected(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_data("npz", DataConfig(path=str(tmp_path / "absent.npz")))
    pickled = tmp_path / "p.npz"
    np.savez(pickled, x=np.array([object()] * 4, dtype=object), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(DatasetError, match="^npz: member .x. of .* holds Python objects .dtype object., which ballot does not unpickle"):
        load_data("npz", DataConfig(path=str(pickled)))


def test_digits_split_is_seeded_and_stratified():
    a, b = load_data("digits", seed=0), load_data("digits", seed=0)
    c = load_data("digits", seed=1)
    assert torch.equal(a.val_index, b.val_index) and not torch.equal(a.val_index, c.val_index)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert float(a.train.x.min()) >= 0 and float(a.train.x.max()) <= 1
    assert set(a.val.y.tolist()) == set(range(10))
    # stratified: each class holds round(val_fraction (0.1) x its pool size) of the validation split
    pool = torch.bincount(torch.cat([a.train.y, a.val.y]), minlength=10).tolist()
    assert torch.bincount(a.val.y, minlength=10).tolist() == [round(0.1 * n) for n in pool]


def test_long_tail_sizes_decay_geometrically():
    y = torch.arange(10).repeat_interleave(100)
    index = long_tail_index(y, 10, ratio=10.0, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(y[index], minlength=10).tolist()
    assert counts == [int(100 * 10.0 ** (-c / 9)) for c in range(10)]  # n_max * ratio^(-c/(C-1)), floored
    assert counts == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]


def test_long_tail_applies_to_training_pool_only():
    flat = load_data("digits", DataConfig(), seed=0)
    tail = load_data("digits", DataConfig(imbalance_ratio=5.0), seed=0)
    assert torch.equal(flat.test.y, tail.test.y)
    counts = torch.bincount(torch.cat([tail.train.y, tail.val.y]), minlength=10)
    assert counts[0] >= 4 * counts[9]


def test_stratified_split_puts_every_class_in_validation():
    y = torch.tensor([0] * 50 + [1] * 5 + [2] * 2)
    train, val = stratified_split(y, 0.1, torch.Generator().manual_seed(0))
    assert set(y[val].tolist()) == {0, 1, 2} and len(train) + len(val) == len(y)


def test_unknown_dataset_lists_choices():
    with pytest.raises(DatasetError, match="unknown dataset 'mnist2'.*fashion-mnist"):
        load_data("mnist2")


def test_missing_imagefolder_path_is_named(tmp_path):
    with pytest.raises(DatasetError, match="needs data.path"):
        load_data("imagefolder", DataConfig())
    with pytest.raises(DatasetError, match="not a folder"):
        load_data("imagefolder", DataConfig(path=str(tmp_path / "absent")))


def _write_imagefolder(root, images: dict[str, tuple[int, tuple[int, int]]]) -> None:
    """root/<split>/{cat,dog}/<i>.png: images[split] = (images per class, (height, width)), random RGB pixels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, (count, (height, width)) in images.items():
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_imagefolder_reads_class_folders(tmp_path):
    _write_imagefolder(tmp_path, {"train": (6, (10, 12)), "test": (2, (10, 12))})
    data = load_data("imagefolder", DataConfig(path=str(tmp_path), image_size=8, val_fraction=0.2))
    assert data.class_names == ["cat", "dog"] and data.input_shape == (3, 8, 8)
    assert len(data.test) == 4 and len(data.train) + len(data.val) == 12


def test_imagefolder_reads_gifs_and_notes_the_files_it_skips(tmp_path):
    from PIL import Image

    _write_imagefolder(tmp_path, {"train": (3, (8, 8))})
    colour = np.zeros((8, 8, 3), dtype=np.uint8)
    colour[..., 1] = 200
    Image.fromarray(colour).save(tmp_path / "train" / "cat" / "green.gif")
    for name in ("cat/labels.txt", "dog/labels.txt", "dog/shape.svg", "readme.md", "dog/.DS_Store"):
        (tmp_path / "train" / name).write_text("not an image")
    data = load_data("imagefolder", DataConfig(path=str(tmp_path), val_fraction=0.2))
    assert len(data.train) + len(data.val) + len(data.test) == 7
    pool = torch.cat([data.train.x, data.val.x, data.test.x])
    assert any(torch.allclose(x, torch.tensor([0.0, 200 / 255, 0.0]).view(3, 1, 1).expand(3, 8, 8)) for x in pool)
    assert data.notes == (f"note: imagefolder '{tmp_path / 'train'}': skipped 3 files of other types (.svg: 1, .txt: 2); "
                          "1 files outside the class folders (images: .bmp .gif .jpeg .jpg .pgm .png .ppm .tif .tiff "
                          ".webp)",)
    assert load_data("digits", DataConfig()).notes == ()
    assert notices_before_training(ExperimentConfig(), data)[0] == data.notes[0], "a run prints it before training"
    for path in (tmp_path / "train" / "dog").glob("*.png"):
        path.unlink()
    with pytest.raises(DatasetError, match=re.escape("no valid file for the classes dog. (images: .bmp .gif")):
        load_data("imagefolder", DataConfig(path=str(tmp_path)))


def test_imagefolder_splits_with_other_class_folders_name_the_difference(tmp_path):
    _write_imagefolder(tmp_path, {"train": (3, (8, 8)), "test": (3, (8, 8))})
    for image in (tmp_path / "test" / "dog").iterdir():
        image.unlink()
    (tmp_path / "test" / "dog").rmdir()
    with pytest.raises(DatasetError, match="must have the same class folders; only train has dog$"):
        load_data("imagefolder", DataConfig(path=str(tmp_path)))


def test_imagefolder_test_images_of_another_size_are_refused(tmp_path):
    _write_imagefolder(tmp_path, {"train": (3, (8, 8)), "test": (3, (10, 10))})
    with pytest.raises(DatasetError, match=re.escape("test images are (3, 10, 10) but training images (3, 8, 8); "
                                                     "set data.image_size")):
        load_data("imagefolder", DataConfig(path=str(tmp_path)))
    assert load_data("imagefolder", DataConfig(path=str(tmp_path), image_size=8)).test.x.shape[1:] == (3, 8, 8)


def test_a_cap_that_leaves_a_class_without_training_samples_is_refused():
    with pytest.raises(DatasetError, match=re.escape("digits: data.max_train_samples=5 leaves class(es)")):
        load_data("digits", DataConfig(max_train_samples=5))
    assert load_data("digits", DataConfig(max_train_samples=200)).num_classes == 10


def test_cifar_without_files_or_network_gives_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="CIFAR-10 is not in"):
        load_data("cifar10", DataConfig(root=str(tmp_path), download=False))


@pytest.mark.skipif(not DEBIAN_FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package():
    data = load_data("fashion-mnist", DataConfig(max_test_samples=100), seed=0)
    assert len(data.train) + len(data.val) == 60000 and len(data.test) == 100
    assert data.input_shape == (1, 28, 28) and data.class_names[0] == "T-shirt/top"
    assert len(data.val) == 6000


def test_fashion_mnist_reads_an_explicit_root(tmp_path):
    import gzip

    def idx(body: np.ndarray, path: Path) -> None:
        header = bytes([0, 0, 8, body.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in body.shape)
        with gzip.open(path, "wb") as handle:
            handle.write(header + body.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        idx(rng.integers(0, 255, (n, 28, 28)), tmp_path / f"{prefix}-images-idx3-ubyte.gz")
        idx(np.arange(n) % 10, tmp_path / f"{prefix}-labels-idx1-ubyte.gz")
    data = load_data("fashion-mnist", DataConfig(root=str(tmp_path), val_fraction=0.25))
    assert len(data.test) == 10 and len(data.train) + len(data.val) == 40

    images = tmp_path / "train-images-idx3-ubyte.gz"
    whole = images.read_bytes()
    images.write_bytes(whole[:len(whole) // 2])  # an interrupted download
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz: cannot be read .*delete it"):
        load_data("fashion-mnist", DataConfig(root=str(tmp_path)))
    images.write_bytes(whole)

    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x0a\x01"))
    with pytest.raises(DatasetError, match="truncated"):
        load_data("fashion-mnist", DataConfig(root=str(tmp_path)))


def test_npz_group_must_be_integer(tmp_path):
    path = _write_npz(tmp_path / "d.npz", with_test=False, group=np.full(200, 0.5))
    with pytest.raises(DatasetError, match="group must hold integer"):
        load_data("npz", DataConfig(path=str(path)))


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((0, 4)), "y": np.zeros(0, dtype=np.int64)}, "npz: x has no rows"),
    ({"x": np.zeros(10), "y": np.zeros(10, dtype=np.int64)}, "npz: x must have shape (samples, features...)"),
    ({"x": np.zeros((10, 4)), "y": np.zeros((10, 2), dtype=np.int64)}, "and y shape (samples,)"),
    ({"x": np.zeros((10, 4)), "y": np.zeros(10, dtype=np.int64)}, "holds 1 class(es); a classifier needs two"),
    ({"x": np.zeros((10, 4)), "y": np.array([0, 1] * 4 + [5, 6])}, "absent: 2, 3, 4"),
    ({"x": np.zeros((10, 4)), "y": np.array([0, 1] * 4 + [2**31 - 1, 1])},
     "npz: labels go up to 2147483647 but there are 10 samples"),
    ({"x": np.zeros((10, 4), dtype=np.complex64), "y": np.array([0, 1] * 5)}, "x must hold real numbers"),
    ({"x": np.full((10, 4), 1e300), "y": np.array([0, 1] * 5)}, "x must be finite in float32"),
    ({"x": np.zeros((10, 4)), "y": np.array([0, 1] * 5), "class_names": np.array("a,b")},
     "class_names must be a list (shape (classes,)), got shape ()"),
    ({"x": np.zeros((1, 4)), "y": np.array([0])}, "has 1 row; without x_test it needs two or more"),
    ({"x": np.zeros((10, 4)), "y": np.array([0, 1] * 5), "x_test": np.zeros((2, 4)), "y_test": np.array([0, 2])},
     "test labels 2 never occur in the training data"),
    ({"x": np.zeros((10, 3, 8, 8)), "y": np.array([0, 1] * 5), "x_test": np.zeros((2, 1, 8, 8)),
      "y_test": np.array([0, 1])}, "npz: x_test samples have shape (1, 8, 8) but x samples (3, 8, 8)"),
    ({"x": np.zeros((10, 4)), "y": np.array([0, 1] * 5), "group": np.zeros((10, 2), dtype=np.int64)},
     "npz: group must have shape (samples,); got (10, 2)"),
])
def test_malformed_npz_data_is_refused_with_its_reason(tmp_path, arrays, message):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_data("npz", DataConfig(path=str(path)))


RENUMBER = "(renumber them: classes, y = np.unique(y, return_inverse=True), and save class_names=classes)"


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.array([0.0, 1.0] * 5)}, "npz: y has dtype float64; class labels must be integers 0..C-1 (whole numbers "
                                      "stored as floats: y.astype(np.int64))"),
    ({"y": np.array([0.5, 1.0] * 5)}, f"npz: y has dtype float64; class labels must be integers 0..C-1 {RENUMBER}"),
    ({"y": np.array(["cat", "dog"] * 5)}, f"npz: y has dtype <U3; class labels must be integers 0..C-1 {RENUMBER}"),
    ({"y": np.array([0, 1] * 5), "class_names": np.array(["a", "b"], dtype=object)},
     "npz: member 'class_names' of"),
    ({"y": np.array([3, 7, 9, 3, 7, 9, 3, 7, 9, 3])}, f"npz: labels must number the classes 0..9 with each present in "
                                                    f"training; absent: 0, 1, 2, 4, 5, ... (7 in all) {RENUMBER}"),
])
def test_npz_refusals_say_how_to_mend_the_file(tmp_path, arrays, message):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.zeros((10, 4)), **arrays)
    with pytest.raises(DatasetError, match="^" + re.escape(message)):
        load_data("npz", DataConfig(path=str(path)))


def test_boolean_npz_inputs_are_read_as_zeros_and_ones(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.eye(10, 4, dtype=bool), y=np.array([0, 1] * 5))
    data = load_data("npz", DataConfig(path=str(path)))
    assert torch.cat([data.train.x, data.val.x, data.test.x]).sum() == 4


def test_a_class_without_a_validation_sample_is_noted(tmp_path):
    path = tmp_path / "data.npz"
    y = np.array([0, 1] * 20 + [2])  # class 2 has a single sample, which training keeps
    np.savez(path, x=np.random.default_rng(0).normal(size=(41, 4)), y=y, x_test=np.zeros((3, 4)),
             y_test=np.array([0, 1, 2]), class_names=np.array(["a", "b", "rare"]))
    data = load_data("npz", DataConfig(path=str(path), val_fraction=0.2))
    assert 2 not in data.val.y.tolist()
    assert [note for note in data.notes if "validation" in note] == [
        "note: class(es) rare have no validation sample (too few samples to split): validation does not measure "
        "them, and Ballot's class weights give them the balanced accuracy"]
    np.savez(path, x=np.zeros((40, 4)), y=y[:40])
    assert load_data("npz", DataConfig(path=str(path), val_fraction=0.2)).notes == ()


def test_channels_last_images_that_do_not_fit_the_model_are_refused_with_the_layout_hint(tmp_path):
    from ballot.errors import ModelError
    from ballot.experiment import check_fits

    path = tmp_path / "data.npz"
    np.savez(path, x=np.zeros((20, 16, 16, 3), dtype=np.float32), y=np.array([0, 1] * 10))
    cfg = ExperimentConfig()
    cfg.base.dataset, cfg.base.model, cfg.data.path = "npz", "cnn", str(path)
    with pytest.raises(ModelError, match=re.escape("needs images of at least 4x4 pixels") + ".*"
                       + re.escape("store x channels-first (numpy: x.transpose(0, 3, 1, 2))")):
        check_fits(cfg, load_data("npz", cfg.data))


@pytest.mark.parametrize("content", [b"", b"\x00\xffnot a zip archive at all"])
def test_an_npz_file_that_is_not_an_archive_is_named(tmp_path, content):
    path = tmp_path / "broken.npz"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match="npz: cannot read"):
        load_data("npz", DataConfig(path=str(path)))


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.array([0, 1] * 4 + [2**63, 1], dtype=np.uint64)}, "npz: y must hold non-negative integer class labels"),
    ({"y": np.full(10, 2**63 + 5, dtype=np.uint64)}, "npz: y must hold non-negative integer class labels"),
    ({"y": np.array([0, 1] * 5), "group": np.full(10, 2**63, dtype=np.uint64)},
     "npz: group holds values above 2**63 - 1 (int64's largest)"),
])
def test_uint64_values_that_would_wrap_to_negatives_are_refused(tmp_path, arrays, message):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.zeros((10, 4)), **arrays)
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_data("npz", DataConfig(path=str(path)))
    np.savez(path, x=np.zeros((10, 4)), y=np.array([0, 1] * 5, dtype=np.uint64))  # uint64 labels that fit are fine
    assert load_data("npz", DataConfig(path=str(path))).num_classes == 2


def test_an_npy_file_is_named(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((10, 4)))
    with pytest.raises(DatasetError, match=re.escape(f"npz: '{path}' holds a single array (.npy), not an .npz")):
        load_data("npz", DataConfig(path=str(path)))


@pytest.mark.parametrize("damage, reason", [
    (lambda data: b"", "not an image file PIL can identify"),
    (lambda data: b"nonsense" * 10, "not an image file PIL can identify"),
    (lambda data: data[: len(data) // 2], "image file is truncated"),
])
def test_an_unreadable_image_is_named(tmp_path, damage, reason):
    _write_imagefolder(tmp_path, {"train": (3, (8, 8))})
    bad = tmp_path / "train" / "dog" / "1.png"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(DatasetError, match=re.escape(f"imagefolder: cannot read image '{bad}': {reason}")):
        load_data("imagefolder", DataConfig(path=str(tmp_path)))


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((10, 0)), "y": np.array([0, 1] * 5)}, "npz: x samples have shape (0,): a dimension of size 0"),
    ({"x": np.zeros((10, 4)), "y": np.array([0, 1] * 5), "class_names": np.array(["a", "b", "c"])},
     "npz: class_names has 3 entries but the labels number 2 classes (0..1)"),
    ({"x": np.zeros((10, 4)), "y": np.array([0, 1] * 5), "class_names": np.array(["a", "a"])},
     "npz: class_names repeats ['a']"),
    ({"x": np.zeros((10, 4)), "y": np.array([0, 1] * 5), "group": np.zeros(10, dtype=np.int64),
      "x_test": np.zeros((2, 4)), "y_test": np.array([0, 1])}, "give group and group_test together, or neither"),
])
def test_more_malformed_npz_data_is_refused_with_its_reason(tmp_path, arrays, message):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_data("npz", DataConfig(path=str(path)))


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, body in members.items():
            archive.writestr(name, body)
    return path


def test_npz_members_that_are_not_arrays_and_unreadable_archives_are_named(tmp_path):
    import io
    import zipfile

    path = _zip(tmp_path / "g.npz", {"x.npy": b"garbage", "y.npy": b"junk"})
    with pytest.raises(DatasetError, match=re.escape(f"npz: member(s) ['x', 'y'] of '{path}' are not .npy arrays")):
        load_data("npz", DataConfig(path=str(path)))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
    huge = _zip(tmp_path / "huge.npz", {"x.npy": header.getvalue() + bytes(64), "y.npy": b""})
    with pytest.raises(DatasetError, match="npz: cannot read"):
        load_data("npz", DataConfig(path=str(huge)))
    deflated = tmp_path / "deflate64.npz"
    np.savez_compressed(deflated, x=np.zeros((10, 4)), y=np.array([0, 1] * 5))
    body = bytearray(deflated.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local and central headers: method 9
        start = 0
        while (start := body.find(signature, start)) >= 0:
            body[start + offset] = 9
            start += 4
    deflated.write_bytes(bytes(body))
    assert zipfile.is_zipfile(deflated)
    with pytest.raises(DatasetError, match="npz: cannot read .*compression method"):
        load_data("npz", DataConfig(path=str(deflated)))
    with pytest.raises(DatasetError, match="is a folder; data.path must name an .npz file"):
        load_data("npz", DataConfig(path=str(tmp_path)))


def test_inputs_too_large_to_standardise_in_float32_are_refused(tmp_path):
    y = np.repeat(np.arange(3), 40)
    x = (np.random.default_rng(0).normal(size=(120, 8)) + y[:, None]) * 1e37
    path = tmp_path / "big.npz"
    np.savez(path, x=x, y=y)
    data = load_data("npz", DataConfig(path=str(path)))
    with pytest.raises(DatasetError, match="too large to standardise in float32; rescale them"):
        data.input_stats()
    np.savez(path, x=x / 1e37, y=y)
    mean, std = load_data("npz", DataConfig(path=str(path))).input_stats()
    assert mean.isfinite().all() and std.isfinite().all()


def test_labels_beyond_the_named_classes_are_refused(tmp_path):
    import gzip

    def idx(body: np.ndarray, path: Path) -> None:
        header = bytes([0, 0, 8, body.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in body.shape)
        with gzip.open(path, "wb") as handle:
            handle.write(header + body.astype(np.uint8).tobytes())

    for prefix, labels in (("train", np.arange(44) % 11), ("t10k", np.arange(10))):
        idx(np.zeros((len(labels), 28, 28)), tmp_path / f"{prefix}-images-idx3-ubyte.gz")
        idx(labels, tmp_path / f"{prefix}-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetError, match=re.escape("fashion-mnist: labels 10 are beyond the 10 classes (0..9)")):
        load_data("fashion-mnist", DataConfig(root=str(tmp_path)))


def test_a_class_of_one_sample_after_the_long_tail_keeps_a_validation_sample():
    y = torch.repeat_interleave(torch.arange(3), 40)
    kept = long_tail_index(y, 3, 100.0, torch.Generator().manual_seed(0))
    assert torch.bincount(y[kept], minlength=3).tolist() == [40, 4, 2]
    train, val = stratified_split(y[kept], 0.1, torch.Generator().manual_seed(0))
    assert torch.bincount(y[kept][val], minlength=3).min() >= 1


@pytest.mark.parametrize("damage, reason", [
    (lambda data: data[:11] + b"\x00" + data[12:], "Truncated IHDR chunk"),
    (lambda data: data[:36] + b"\x00" + data[37:], "broken PNG file"),
])
def test_a_corrupt_image_header_is_named(tmp_path, damage, reason):
    _write_imagefolder(tmp_path, {"train": (3, (8, 8))})
    bad = tmp_path / "train" / "dog" / "1.png"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(DatasetError, match=re.escape(f"imagefolder: cannot read image '{bad}': ") + ".*" + reason):
        load_data("imagefolder", DataConfig(path=str(tmp_path)))


def test_a_decompression_bomb_image_is_named(tmp_path):
    from PIL import Image

    _write_imagefolder(tmp_path, {"train": (3, (8, 8))})
    Image.new("1", (15000, 15000)).save(tmp_path / "train" / "cat" / "big.png")
    with pytest.raises(DatasetError, match="imagefolder: cannot read image .*big.png.*decompression bomb"):
        load_data("imagefolder", DataConfig(path=str(tmp_path)))


def test_imagefolder_scales_16_bit_grey_levels_and_skips_hidden_folders(tmp_path):
    from PIL import Image

    for split, count in (("Train", 4), ("Test", 2)):  # split folders in any letter case
        for name, level in (("dark", 10000), ("bright", 50000)):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((8, 8), level, dtype=np.uint16)).save(folder / f"{i}.png")
    hidden = tmp_path / "Train" / ".ipynb_checkpoints"
    hidden.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(hidden / "0.png")
    data = load_data("imagefolder", DataConfig(path=str(tmp_path), val_fraction=0.25))
    assert data.class_names == ["bright", "dark"] and len(data.test) == 4
    levels = {data.class_names[label]: float(x.mean()) for x, label in zip(data.train.x, data.train.y.tolist())}
    assert levels == pytest.approx({"bright": round(50000 / 65535 * 255) / 255, "dark": round(10000 / 65535 * 255) / 255})


@pytest.mark.parametrize("levels, expected", [
    (np.full((8, 8), 40000, dtype=np.int32), round(40000 / 65535 * 255) / 255),  # PIL mode I, within 16 bits
    (np.full((8, 8), 0.5, dtype=np.float32), round(0.5 * 255) / 255),  # PIL mode F, within [0, 1]
    (np.full((8, 8), 70000, dtype=np.int32), "I-mode grey levels span [70000, 70000], beyond the [0, 65535]"),
    (np.full((8, 8), -0.5, dtype=np.float32), "F-mode grey levels span [-0.5, -0.5], beyond the [0, 1]"),
])
def test_wide_grey_levels_are_scaled_or_refused_never_clipped(tmp_path, levels, expected):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(levels).save(tmp_path / "train" / name / f"{i}.tif")
    if isinstance(expected, str):
        with pytest.raises(DatasetError, match=r"cannot read image .*0\.tif': its " + re.escape(expected)):
            load_data("imagefolder", DataConfig(path=str(tmp_path)))
    else:
        data = load_data("imagefolder", DataConfig(path=str(tmp_path)))
        assert torch.cat([data.train.x, data.val.x, data.test.x]).unique().tolist() == pytest.approx([expected])


def test_channels_last_images_get_a_note():
    from ballot.data import layout_notice

    assert "store x channels-first" in layout_notice((32, 32, 3))
    assert layout_notice((3, 32, 32)) is None and layout_notice((1, 28, 28)) is None and layout_notice((64,)) is None


def test_two_folders_for_one_split_are_refused(tmp_path):
    _write_imagefolder(tmp_path, {"train": (3, (8, 8)), "Training": (3, (8, 8))})
    with pytest.raises(DatasetError, match=re.escape(f"imagefolder: '{tmp_path}' has 2 train folders (Training, "
                                                     "train); keep one")):
        load_data("imagefolder", DataConfig(path=str(tmp_path)))
