"""The executor's own GGUF reading (executor.weights.gguf_file) against gguf.GGUFReader:
the same metadata, tensor directory and bytes, and loads bit-identical to the loader's
former path through GGUFReader, on SmolLM2 and on tiny files of every value type."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from tessera.common.registry import resolve_model, smollm2_gguf_path
from tessera.executor.weights import ROPE_FREQS, load_weights
from tessera.executor.weights.dequant import dequantize
from tessera.executor.weights.gguf import _hf_name, _unpermute_rotary, gguf_config
from tessera.executor.weights.gguf_file import GGUFArray, from_reader, read_gguf
from tests.executor.test_weights import _write_tiny_gguf


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()  # many small ops: see test_weights.one_torch_thread
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_reads_as_gguf_reader_does(path: Path) -> None:
    reader = gguf.GGUFReader(path)
    file = read_gguf(path)
    fields = {key: f for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    assert list(file.metadata) == list(fields)
    for key, field in fields.items():
        value = file.metadata[key]
        if field.types[0] == V.ARRAY:  # parts: key length, key, type, item type, count, ...
            assert value == GGUFArray(int(field.parts[3][0]), int(field.parts[4][0])), key
        else:
            expected = field.contents()
            assert (type(value), value) == (type(expected), expected), key
    assert [t.name for t in file.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(file.tensors, reader.tensors, strict=True):
        assert ours.tensor_type == theirs.tensor_type, ours.name
        assert ours.shape == tuple(int(d) for d in theirs.shape), ours.name
        assert ours.n_elements == theirs.n_elements, ours.name
        assert ours.data.dtype == np.uint8 and ours.data.flags.writeable
        assert np.array_equal(ours.data, theirs.data.reshape(-1).view(np.uint8)), ours.name
    converted = from_reader(reader)
    assert converted.metadata == file.metadata
    assert [t.shape for t in converted.tensors] == [t.shape for t in file.tensors]


def _load_through_gguf_reader(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What load_gguf returned when it read with GGUFReader (its code before issue 19)."""
    reader = gguf.GGUFReader(path, "c")
    config = gguf_config(reader, "reference")
    tensors = {}
    for t in reader.tensors:
        raw = torch.from_numpy(t.data.reshape(-1).view(np.uint8))
        values = dequantize(t.name, raw, t.tensor_type, int(t.n_elements))
        values = values.reshape(tuple(int(d) for d in reversed(t.shape)))
        name = _hf_name(t.name)
        if name != ROPE_FREQS:
            if config.architecture == "llama":
                values = _unpermute_rotary(name, values, config)
            values = values.to(dtype)
        tensors[name] = values
    return tensors


def _assert_loads_bit_identically(path: Path, dtype: torch.dtype = torch.float32) -> None:
    loaded = load_weights(resolve_model(str(path)), dtype=dtype, progress=False)
    reference = _load_through_gguf_reader(path, dtype)
    assert loaded.tensors.keys() == reference.keys()
    for name, tensor in loaded.tensors.items():
        assert tensor.dtype == reference[name].dtype, name
        assert torch.equal(tensor, reference[name]), name
    assert loaded.config == gguf_config(gguf.GGUFReader(path), loaded.config.name)


# --- SmolLM2, the default model ----------------------------------------------------------


def test_smollm2_reads_as_gguf_reader_reads_it():
    _assert_reads_as_gguf_reader_does(smollm2_gguf_path())


def test_smollm2_loads_bit_identically_to_the_gguf_reader_path():
    _assert_loads_bit_identically(smollm2_gguf_path())


def test_smollm2_skips_the_tokenizer_arrays_but_knows_their_lengths():
    metadata = read_gguf(smollm2_gguf_path()).metadata
    assert metadata["tokenizer.ggml.tokens"] == GGUFArray(V.STRING, 49152)
    assert metadata["tokenizer.ggml.merges"].item_type == V.STRING
    assert metadata["llama.attention.layer_norm_rms_epsilon"] == np.float32(1e-5)


# --- tiny files: every value type, every tensor type, other alignments -----------------


def _write_every_value_type(path: Path, alignment: int) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    if alignment != 32:
        writer.add_custom_alignment(alignment)  # written as general.alignment
    for vtype in (V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64):
        value = 7 if vtype.name.startswith("U") else -7
        writer.add_key_value(f"test.{vtype.name.lower()}", value, vtype)
    writer.add_float32("test.float32", 0.1)
    writer.add_float64("test.float64", 0.1)
    writer.add_bool("test.true", True)
    writer.add_bool("test.false", False)
    writer.add_string("test.string", "héllo ▁wörld")
    writer.add_array("test.ints", [1, 2, 3])
    writer.add_array("test.floats", [0.5, -1.0])
    writer.add_array("test.strings", ["a", "", "long " * 100])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_array("test.nested_strings", [["a", "bc"], ["d"]])
    writer.add_key_value("test.after", 42, V.UINT32)  # parsing resumed after the arrays
    writer.add_tensor("f32", np.arange(5, dtype=np.float32))
    writer.add_tensor("f16", np.arange(7, dtype=np.float16).reshape(7, 1))
    values = np.linspace(-1, 1, 64 * 3, dtype=np.float32).reshape(3, 64)
    writer.add_tensor("q4_1", gguf.quants.quantize(values, Q.Q4_1), raw_dtype=Q.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("alignment", [32, 64, 8])
def test_every_value_type_reads_as_gguf_reader_reads_it(tmp_path: Path, alignment: int):
    path = tmp_path / "values.gguf"
    _write_every_value_type(path, alignment)
    _assert_reads_as_gguf_reader_does(path)
    metadata = read_gguf(path).metadata
    assert metadata["test.nested"] == GGUFArray(V.ARRAY, 2)
    assert metadata["test.after"] == 42
    assert metadata["test.string"] == "héllo ▁wörld"
    assert metadata.get("general.alignment", 32) == alignment


@pytest.mark.parametrize(
    ("arch", "bias", "tied", "rope_freqs"),
    [("qwen2", True, True, False), ("llama", False, False, True)],
    ids=["qwen2-bias-tied", "llama-untied-rope_freqs"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_models_load_bit_identically(tmp_path: Path, arch, bias, tied, rope_freqs, dtype):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, arch, bias=bias, tied=tied, rope_freqs=rope_freqs)
    _assert_reads_as_gguf_reader_does(path)
    _assert_loads_bit_identically(path, dtype)


# --- broken files ------------------------------------------------------------------------


def test_truncated_or_foreign_files_are_named_errors(tmp_path: Path):
    good = tmp_path / "tiny.gguf"
    _write_tiny_gguf(good, "llama", bias=False, tied=True, rope_freqs=False)
    data = good.read_bytes()
    cut_tensors = tmp_path / "cut_tensors.gguf"
    cut_tensors.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"cut_tensors\.gguf.*truncated.*output_norm"):
        read_gguf(cut_tensors)
    cut_header = tmp_path / "cut_header.gguf"
    cut_header.write_bytes(data[:200])
    with pytest.raises(ValueError, match=r"cut_header\.gguf.*truncated"):
        read_gguf(cut_header)
    foreign = tmp_path / "model.safetensors"
    foreign.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(foreign)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.gguf"):
        read_gguf(empty)
    version = tmp_path / "v9.gguf"
    version.write_bytes(data[:4] + (9).to_bytes(4, "little") + data[8:])
    with pytest.raises(ValueError, match="version 9"):
        read_gguf(version)
