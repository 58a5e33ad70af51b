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


def check_batch_size(count: int, max_batch: int) -> None:
    """InputError for an empty batch, BatchSizeError above ``max_batch``."""
    if count == 0:
        raise InputError("empty batch: send at least one item")
    if count > max_batch:
        raise BatchSizeError(f"batch of {count} items exceeds the limit of {max_batch}; split it into smaller requests")


def from_nested(items: Sequence[Any], input_shape: Sequence[int]) -> np.ndarray:
    """A float32 batch [n, *input_shape] from nested lists of numbers (one list per item).

    Each item has ``input_shape`` or is a flat list of prod(input_shape) numbers. Image-shaped models
    (C, H, W) take raw pixels in [0, 1]; other models take any finite numbers.
    """
    shape = tuple(input_shape)
    size = math.prod(shape)
    depth = _depth(items) - 1
    if depth > len(shape):
        raise InputError(f"items nest {depth} levels deep; each must have shape {list(shape)}")
    grid = np.array(items, dtype=object)
    leaf_types = set(map(type, grid.flat))
    if list in leaf_types:
        raise InputError(f"items are ragged (nested lists of unequal lengths); each must have shape {list(shape)}")
    wrong = leaf_types - {int, float}
    if wrong:
        names = sorted(JSON_TYPES.get(t, t.__name__) for t in wrong)
        raise InputError(f"inputs must be numbers; found {', '.join(names)}")
    item_shape = grid.shape[1:]
    if item_shape not in (shape, (size,)):
        raise InputError(f"each item must have shape {list(shape)} (or be a flat list of {size} numbers); "
                         f"got items of shape {list(item_shape)}")
    try:
        with np.errstate(over="ignore"):
            batch = grid.astype(np.float32).reshape(len(grid), *shape)
    except OverflowError:
        raise InputError("inputs hold an integer too large for float32") from None
    bad = ~np.isfinite(batch.reshape(len(batch), -1)).all(axis=1)
    if bad.any():
        raise InputError(f"inputs must be finite: item {int(np.argmax(bad))} holds NaN or an infinite value "
                         "(or a number too large for float32)")
    if len(shape) == 3 and (batch.min() < 0.0 or batch.max() > 1.0):
        raise InputError(f"image inputs must be raw pixels scaled to [0, 1]; got values in "
                         f"[{float(batch.min()):g}, {float(batch.max()):g}] (divide 8-bit pixels by 255)")
    return batch


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
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{where} is not a PNG image") from None
    except PNG_ERRORS as error:
        raise InputError(f"{where} is a damaged PNG image ({error})") from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
