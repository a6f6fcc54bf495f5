"""GGUF metadata (the key/value section, not the tensors), read with ``struct`` alone.

``gguf.GGUFReader`` builds a numpy memmap view for every item of every array: the
~100k strings of a tokenizer's vocabulary and merges cost about 5 s on a 2-core
machine, paid by every tokenizer replica and the gateway at each start (issue 20).
Decoding the same bytes directly takes a small fraction of that. Values come back as
``GGUFReader``'s ``field.contents()`` gives them: scalars as Python numbers, bools
and str, arrays as lists.

    magic "GGUF" | version: u32 (2 or 3) | n_tensors: u64 | n_kv: u64
    n_kv x  key: str | value_type: u32 | value
    str: length: u64 | utf-8 bytes        array: item_type: u32 | count: u64 | items

Torch- and numpy-free.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from typing import Any

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_STRING, _ARRAY = 8, 9
# value type -> struct format character (little-endian); BOOL (7) is one byte
_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
            11: "q", 12: "d"}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def read_gguf_metadata(path: str, want: Callable[[str], bool] = lambda key: True
                       ) -> dict[str, Any]:
    """The metadata values of the GGUF file at ``path`` whose keys ``want`` accepts (the
    others are stepped over, not decoded). ValueError for a file that is not GGUF."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        (version,) = _U32.unpack_from(buf, 4)
        if version not in _VERSIONS:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        (n_kv,) = _U64.unpack_from(buf, 16)
        offset = 24
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key, offset = _read_str(buf, offset)
            (value_type,) = _U32.unpack_from(buf, offset)
            offset += 4
            if want(key):
                out[key], offset = _read_value(buf, offset, value_type)
            else:
                offset = _skip_value(buf, offset, value_type)
        return out


def _read_str(buf: mmap.mmap, offset: int) -> tuple[str, int]:
    (n,) = _U64.unpack_from(buf, offset)
    start = offset + 8
    return buf[start:start + n].decode("utf-8", errors="replace"), start + n


def _read_value(buf: mmap.mmap, offset: int, value_type: int) -> tuple[Any, int]:
    if value_type == _STRING:
        return _read_str(buf, offset)
    if value_type == _ARRAY:
        (item_type,) = _U32.unpack_from(buf, offset)
        (count,) = _U64.unpack_from(buf, offset + 4)
        offset += 12
        if item_type == _STRING:
            items = []
            for _ in range(count):
                item, offset = _read_str(buf, offset)
                items.append(item)
            return items, offset
        if item_type == _ARRAY:
            items = []
            for _ in range(count):
                item, offset = _read_value(buf, offset, _ARRAY)
                items.append(item)
            return items, offset
        fmt = struct.Struct(f"<{count}{_format(item_type)}")
        return list(fmt.unpack_from(buf, offset)), offset + fmt.size
    fmt = struct.Struct("<" + _format(value_type))
    (value,) = fmt.unpack_from(buf, offset)
    return value, offset + fmt.size


def _skip_value(buf: mmap.mmap, offset: int, value_type: int) -> int:
    if value_type == _STRING:
        (n,) = _U64.unpack_from(buf, offset)
        return offset + 8 + n
    if value_type == _ARRAY:
        (item_type,) = _U32.unpack_from(buf, offset)
        (count,) = _U64.unpack_from(buf, offset + 4)
        offset += 12
        if item_type in (_STRING, _ARRAY):
            for _ in range(count):
                offset = _skip_value(buf, offset, item_type)
            return offset
        return offset + count * struct.calcsize("<" + _format(item_type))
    return offset + struct.calcsize("<" + _format(value_type))


def _format(value_type: int) -> str:
    try:
        return _FORMATS[value_type]
    except KeyError:
        raise ValueError(f"unknown GGUF value type {value_type}") from None
