"""The GGUF container, read for the executor: scalar metadata, the tensor directory, and
the tensor bytes memory-mapped.

`gguf.GGUFReader` builds a numpy view for every value in the file, each of the ~100k
`tokenizer.ggml.*` strings included: ~3 s of every executor start on a 2-core machine,
for arrays the executor never reads (the tokenizer service reads them). This reader
decodes scalars and strings, records only the item type and length of an array (its
bytes are stepped over), and hands out each tensor's bytes as a view of the mapped
file. The header and the key/value section are walked by common/gguf_metadata.py (the
tokenizer's reader too); this module reads what follows them (little-endian, GGUF
versions 2 and 3):

    n_tensors x  name: str | n_dims: u32 | dims: u64[n_dims] | ggml_type: u32 | offset: u64
    padding up to a multiple of general.alignment (32 when absent)
    tensor data: each tensor at data_start + offset

    str: length: u64 | utf-8 bytes        array: item_type: u32 | count: u64 | items
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from tessera.common.gguf_metadata import GGUFArray, read_header, read_str

_DEFAULT_ALIGNMENT = 32


@dataclass(slots=True, frozen=True, eq=False)
class GGUFTensor:
    """One tensor's directory entry and its bytes, as the file stores them."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order, innermost first: [in_features, out_features]
    n_elements: int
    data: np.ndarray  # [n_bytes] uint8: a copy-on-write view of the file


@dataclass(slots=True, frozen=True, eq=False)
class GGUFFile:
    """metadata: key -> int | float | bool | str, or a `GGUFArray`; tensors in file order."""

    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the GGUF at `path`; tensor data stays in the (copy-on-write) mapped file."""
    try:
        with open(path, "rb") as f:
            # Copy-on-write: the arrays are writable (torch.from_numpy wants that), the
            # file never changes. The map outlives the file; the arrays keep it alive.
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return _parse(buf)
    except struct.error as e:  # a read past the end
        raise ValueError(f"GGUF file {path} is truncated or corrupt ({e})") from e
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: mmap of an empty file too
        raise ValueError(f"GGUF file {path}: {e}") from e


def _parse(buf: mmap.mmap) -> GGUFFile:
    header = read_header(buf)
    metadata, offset = header.metadata, header.end
    infos = []
    for _ in range(header.n_tensors):
        name, offset = read_str(buf, offset)
        (n_dims,) = struct.unpack_from("<I", buf, offset)
        shape = struct.unpack_from(f"<{n_dims}Q", buf, offset + 4)
        offset += 4 + 8 * n_dims
        ggml_type, tensor_offset = struct.unpack_from("<IQ", buf, offset)
        offset += 12
        infos.append((name, shape, ggml_type, tensor_offset))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-offset // alignment) * alignment
    data = np.frombuffer(buf, dtype=np.uint8)
    return GGUFFile(metadata, _tensors(data, data_start, infos))


def _tensors(data: np.ndarray, data_start: int, infos: list[tuple]) -> list[GGUFTensor]:
    tensors: list[GGUFTensor] = []
    names: set[str] = set()
    for name, shape, raw_type, tensor_offset in infos:
        if name in names:
            raise ValueError(f"two tensors are named {name!r}")
        names.add(name)
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"tensor {name!r} has unknown GGML type {raw_type}") from None
        n_elements = int(np.prod(shape, dtype=np.int64)) if shape else 1
        block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
        start = data_start + tensor_offset
        end = start + n_elements * block_bytes // block_size
        if end > data.size:
            raise ValueError(f"truncated: tensor {name!r} ends at byte {end} of {data.size}")
        tensors.append(GGUFTensor(name, ggml_type, shape, n_elements, data[start:end]))
    return tensors


def from_reader(reader: GGUFReader) -> GGUFFile:
    """The same `GGUFFile`, from a file that `gguf.GGUFReader` has parsed (slowly)."""
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's names for the header's counts
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            # parts: key length, key, value type, item type, count, items...
            metadata[key] = GGUFArray(int(field.parts[3][0]), int(field.parts[4][0]))
        else:
            metadata[key] = field.contents()
    tensors = [
        GGUFTensor(
            t.name,
            GGMLQuantizationType(t.tensor_type),
            tuple(int(d) for d in t.shape),
            int(t.n_elements),
            t.data.reshape(-1).view(np.uint8),  # F32/F16 tensors come as typed arrays
        )
        for t in reader.tensors
    ]
    return GGUFFile(metadata, tensors)
