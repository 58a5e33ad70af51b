"""The bytes an ONNX model takes on disk: its file plus the external-data files its tensors name.

MLflow's ONNX flavour stores the weights of a registered model in an external-data file next to ``model.onnx``,
so the .onnx file alone can be a hundredth of the model. A tensor's external data is a protobuf
``StringStringEntryProto`` with the key ``location``; its encoding is searched for in the file (no onnx package).
"""

from __future__ import annotations

import mmap
from pathlib import Path

LOCATION_ENTRY = b"\n\x08location\x12"  # field 1 (key): 8 bytes "location"; field 2 (value) follows


def model_bytes(path: Path) -> int:
    """Size of the ONNX file ``path`` plus that of each distinct, existing external-data file it names."""
    files = {(path.parent / location).resolve() for location in _locations(path)} - {path.resolve()}
    return path.stat().st_size + sum(file.stat().st_size for file in files if file.is_file())


def _locations(path: Path) -> set[str]:
    """The external-data locations named in the ONNX file ``path`` (relative to its folder)."""
    found: set[str] = set()
    if path.stat().st_size == 0:
        return found
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as content:
        start = content.find(LOCATION_ENTRY)
        while start >= 0:
            at = start + len(LOCATION_ENTRY)
            length, at = _varint(content, at)
            if 0 < length <= 4096 and at + length <= len(content):
                found.add(content[at:at + length].decode("utf-8", errors="replace"))
            start = content.find(LOCATION_ENTRY, at)
    return found


def _varint(content: mmap.mmap, at: int) -> tuple[int, int]:
    """The protobuf varint at ``at`` and the offset after it."""
    value, shift = 0, 0
    while at < len(content) and shift < 64:
        byte = content[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            break
    return value, at
