"""CIFAR archives, both published versions, written here in their documented layouts."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ballot import cifar
from ballot.config import DataConfig
from ballot.data import load_data
from ballot.errors import DatasetError

IMAGES = 12  # per batch file


def _batch(rng: np.random.Generator, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pixels = rng.integers(0, 256, (IMAGES, cifar.PIXELS), dtype=np.uint8)
    return pixels, rng.integers(0, num_classes, IMAGES), rng.integers(0, 20, IMAGES)


def _write_python(root: Path, num_classes: int, protocol: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The python version as Python 3 pickles it: byte-string keys, a uint8 array, labels as a list of ints."""
    layout = cifar.PYTHON[num_classes]
    folder = root / layout.folder
    folder.mkdir(parents=True)
    rng, written = np.random.default_rng(num_classes), {}
    for name in (*layout.train, layout.test):
        pixels, labels, _ = _batch(rng, num_classes)
        entry = {b"data": pixels, cifar.LABEL_KEY[num_classes].encode(): [int(y) for y in labels],
                 b"filenames": [b"img.png"] * IMAGES}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))
        written[name] = pixels, labels
    names = [f"class {i}".encode() for i in range(num_classes)]
    (folder / layout.names).write_bytes(pickle.dumps({cifar.NAMES_KEY[num_classes].encode(): names}, protocol=protocol))
    return written


def _write_binary(root: Path, num_classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The binary version: per image a label byte (CIFAR-100: coarse, then fine) and 3,072 pixel bytes."""
    layout = cifar.BINARY[num_classes]
    folder = root / layout.folder
    folder.mkdir(parents=True)
    rng, written = np.random.default_rng(num_classes + 1), {}
    for name in (*layout.train, layout.test):
        pixels, labels, coarse = _batch(rng, num_classes)
        label_columns = [labels] if num_classes == 10 else [coarse, labels]
        rows = np.column_stack([*label_columns, pixels]).astype(np.uint8)
        (folder / name).write_bytes(rows.tobytes())
        written[name] = pixels, labels
    (folder / layout.names).write_text("".join(f"class {i}\n" for i in range(num_classes)) + "\n")
    return written


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("version", ["binary", "python protocol 2", "python protocol 4"])
def test_both_versions_read_back_every_pixel_and_label(tmp_path, num_classes, version):
    written = (_write_binary(tmp_path, num_classes) if version == "binary"
               else _write_python(tmp_path, num_classes, int(version[-1])))
    found = cifar.find(tmp_path, num_classes)
    assert found is not None and found[2] == (version == "binary")
    (train_x, train_y), (test_x, test_y), names = cifar.read(*found, num_classes)
    layout = found[1]
    expected_train = [written[name] for name in layout.train]
    assert np.array_equal(train_x.reshape(len(train_x), -1), np.concatenate([p for p, _ in expected_train]))
    assert np.array_equal(train_y, np.concatenate([y for _, y in expected_train]))
    assert np.array_equal(test_x.reshape(len(test_x), -1), written[layout.test][0])
    assert np.array_equal(test_y, written[layout.test][1])
    assert train_x.shape[1:] == (3, 32, 32) and names == [f"class {i}" for i in range(num_classes)]


def test_load_data_scales_channel_major_pixels_and_prefers_the_binary_version(tmp_path):
    binary = _write_binary(tmp_path, 10)
    _write_python(tmp_path, 10, protocol=2)
    data = load_data("cifar10", DataConfig(root=str(tmp_path), download=False, val_fraction=0.25))
    assert data.input_shape == (3, 32, 32) and len(data.train) + len(data.val) == 5 * IMAGES
    pixels, labels = binary["test_batch.bin"]
    assert np.array_equal(data.test.y.numpy(), labels)
    assert np.allclose(data.test.x.numpy(), pixels.reshape(-1, 3, 32, 32) / 255.0)
    assert float(data.test.x[0, 1, 0, 0]) == pytest.approx(pixels[0, 1024] / 255.0), "green plane starts at byte 1024"


def test_a_pickle_that_calls_a_function_is_refused_without_running_it(tmp_path):
    _write_python(tmp_path, 10, protocol=2)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / cifar.PYTHON[10].folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Payload()}))
    with pytest.raises(DatasetError, match=r"data_batch_3' is not a CIFAR python batch: it names pathlib.*Path"):
        load_data("cifar10", DataConfig(root=str(tmp_path), download=False))
    assert not marker.exists()


@pytest.mark.parametrize("value, kind", [
    (np.dtype("V8"), "'V8'"),  # a copied dtype, which a file could rewrite through its state to forge pointers
    (np.array([1, "a"], dtype=object), "'O8'"),
    (np.zeros(2, dtype=[("a", "u1"), ("b", "f4")]), "'V5'"),
])
def test_an_array_of_any_but_a_plain_number_type_is_refused(tmp_path, value, kind):
    _write_python(tmp_path, 10, protocol=2)
    (tmp_path / cifar.PYTHON[10].folder / "test_batch").write_bytes(pickle.dumps(
        {b"data": np.zeros((1, cifar.PIXELS), np.uint8), b"labels": [0], b"filenames": value}, protocol=2))
    with pytest.raises(DatasetError, match=f"test_batch' is not a CIFAR python batch: it holds an array of type {kind}"):
        load_data("cifar10", DataConfig(root=str(tmp_path), download=False))


class _Call:
    """Pickles as the call ``function(*args)``, as a hostile file would write it."""

    def __init__(self, function, *args):
        self.reduced = function, args

    def __reduce__(self):
        return self.reduced


_reconstruct = np._core.multiarray._reconstruct
HOSTILE = {
    "object array from raw bytes": _Call(np.ndarray, (2,), "O", b"A" * 16),
    "read before the buffer": _Call(np.ndarray, (4, cifar.PIXELS), "u1", b"A", -2**40),
    "strides that wrap around": _Call(np.ndarray, (3, cifar.PIXELS), "u1", b"A" * cifar.PIXELS, 0, (-2**63, 1)),
    "an array over another's memory": [_Call(np.ndarray, (4,), "u1", np.zeros(4, np.uint8))],
    "an object array by _reconstruct": _Call(_reconstruct, np.ndarray, (3,), "O"),
    "uninitialised memory by _reconstruct": _Call(_reconstruct, np.ndarray, (1 << 20,), "u1"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_array_call_is_refused_without_crashing_the_reader(tmp_path, case):
    """Run in a child process, so that a memory error fails the test rather than ending pytest."""
    _write_python(tmp_path, 10, protocol=2)
    path = tmp_path / cifar.PYTHON[10].folder / "batches.meta"
    path.write_bytes(pickle.dumps({b"label_names": HOSTILE[case], b"data": HOSTILE[case]}, protocol=2))
    probe = ("import sys; from pathlib import Path; from ballot import cifar; from ballot.errors import DatasetError\n"
             "try:\n    cifar._unpickle(Path(sys.argv[1]))\nexcept DatasetError as error:\n    print(error)")
    run = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert run.returncode == 0, f"the reader crashed ({run.returncode}): {run.stderr[-500:]}"
    assert run.stdout.startswith(f"'{path}' is not a CIFAR python batch: it "), run.stdout


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / "data_batch_2.bin").write_bytes(b"\0" * 3000), "holds 3000 bytes, not a whole number"),
    (lambda folder: (folder / "test_batch.bin").unlink(), "lacks test_batch.bin: extract the whole"),
    (lambda folder: (folder / "batches.meta.txt").write_text("a\nb\n"), "names 2 classes, not CIFAR-10's 10"),
    (lambda folder: (folder / "data_batch_1.bin").write_bytes(bytes([10]) + b"\0" * cifar.PIXELS),
     "a label of 10 in CIFAR-10's 10 classes"),
])
def test_a_damaged_binary_archive_is_named_in_one_line(tmp_path, damage, message):
    _write_binary(tmp_path, 10)
    damage(tmp_path / cifar.BINARY[10].folder)
    with pytest.raises(DatasetError, match=message):
        load_data("cifar10", DataConfig(root=str(tmp_path), download=False))


def test_a_python_batch_of_the_wrong_shape_is_refused(tmp_path):
    _write_python(tmp_path, 100, protocol=4)
    path = tmp_path / cifar.PYTHON[100].folder / "test"
    path.write_bytes(pickle.dumps({b"data": np.zeros((4, 1024), np.uint8), b"fine_labels": [0] * 4}))
    with pytest.raises(DatasetError, match=r"'data' is uint8 of shape \(4, 1024\), not uint8 \(N, 3072\)"):
        load_data("cifar100", DataConfig(root=str(tmp_path), download=False))
