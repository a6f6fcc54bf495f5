"""The GGUF header and metadata (the key/value section, not the tensors), read with
``struct`` alone: the one walker of that section, for the tokenizer (which decodes the
vocabulary arrays) and for the executor's GGUF reader (executor/weights/gguf_file.py,
which steps over them and goes on to the tensor directory).

``gguf.GGUFReader`` builds a numpy memmap view for every item of every array: the
~100k strings of a tokenizer's vocabulary and merges cost seconds on a 2-core machine,
paid by every tokenizer replica, the gateway and each executor start (issues 19, 20).
Decoding the same bytes directly takes a small fraction of that. Decoded values come
back as ``GGUFReader``'s ``field.contents()`` gives them: scalars as Python numbers,
bools and str, arrays as lists; an array left undecoded is a ``GGUFArray``.

    magic "GGUF" | version: u32 (2 or 3) | n_tensors: u64 | n_kv: u64
    n_kv x  key: str | value_type: u32 | value
    str: length: u64 | utf-8 bytes        array: item_type: u32 | count: u64 | items

Torch- and numpy-free.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
STRING, ARRAY = 8, 9  # value types (gguf.GGUFValueType)
# value type -> struct of one value (little-endian); a BOOL is one byte, 0 or 1
_SCALARS = {
    t: struct.Struct("<" + c)
    for t, c in {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}.items()
}  # fmt: skip
_U32 = _SCALARS[4]
_U64 = _SCALARS[10]
_ARRAY_HEADER = struct.Struct("<IQ")  # item_type, count


@dataclass(slots=True, frozen=True)
class GGUFArray:
    """An array value left unread: its item type (a ``GGUFValueType``) and length."""

    item_type: int
    count: int


@dataclass(slots=True, frozen=True)
class GGUFHeader:
    """metadata: key -> scalar, str, list (a decoded array) or ``GGUFArray``;
    end: the offset just after the key/value section (the tensor directory's start)."""

    n_tensors: int
    metadata: dict[str, Any]
    end: int


def read_header(buf: mmap.mmap, decode_array: Callable[[str], bool] = lambda key: False
                ) -> GGUFHeader:
    """Walk the header and the key/value section of the GGUF mapped in ``buf``. Scalars
    and strings are decoded; an array is decoded only where ``decode_array(key)``, else
    stepped over as a ``GGUFArray``. ValueError for a file that is not such a GGUF, a
    truncated one, a repeated key or an unknown type."""
    if buf[:4] != _MAGIC:
        raise ValueError(f"not a GGUF file (its first bytes are {buf[:4]!r})")
    (version,) = _U32.unpack_from(buf, 4)
    if version not in _VERSIONS:
        # A big-endian file reads as a version whose low 16 bits are zero.
        raise ValueError(
            f"version {version} (or big-endian); Tessera reads little-endian GGUF "
            f"versions {', '.join(map(str, _VERSIONS))}"
        )
    (n_tensors,) = _U64.unpack_from(buf, 8)
    (n_kv,) = _U64.unpack_from(buf, 16)
    offset = 24
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key, offset = read_str(buf, offset)
        (value_type,) = _U32.unpack_from(buf, offset)
        offset += 4
        if key in metadata:
            raise ValueError(f"the metadata key {key!r} appears twice")
        if value_type == ARRAY and not decode_array(key):
            item_type, count = _ARRAY_HEADER.unpack_from(buf, offset)
            metadata[key] = GGUFArray(item_type, count)
            offset = _skip_items(buf, offset + _ARRAY_HEADER.size, item_type, count)
        else:
            metadata[key], offset = _read_value(buf, offset, value_type)
    return GGUFHeader(n_tensors, metadata, offset)


def read_gguf_metadata(path: str, want: Callable[[str], bool] = lambda key: True
                       ) -> dict[str, Any]:
    """The metadata values of the GGUF file at ``path`` whose keys ``want`` accepts,
    arrays decoded (the other arrays are stepped over, not decoded)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            header = read_header(buf, want)
        except struct.error as e:  # a read past the end
            raise ValueError(f"{path}: GGUF file truncated or corrupt ({e})") from e
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: {e}") from e
    return {key: value for key, value in header.metadata.items() if want(key)}


def read_str(buf: mmap.mmap, offset: int) -> tuple[str, int]:
    """The string at ``offset`` and the offset after it."""
    (length,) = _U64.unpack_from(buf, offset)
    end = offset + 8 + length
    if end > len(buf):
        raise ValueError(f"truncated: a string of {length} bytes at byte {offset}")
    return str(buf[offset + 8 : end], "utf-8"), end


def _read_value(buf: mmap.mmap, offset: int, value_type: int) -> tuple[Any, int]:
    """The value of ``value_type`` at ``offset`` (arrays as lists), and the offset after it."""
    scalar = _SCALARS.get(value_type)
    if scalar is not None:
        return scalar.unpack_from(buf, offset)[0], offset + scalar.size
    if value_type == STRING:
        return read_str(buf, offset)
    if value_type == ARRAY:
        item_type, count = _ARRAY_HEADER.unpack_from(buf, offset)
        offset += _ARRAY_HEADER.size
        scalar = _SCALARS.get(item_type)
        if scalar is not None:
            fmt = struct.Struct(f"<{count}{scalar.format[1:]}")
            return list(fmt.unpack_from(buf, offset)), offset + fmt.size
        items = []
        for _ in range(count):
            item, offset = _read_value(buf, offset, item_type)
            items.append(item)
        return items, offset
    raise ValueError(f"unknown value type {value_type} at byte {offset}")


def _skip_items(buf: mmap.mmap, offset: int, item_type: int, count: int) -> int:
    """The offset after ``count`` items of ``item_type`` starting at ``offset``."""
    scalar = _SCALARS.get(item_type)
    if scalar is not None:
        end = offset + count * scalar.size
    elif item_type == STRING:
        # Only the lengths are read: SmolLM2's ~100k token and merge strings take ~20 ms.
        unpack_u64 = _U64.unpack_from
        end = offset
        for _ in range(count):
            end += 8 + unpack_u64(buf, end)[0]
    elif item_type == ARRAY:  # arrays of arrays: each has its own header
        end = offset
        for _ in range(count):
            inner_type, inner_count = _ARRAY_HEADER.unpack_from(buf, end)
            end = _skip_items(buf, end + _ARRAY_HEADER.size, inner_type, inner_count)
    else:
        raise ValueError(f"unknown array item type {item_type} at byte {offset}")
    if end > len(buf):
        raise ValueError(f"truncated: an array at byte {offset} runs past the end")
    return end
