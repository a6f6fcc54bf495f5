"""Weight loaders against outside references: gguf's own dequantizers, and the state dict
and config that Hugging Face transformers builds from the same files."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tessera.common.model_config import ModelConfig
from tessera.common.registry import RANDOM_SHAPES, random_config, resolve_model, smollm2_gguf_path
from tessera.executor.weights import ROPE_FREQS, expected_shapes, load_weights, num_parameters
from tessera.executor.weights.dequant import DEQUANTIZERS, UnsupportedTensorType, dequantize
from tessera.executor.weights.gguf import _unpermute_rotary
from tessera.executor.weights.random import _random_tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never download

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "bos_token_id",
)


def _transformers_model(directory: Path, gguf_file: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)


def _reference_value(reference, name: str):
    # Qwen2Config has neither: heads are hidden_size / heads wide, and q/k/v always biased.
    if name == "head_dim" and reference.model_type == "qwen2":
        return reference.hidden_size // reference.num_attention_heads
    if name == "attention_bias" and reference.model_type == "qwen2":
        return True
    return getattr(reference, name)


def _assert_same_tensors(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert ours.keys() <= reference.keys()
    for name, tensor in ours.items():
        if not torch.equal(tensor, reference[name]):  # equal in practice; the check is fast
            torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-7, msg=name)


def _assert_config_matches(config: ModelConfig, reference) -> None:  # reference: a PretrainedConfig
    for name in CONFIG_FIELDS:
        assert getattr(config, name) == _reference_value(reference, name), name
    assert config.rope_theta == reference.rope_parameters["rope_theta"]
    assert config.eos_token_ids == (reference.eos_token_id,)


# --- module-scoped references: loading them takes most of this file's time ---------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Many small dequantization ops: on a busy 2-core machine, waking a second intra-op
    thread costs more than each op (20x slower loads). Tests only; the loader leaves the
    thread count to its caller."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



@pytest.fixture(scope="module")
def smollm2() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def ours(smollm2: Path):
    return load_weights(resolve_model("smollm2-135m-instruct"), progress=False)


@pytest.fixture(scope="module")
def reference(hf_model) -> torch.nn.Module:
    return hf_model  # transformers' own reading of the same GGUF (tests/conftest.py)


# --- dequantizers ------------------------------------------------------------------------

QUANT_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)


def _ours(data: np.ndarray, qtype: Q, n_elements: int) -> torch.Tensor:
    raw = torch.from_numpy(np.array(data).reshape(-1).view(np.uint8))  # a writable copy
    return dequantize("test.weight", raw, qtype, n_elements)


def test_dequantizers_cover_the_required_types():
    assert set(DEQUANTIZERS) == set(QUANT_TYPES)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_dequantizer_matches_gguf_reference_on_quantized_random_data(qtype: Q):
    rng = np.random.default_rng(int(qtype))
    values = (rng.standard_normal((48, 256)) * rng.uniform(0.01, 3.0, (48, 1))).astype(np.float32)
    data = gguf.quants.quantize(values, qtype)
    expected = gguf.quants.dequantize(data, qtype).reshape(-1)
    got = _ours(data, qtype, values.size)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.from_numpy(expected.astype(np.float32)), rtol=0, atol=0)


@pytest.mark.parametrize("qtype", (Q.Q8_0, Q.Q4_0, Q.Q4_1), ids=lambda t: t.name)
def test_dequantizer_matches_gguf_reference_on_random_blocks(qtype: Q):
    """Every bit pattern of the quants, with random (finite) f16 scales and mins."""
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 256, (4096, block_bytes), dtype=np.uint8)
    n_halves = 2 if qtype == Q.Q4_1 else 1  # d, and m for Q4_1
    halves = rng.uniform(-2.0, 2.0, (4096, n_halves)).astype(np.float16)
    blocks[:, : 2 * n_halves] = halves.view(np.uint8)
    expected = gguf.quants.dequantize(blocks, qtype).reshape(-1)
    got = _ours(blocks, qtype, 4096 * block_size)
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=0, atol=0)


def test_dequantizer_matches_gguf_reference_on_smollm2_tensors(smollm2: Path):
    reader = gguf.GGUFReader(smollm2)
    wanted = {
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.29.ffn_down.weight",
        "output_norm.weight",
    }
    tensors = [t for t in reader.tensors if t.name in wanted]
    assert {t.tensor_type for t in tensors} == {Q.Q8_0, Q.Q4_1, Q.F32}
    for tensor in tensors:
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1)
        got = _ours(tensor.data, tensor.tensor_type, int(tensor.n_elements))
        expected = torch.from_numpy(np.array(expected))  # F32 comes back as the read-only map
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=tensor.name)


def test_unsupported_type_names_tensor_type_and_supported_types():
    raw = torch.zeros(144, dtype=torch.uint8)  # one Q4_K block of 256 values
    with pytest.raises(UnsupportedTensorType) as error:
        dequantize("blk.3.ffn_down.weight", raw, Q.Q4_K, 256)
    message = str(error.value)
    assert "blk.3.ffn_down.weight" in message and "Q4_K" in message
    assert all(t.name in message for t in QUANT_TYPES)


def test_truncated_tensor_is_an_error():
    with pytest.raises(ValueError, match="truncated"):
        dequantize("x", torch.zeros(33, dtype=torch.uint8), Q.Q8_0, 32)


def test_unpermute_inverts_llama_cpp_permutation():
    def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
        # convert_hf_to_gguf.py, LlamaModel.permute
        return (
            w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    config = random_config("smollm2-135m")  # 9 query heads, 3 key/value heads of 64
    q, k = torch.randn(9 * 64, 576), torch.randn(3 * 64, 576)
    name = "model.layers.0.self_attn.{}_proj.weight"
    assert torch.equal(_unpermute_rotary(name.format("q"), llama_cpp_permute(q, 9), config), q)
    assert torch.equal(_unpermute_rotary(name.format("k"), llama_cpp_permute(k, 3), config), k)
    assert not torch.equal(llama_cpp_permute(k, 3), k)


# --- the SmolLM2 GGUF against transformers -----------------------------------------------


def test_gguf_tensors_equal_transformers_state_dict(ours, reference):
    state = reference.state_dict()
    assert set(ours.tensors) == set(state) - {"lm_head.weight"}  # tied: no lm_head of ours
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    _assert_same_tensors(ours.tensors, state)
    assert all(t.dtype == torch.float32 for t in ours.tensors.values())


def test_gguf_config_equals_transformers_config(ours, reference):
    _assert_config_matches(ours.config, reference.config)
    assert ours.config.architecture == "llama"
    assert ours.config.rope_scaling is None
    assert ours.config.name == "smollm2-135m-instruct"


# --- Hugging Face directories ------------------------------------------------------------


def test_hf_directory_equals_gguf_load(hf_dir: Path, ours):
    loaded = load_weights(resolve_model(str(hf_dir)), progress=False)
    assert set(loaded.tensors) == set(ours.tensors)
    _assert_same_tensors(loaded.tensors, ours.tensors)
    assert loaded.config == dataclasses.replace(ours.config, name="smollm2-hf")
    assert loaded.config.rope_scaling is None  # not compared by ==


def test_sharded_hf_directory_equals_gguf_load(tmp_path: Path, plain_reference, ours):
    plain_reference.save_pretrained(tmp_path, max_shard_size="100MB")
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = load_weights(resolve_model(str(tmp_path)), progress=False)
    assert set(loaded.tensors) == set(ours.tensors)
    _assert_same_tensors(loaded.tensors, ours.tensors)


def test_hf_directory_loads_in_requested_dtype(hf_dir: Path, ours):
    loaded = load_weights(resolve_model(str(hf_dir)), dtype=torch.bfloat16, progress=False)
    assert all(t.dtype == torch.bfloat16 for t in loaded.tensors.values())
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(loaded.tensors[name], ours.tensors[name].to(torch.bfloat16))


def _write_config(directory: Path, **overrides) -> Path:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config.update(overrides)
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_hf_unknown_architecture_is_named(tmp_path: Path, hf_dir: Path):
    shutil.copytree(hf_dir, tmp_path / "m", copy_function=os.symlink)
    config = json.loads((hf_dir / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (tmp_path / "m" / "config.json").unlink()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM"):
        load_weights(resolve_model(str(tmp_path / "m")), progress=False)


def test_hf_rope_settings_old_and_transformers5_layouts(tmp_path: Path):
    from tessera.executor.weights.hf import hf_config

    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    old = _write_config(
        tmp_path / "old",
        rope_theta=500000.0,
        rope_scaling={"type": "llama3", **{k: v for k, v in llama3.items() if k != "rope_type"}},
    )
    new = _write_config(tmp_path / "new", rope_parameters={"rope_theta": 500000.0, **llama3})
    (new / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    old_config, new_config = hf_config(old, "m"), hf_config(new, "m")
    for config in (old_config, new_config):
        assert config.rope_theta == 500000.0
        assert config.rope_scaling == llama3
        assert config.head_dim == 16
    assert old_config.eos_token_ids == (2,)
    assert new_config.eos_token_ids == (2, 7, 9)
    default = hf_config(_write_config(tmp_path / "default"), "m")
    assert default.rope_theta == 10000.0 and default.rope_scaling is None


def test_hf_qwen2_has_attention_bias_and_mistral_sliding_window_is_refused(tmp_path: Path):
    from tessera.executor.weights.hf import hf_config

    qwen = hf_config(_write_config(tmp_path / "q", architectures=["Qwen2ForCausalLM"]), "q")
    assert qwen.architecture == "qwen2" and qwen.attention_bias
    mistral = _write_config(
        tmp_path / "m", architectures=["MistralForCausalLM"], sliding_window=1024
    )
    with pytest.raises(ValueError, match="sliding-window"):
        hf_config(mistral, "m")
    wide = _write_config(tmp_path / "w", architectures=["MistralForCausalLM"], sliding_window=4096)
    assert hf_config(wide, "w").architecture == "mistral"


def test_hf_directory_without_safetensors_is_an_error(tmp_path: Path):
    _write_config(tmp_path)
    with pytest.raises(ValueError, match="safetensors"):
        load_weights(resolve_model(str(tmp_path)), progress=False)


# --- tiny GGUFs written here: qwen2, every tensor type, untied output, rope_freqs --------


def _write_tiny_gguf(
    path: Path,
    arch: str,
    *,
    bias: bool,
    tied: bool,
    rope_freqs: bool,
    raw: dict[str, tuple[np.ndarray, Q]] | None = None,
) -> None:
    """A 2-layer model using every supported type, as llama.cpp would write it; `raw`
    replaces named tensors by (bytes, type)."""
    rng = np.random.default_rng(0)
    hidden, heads, kv_heads, inter, vocab = 64, 4, 2, 128, 256
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(2)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(3)

    def add(name: str, shape: tuple[int, ...], qtype: Q = Q.F32) -> None:
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        data, qtype = (raw or {}).get(name, (gguf.quants.quantize(values, qtype), qtype))
        writer.add_tensor(name, data, raw_dtype=qtype)

    add("token_embd.weight", (vocab, hidden), Q.Q8_0)
    for i in range(2):
        add(f"blk.{i}.attn_norm.weight", (hidden,))
        add(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden), Q.Q4_1)
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden), Q.Q4_0)
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden), Q.F16)
        if bias:
            add(f"blk.{i}.attn_q.bias", (heads * head_dim,))
            add(f"blk.{i}.attn_k.bias", (kv_heads * head_dim,))
            add(f"blk.{i}.attn_v.bias", (kv_heads * head_dim,))
        add(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim), Q.BF16)
        add(f"blk.{i}.ffn_norm.weight", (hidden,))
        add(f"blk.{i}.ffn_gate.weight", (inter, hidden), Q.Q4_1)
        add(f"blk.{i}.ffn_up.weight", (inter, hidden), Q.Q8_0)
        add(f"blk.{i}.ffn_down.weight", (hidden, inter), Q.Q4_0)
    add("output_norm.weight", (hidden,))
    if not tied:
        add("output.weight", (vocab, hidden), Q.F16)
    if rope_freqs:
        add("rope_freqs.weight", (head_dim // 2,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    ("arch", "bias", "tied", "rope_freqs"),
    [("qwen2", True, True, False), ("llama", False, False, True)],
    ids=["qwen2-bias-tied", "llama-untied-rope_freqs"],
)
def test_tiny_gguf_equals_transformers(tmp_path: Path, arch, bias, tied, rope_freqs):
    _write_tiny_gguf(tmp_path / "tiny.gguf", arch, bias=bias, tied=tied, rope_freqs=rope_freqs)
    loaded = load_weights(resolve_model(str(tmp_path / "tiny.gguf")), progress=False)
    reference = _transformers_model(tmp_path, "tiny.gguf")

    state = reference.state_dict()
    if tied:
        state.pop("lm_head.weight")
    assert set(loaded.tensors) - {ROPE_FREQS} == set(state)
    _assert_same_tensors({k: v for k, v in loaded.tensors.items() if k != ROPE_FREQS}, state)
    config = loaded.config
    assert (config.architecture, config.attention_bias, config.tie_word_embeddings) == (
        arch,
        bias,
        tied,
    )
    assert config.eos_token_ids == (2, 3)  # eos, then end of turn
    for name in CONFIG_FIELDS:
        assert getattr(config, name) == _reference_value(reference.config, name), name
    if rope_freqs:
        assert loaded.tensors[ROPE_FREQS].shape == (8,)
        assert loaded.tensors[ROPE_FREQS].dtype == torch.float32


def test_tiny_gguf_loads_in_bfloat16_except_rope_freqs(tmp_path: Path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, "llama", bias=False, tied=False, rope_freqs=True)
    full = load_weights(resolve_model(str(path)), progress=False)
    half = load_weights(resolve_model(str(path)), dtype=torch.bfloat16, progress=False)
    assert half.tensors[ROPE_FREQS].dtype == torch.float32
    for name, tensor in half.tensors.items():
        if name != ROPE_FREQS:
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, full.tensors[name].to(torch.bfloat16)), name


def test_gguf_unsupported_architecture_and_tensor_type(tmp_path: Path):
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="phi3"):
        load_weights(resolve_model(str(path)), progress=False)

    rewritten = tmp_path / "q4k.gguf"
    q4_k = np.zeros((32, 144), np.uint8)  # 32 Q4_K blocks of 256 values (Q4_K rows hold 256)
    _write_tiny_gguf(
        rewritten,
        "llama",
        bias=False,
        tied=True,
        rope_freqs=False,
        raw={"blk.1.ffn_up.weight": (q4_k, Q.Q4_K)},
    )
    with pytest.raises(UnsupportedTensorType, match=r"blk\.1\.ffn_up\.weight.*Q4_K"):
        load_weights(resolve_model(str(rewritten)), progress=False)


# --- random weights and the registry -----------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("llama-3.1-8b", 8_030_261_248),
        ("llama-3.2-1b", 1_235_814_400),
        ("smollm2-135m", 134_515_008),
        ("qwen2.5-0.5b", 494_032_768),
    ],
)
def test_random_shapes_have_the_published_parameter_counts(shape: str, expected: int):
    assert num_parameters(random_config(shape)) == expected
    meta = load_weights(resolve_model(f"random:{shape}"), torch.bfloat16, "meta", progress=False)
    assert sum(t.numel() for t in meta.tensors.values()) == expected
    assert {k: tuple(v.shape) for k, v in meta.tensors.items()} == expected_shapes(meta.config)


def test_random_shapes_match_their_hub_configs():
    llama8b, llama1b = random_config("llama-3.1-8b"), random_config("llama-3.2-1b")
    assert llama8b.rope_scaling["rope_type"] == llama1b.rope_scaling["rope_type"] == "llama3"
    assert (llama8b.rope_scaling["factor"], llama1b.rope_scaling["factor"]) == (8.0, 32.0)
    assert not llama8b.tie_word_embeddings and llama1b.tie_word_embeddings
    assert random_config("smollm2-135m").tie_word_embeddings
    assert random_config("qwen2.5-0.5b").attention_bias


def test_random_weights_are_deterministic_finite_and_in_dtype():
    loaded = load_weights(resolve_model("random:smollm2-135m"), torch.bfloat16, progress=False)
    assert loaded.config == random_config("smollm2-135m")
    assert all(t.dtype == torch.bfloat16 for t in loaded.tensors.values())
    name = "model.layers.3.mlp.down_proj.weight"
    weight = loaded.tensors[name]
    again = _random_tensor(name, weight.shape, torch.bfloat16, torch.device("cpu"), seed=0)
    reseeded = _random_tensor(name, weight.shape, torch.bfloat16, torch.device("cpu"), seed=1)
    assert torch.equal(weight, again) and not torch.equal(weight, reseeded)
    assert not torch.equal(weight, loaded.tensors["model.layers.4.mlp.down_proj.weight"])
    assert torch.isfinite(weight).all()
    assert 0.015 < weight.float().std().item() < 0.025
    assert torch.equal(loaded.tensors["model.norm.weight"], torch.ones(576, dtype=torch.bfloat16))


def test_resolve_model_accepts_names_paths_and_shapes(tmp_path: Path, smollm2: Path):
    for name in (
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ):
        source = resolve_model(name)
        assert (source.kind, Path(source.path)) == ("gguf", smollm2.resolve())
    (tmp_path / "m.gguf").symlink_to(smollm2)
    assert resolve_model(str(tmp_path / "m.gguf")).kind == "gguf"
    _write_config(tmp_path / "hf")
    assert resolve_model(str(tmp_path / "hf")).kind == "hf"
    for shape in RANDOM_SHAPES:
        assert resolve_model(f"random:{shape}") == resolve_model(f"random:{shape}")
        assert resolve_model(f"random:{shape}").path is None


@pytest.mark.parametrize("model", ["gpt2", "random:llama-9b", "/nonexistent/model.gguf", ""])
def test_resolve_model_rejects_anything_else_and_lists_what_is_accepted(model: str):
    with pytest.raises(ValueError) as error:
        resolve_model(model)
    message = str(error.value)
    assert "llama-3.2-1b" in message and "smollm2-135m-instruct" in message
