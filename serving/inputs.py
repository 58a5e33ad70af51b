"""Turn a request's inputs (nested arrays or base64 PNGs) into a float32 batch, or say what is wrong."""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
import zlib
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.errors import BatchSizeError, InputError

JSON_TYPES = {str: "string", bool: "boolean", type(None): "null", dict: "object", list: "array"}
PNG_ERRORS = (Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError,
              struct.error, zlib.error)
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")
PNG_BIT_DEPTH_AT = 24  # byte offset of IHDR's bit depth: signature 8, chunk length 4, type 4, width 4, height 4
MAX_DIGITS = 18  # longer digit strings are no size or byte count a request can hold (and stay within int64)


def shown(number: int) -> str:
    """``number`` as text, or its length when it is too long to echo in an error message."""
    if abs(number) < 10**MAX_DIGITS:
        return str(number)
    digits = int(number.bit_length() * math.log10(2)) + 1  # str() refuses integers of over 4300 digits
    return f"<an integer of {digits - (10 ** (digits - 1) > abs(number))} digits>"


def check_batch_size(count: int, max_batch: int) -> None:
    """InputError for an empty batch, BatchSizeError above ``max_batch``."""
    if count == 0:
        raise InputError("empty batch: send at least one item")
    if count > max_batch:
        raise BatchSizeError(f"batch of {shown(count)} items exceeds the limit of {max_batch}; split it into smaller "
                             "requests")


def check_shape(shape: Sequence[int], input_shape: Sequence[int], max_batch: int) -> tuple[int, ...]:
    """``shape`` when it is [n, *input_shape] with 1 <= n <= ``max_batch``; else InputError or BatchSizeError."""
    expected = list(input_shape)
    if len(shape) != len(expected) + 1 or list(shape[1:]) != expected or shape[0] < 0:
        raise InputError(f"tensor shape [{', '.join(shown(d) for d in shape[:8])}] does not fit the model: it takes "
                         f"[n, {', '.join(map(str, expected))}]")
    check_batch_size(shape[0], max_batch)
    return tuple(shape)


def parse_count(text: str | bytes) -> int | None:
    """``text`` as a non-negative integer when it is 1 to MAX_DIGITS ASCII digits (spaces around allowed), else None
    (str.isdigit alone takes '²', and int() refuses more than 4300 digits)."""
    digits = text.strip()
    if not digits or len(digits) > MAX_DIGITS or not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits)


def parse_shape(text: str) -> list[int]:
    """A shape written as comma-separated sizes (``64,1,28,28``); InputError otherwise."""
    sizes = [parse_count(part) for part in text.split(",")]
    if any(size is None for size in sizes):
        raise InputError(f"the shape must be comma-separated sizes such as 8,1,28,28; got {text[:60]!r}")
    return sizes  # type: ignore[return-value]


def from_float32_bytes(raw: bytes | memoryview, shape: Sequence[int]) -> np.ndarray:
    """A float32 array of ``shape`` viewing little-endian float32 bytes in row-major order (not copied), checked by
    ``check_values``."""
    needed = math.prod(shape) * 4
    if len(raw) != needed:
        raise InputError(f"the body holds {len(raw)} bytes; {list(shape)} float32 values take {needed} "
                         "(send little-endian float32, not float64)")
    return check_values(np.frombuffer(raw, dtype="<f4").reshape(shape))


def from_nested(items: Sequence[Any], input_shape: Sequence[int]) -> np.ndarray:
    """A float32 batch [n, *input_shape] from nested lists of numbers (one list per item).

    Each item has ``input_shape`` or is a flat list of prod(input_shape) numbers, all items of a batch in the same
    form; values are checked by ``check_values``.
    """
    shape = tuple(input_shape)
    size = math.prod(shape)
    depth = _depth(items) - 1
    if depth > len(shape):
        raise InputError(f"items nest {depth} levels deep; each must have shape {list(shape)}")
    grid = _number_grid(items, f"each must have shape {list(shape)}, or every item be a flat list of {size} "
                               "numbers (one form for the whole batch)")
    item_shape = grid.shape[1:]
    if item_shape not in (shape, (size,)):
        raise InputError(f"each item must have shape {list(shape)} (or be a flat list of {size} numbers); "
                         f"got items of shape {list(item_shape)}")
    return check_values(_float32(grid, (len(grid), *shape)))


def from_tensor_data(data: Any, shape: Sequence[int]) -> np.ndarray:
    """A float32 array of ``shape`` from an inference tensor's JSON ``data``: flat (row-major) or nested lists."""
    shape = tuple(shape)
    if not isinstance(data, list):
        raise InputError(f"tensor 'data' must be a list of numbers, got {JSON_TYPES.get(type(data), 'a number')}")
    if _depth(data) > len(shape):
        raise InputError(f"tensor 'data' nests {_depth(data)} levels deep; the tensor has shape {list(shape)}")
    grid = _number_grid(data, f"the tensor has shape {list(shape)}")
    if grid.shape not in (shape, (math.prod(shape),)):
        raise InputError(f"tensor 'data' of shape {list(grid.shape)} does not fit the tensor's shape "
                         f"{list(shape)} ({math.prod(shape)} values)")
    return check_values(_float32(grid, shape))


def _number_grid(items: Sequence[Any], expected: str) -> np.ndarray:
    """``items`` as an object array of numbers; InputError (ending in ``expected``) when ragged or not numbers."""
    grid = np.array(items, dtype=object)
    leaf_types = set(map(type, grid.flat))
    if list in leaf_types:
        raise InputError(f"values are ragged (nested lists of unequal lengths); {expected}")
    wrong = leaf_types - {int, float}
    if wrong:
        names = sorted(JSON_TYPES.get(t, t.__name__) for t in wrong)
        raise InputError(f"inputs must be numbers; found {', '.join(names)}")
    return grid


def _float32(grid: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    try:
        with np.errstate(over="ignore"):
            return grid.astype(np.float32).reshape(shape)
    except OverflowError:
        raise InputError("inputs hold an integer too large for float32") from None


def check_values(batch: np.ndarray) -> np.ndarray:
    """``batch`` [n, *input_shape] float32 unchanged, or InputError for a non-finite value or a pixel outside [0, 1].

    Image-shaped models (C, H, W) take raw pixels in [0, 1]; other models take any finite numbers.
    """
    shape = batch.shape[1:]
    low, high = float(batch.min()), float(batch.max())  # NaN or an infinity shows in one of them
    if math.isfinite(low) and math.isfinite(high) and (len(shape) != 3 or (low >= 0.0 and high <= 1.0)):
        return batch
    bad = ~np.isfinite(batch.reshape(len(batch), -1)).all(axis=1)
    if bad.any():
        raise InputError(f"inputs must be finite: item {int(np.argmax(bad))} holds NaN or an infinite value "
                         "(or a number too large for float32)")
    raise InputError(f"image inputs must be raw pixels scaled to [0, 1]; got values in [{low:g}, {high:g}] "
                     "(divide 8-bit pixels by 255)")


def _depth(value: Any) -> int:
    """Nesting depth of lists along the first elements."""
    depth = 0
    while isinstance(value, list) and value:
        value, depth = value[0], depth + 1
    return depth


def from_pngs(images: Sequence[str], input_shape: Sequence[int]) -> np.ndarray:
    """A float32 batch from base64 PNGs of exactly the model's size, converted to its channel count."""
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise InputError(f"this model takes inputs of shape {list(input_shape)}, not images: send 'inputs' "
                         "as nested arrays")
    return np.stack([_decode_png(text, tuple(input_shape), index) for index, text in enumerate(images)])


def _decode_png(text: str, shape: tuple[int, ...], index: int) -> np.ndarray:
    channels, height, width = shape
    where = f"images[{index}]"
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where} is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as image:
            if image.size != (width, height):
                raise InputError(f"{where} is {image.size[0]}x{image.size[1]} pixels; the model takes "
                                 f"{width}x{height} (resize it before sending)")
            if image.mode not in EIGHT_BIT_MODES:
                raise InputError(f"{where} has pixel mode '{image.mode}'; send an 8-bit grayscale or RGB PNG")
            if raw[12:16] != b"IHDR":  # the PNG standard puts it first; Pillow reads files that do not
                raise InputError(f"{where} is a damaged PNG image (its first chunk is not IHDR)")
            if raw[PNG_BIT_DEPTH_AT] > 8:  # Pillow reads 16-bit colour as 8-bit RGB(A), cutting the low byte
                raise InputError(f"{where} has {raw[PNG_BIT_DEPTH_AT]}-bit samples; send an 8-bit grayscale or RGB PNG")
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{where} is not a PNG image") from None
    except PNG_ERRORS as error:
        raise InputError(f"{where} is a damaged PNG image ({error})") from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
