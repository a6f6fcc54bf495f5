"""4-bit GPTQ / AWQ checkpoints (executor/weights/quant.py).

Two outside references:

- a small round-to-nearest packer here, written from the formats as
  ``../shared/models/README.md`` documents them (read from real gptqmodel files), that
  writes tiny checkpoints in every variant: GPTQ v1 (zero - 1 stored) and v2, symmetric
  and asymmetric, act-order (scattered ``g_idx``), group sizes 32 / 64 / 128 / -1, AWQ
  GEMM with its interleaved nibble order, with and without zero points. The loader must
  give back exactly, in float32, the weights the packer's codes stand for;
- the real SmolLM2-135M GPTQ checkpoint in ``../shared/models`` (gptqmodel 7.7, act-order,
  group 64) with greedy tokens from transformers + gptqmodel: ours must follow them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tessera import LLM, SamplingParams
from tessera.common.executor_config import ExecutorConfig
from tessera.common.registry import resolve_model
from tessera.executor.triton_backend import TritonAttentionBackend
from tessera.executor.weights import load_weights
from tessera.executor.weights.hf import hf_config
from tessera.executor.weights.quant import QuantizedWeight, convert_checkpoint, quant_config

# Where the 4-bit weights multiply: the kernels run natively on a CUDA device, interpreted
# on the CPU (tests/conftest.py). Float32 is exact enough on the CPU; on the GPU Triton's
# float32 dot rounds its inputs to tf32, so the bound there is tf32's.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = dict(rtol=1e-5, atol=1e-5) if DEVICE.type == "cpu" else dict(rtol=5e-3, atol=5e-3)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "models"
GPTQ_DIR = SHARED / "smollm2-135m-gptq-g64"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
TIE_NATS = 0.05  # the reference dequantizes in float16, we in float32: near-ties may flip

TINY = {  # a 1-layer Llama whose every K is a multiple of 128
    "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 96, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
LINEARS = {  # name -> (out, in)
    "self_attn.q_proj": (128, 128), "self_attn.k_proj": (64, 128),
    "self_attn.v_proj": (64, 128), "self_attn.o_proj": (128, 128),
    "mlp.gate_proj": (256, 128), "mlp.up_proj": (256, 128), "mlp.down_proj": (128, 256),
}  # fmt: skip


# ---- the packer -------------------------------------------------------------------


def _round_to_nearest(w: np.ndarray, g_idx: np.ndarray, sym: bool, groups: int):
    """w: [K, N] float32 -> codes [K, N], scales [G, N] float16, zeros [G, N], and the
    float32 weights they stand for, (code - zero) * scale."""
    k, n = w.shape
    codes = np.zeros((k, n), dtype=np.int64)
    scales = np.zeros((groups, n), dtype=np.float16)
    zeros = np.zeros((groups, n), dtype=np.int64)
    for g in range(groups):
        rows = g_idx == g
        lo = np.minimum(w[rows].min(axis=0), 0)
        hi = np.maximum(w[rows].max(axis=0), 0)
        if sym:
            scale = (np.maximum(-lo, hi) * 2 / 15).astype(np.float16)
            zero = np.full(n, 8)
        else:
            scale = ((hi - lo) / 15).astype(np.float16)
            zero = np.clip(np.round(-lo / scale.astype(np.float32)), 0, 15).astype(np.int64)
        codes[rows] = np.clip(np.round(w[rows] / scale.astype(np.float32)) + zero, 0, 15)
        scales[g], zeros[g] = scale, zero
    dequantized = (codes - zeros[g_idx]).astype(np.float32) * scales[g_idx].astype(np.float32)
    return codes, scales, zeros, dequantized


def _words(nibbles: np.ndarray) -> np.ndarray:
    """[..., 8] values 0..15, nibble j first-lowest -> [...] int32 bit patterns."""
    word = np.zeros(nibbles.shape[:-1], dtype=np.uint64)
    for j in range(8):
        word |= nibbles[..., j].astype(np.uint64) << np.uint64(4 * j)
    return word.astype(np.uint32).view(np.int32)


def _gptq_tensors(codes, scales, zeros, g_idx, v1: bool) -> dict[str, np.ndarray]:
    k, n = codes.shape
    stored = zeros - 1 if v1 else zeros
    assert stored.min() >= 0, "GPTQ v1 cannot store a zero point of 0"
    return {
        "qweight": _words(codes.reshape(k // 8, 8, n).transpose(0, 2, 1)),  # along K
        "qzeros": _words(stored.reshape(-1, n // 8, 8)),  # along N
        "scales": scales,
        "g_idx": g_idx.astype(np.int32),
    }


def _awq_tensors(codes, scales, zeros, with_zeros: bool) -> dict[str, np.ndarray]:
    k, n = codes.shape
    order = list(AWQ_ORDER)  # nibble j holds column 8c + order[j]
    out = {
        "qweight": _words(codes.reshape(k, n // 8, 8)[:, :, order]),
        "scales": scales,
    }
    if with_zeros:
        out["qzeros"] = _words(zeros.reshape(-1, n // 8, 8)[:, :, order])
    return out


VARIANTS = {  # name -> (method, group size, sym, act-order, GPTQ v1 / AWQ zero point)
    "gptq-v1-sym-actorder-g32": ("gptq", 32, True, True, True),
    "gptq-v2-asym-g64": ("gptq", 64, False, False, False),
    "gptq-v1-asym-actorder-g128": ("gptq", 128, False, True, True),
    "gptq-v2-sym-actorder-gall": ("gptq", -1, True, True, False),
    "awq-zp-g64": ("awq", 64, False, False, True),
    "awq-nozp-g32": ("awq", 32, True, False, False),
}


def write_checkpoint(directory: Path, variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny quantized checkpoint in ``directory``; returns the float32 [out, in] weights
    its linears stand for."""
    method, group_size, sym, act_order, flag = VARIANTS[variant]
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((96, 128)).astype(np.float32) * 0.02,
        "model.norm.weight": np.ones(128, dtype=np.float32),
        "model.layers.0.input_layernorm.weight": np.ones(128, dtype=np.float32),
        "model.layers.0.post_attention_layernorm.weight": np.ones(128, dtype=np.float32),
    }
    expected = {}
    for name, (n, k) in LINEARS.items():
        group = k if group_size == -1 else group_size
        g_idx = np.arange(k) // group
        if act_order:  # one order per input, as GPTQ's Hessian gives q/k/v and gate/up
            g_idx[np.random.default_rng(k).permutation(k)] = np.arange(k) // group
        w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
        codes, scales, zeros, dequantized = _round_to_nearest(w, g_idx, sym, k // group)
        if method == "gptq":
            parts = _gptq_tensors(codes, scales, zeros, g_idx, v1=flag)
        else:
            parts = _awq_tensors(codes, scales, zeros, with_zeros=flag)
        for part, value in parts.items():
            tensors[f"model.layers.0.{name}.{part}"] = value
        expected[f"model.layers.0.{name}.weight"] = torch.from_numpy(dequantized.T.copy())
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order,
              "sym": sym, "checkpoint_format": "gptq" if flag else "gptq_v2"}  # fmt: skip
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm",
              "zero_point": flag}  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**TINY, "quantization_config": qc}))
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
              str(directory / "model.safetensors"))  # fmt: skip
    return expected


# ---- the loader against the packer ------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_dequantizes_to_the_packed_weights(tmp_path, variant):
    expected = write_checkpoint(tmp_path, variant)
    loaded = load_weights(resolve_model(str(tmp_path)), device="cpu", progress=False)
    for name, w in expected.items():  # the CPU path: float32 weights, exactly
        assert loaded.tensors[name].dtype == torch.float32
        assert torch.equal(loaded.tensors[name], w), name
    # The device layout (sorted rows, perm, unpacked zeros) stands for the same weights.
    quant = quant_config(json.loads((tmp_path / "config.json").read_text()), "auto", "x")
    from safetensors.torch import load_file

    raw = {k: v for k, v in load_file(str(tmp_path / "model.safetensors"), str(DEVICE)).items()
           if ".layers." in k and not k.endswith("layernorm.weight")}  # fmt: skip
    converted = convert_checkpoint(raw, hf_config(tmp_path, "t"), quant, torch.float32, False)
    for name, w in expected.items():
        weight = converted[name]
        assert isinstance(weight, QuantizedWeight) and weight.shape == tuple(w.shape)
        assert torch.equal(weight.dequantize().cpu(), w), name
        x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(weight.linear(x.to(DEVICE)).cpu(), x @ w.t(), **TOL)


def test_quantized_weights_run_through_the_model(tmp_path):
    """The model's fused path (Triton kernels; interpreted on the CPU) with 4-bit weights
    (fused q/k/v and gate/up through the W4A16 GEMM) against the same model on their
    float32 dequantization."""
    from tessera.executor.models.llama import LlamaForCausalLM

    write_checkpoint(tmp_path, "gptq-v1-asym-actorder-g128")
    config = hf_config(tmp_path, "t")
    quant = quant_config(json.loads((tmp_path / "config.json").read_text()), "auto", "x")
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "model.safetensors"), str(DEVICE))
    quantized = convert_checkpoint(dict(raw), config, quant, torch.float32, False)
    dense = convert_checkpoint(dict(raw), config, quant, torch.float32, True)
    hidden = []
    for tensors in (quantized, dense):
        backend = TritonAttentionBackend()
        model = LlamaForCausalLM(config, tensors, DEVICE, max_positions=64,
                                 attention=backend, fused_kernels=True)  # fmt: skip
        assert isinstance(model.layers[0].qkv_w, QuantizedWeight) == (tensors is quantized)
        shape = (2, 16, config.num_key_value_heads, config.head_dim)
        caches = [(torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE))]
        meta = model.attention.build_metadata([9], [9], [[0]], 16, DEVICE)
        ids = torch.tensor([1, 5, 9, 33, 60, 2, 7, 90, 11], device=DEVICE)
        hidden.append(model.forward(ids, torch.arange(9, device=DEVICE), caches, meta))
    tol = dict(rtol=1e-4, atol=1e-4) if DEVICE.type == "cpu" else TOL
    torch.testing.assert_close(hidden[0], hidden[1], **tol)


# ---- configs ----------------------------------------------------------------------

GOOD = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq"}  # fmt: skip


@pytest.mark.parametrize(
    "change, requested, match",
    [
        ({"bits": 3}, "auto", "bits 3 is not supported"),
        ({"quant_method": "bitsandbytes"}, "auto", "quant_method 'bitsandbytes' is not supported"),
        ({"checkpoint_format": "marlin"}, "auto", "checkpoint_format 'marlin' is not supported"),
        ({"quant_method": "awq", "version": "gemv"}, "auto", "AWQ version 'gemv'"),
        ({"quant_method": "awq", "version": "exllama"}, "auto", "AWQ version 'exllama'"),
        ({"group_size": 20}, "auto", "group_size 20 is not a multiple of 16"),
        ({"lm_head": True}, "auto", "quantized lm_head"),
        ({}, "awq", "quantization='awq', but .* is quantized with 'gptq'"),
        ({}, "none", "is quantized .* but quantization='none'"),
        ({}, "int8", "quantization must be one of auto, none, gptq, awq"),
    ],
)
def test_bad_quantization_configs(change, requested, match):
    with pytest.raises(ValueError, match=match):
        quant_config({"quantization_config": {**GOOD, **change}}, requested, "ckpt")


def test_float_checkpoint_with_quantization_is_an_error(tmp_path, gguf_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(ValueError, match="has no quantization_config"):
        load_weights(resolve_model(str(tmp_path)), quantization="gptq", progress=False)
    with pytest.raises(ValueError, match="is a gguf model"):
        load_weights(resolve_model(str(gguf_path)), quantization="awq", progress=False)
    with pytest.raises(ValueError, match="quantization must be one of"):
        ExecutorConfig(quantization="fp4")


# ---- the real checkpoint ----------------------------------------------------------


def _follow(got: list[int], case: dict) -> None:
    """Greedy tokens equal the reference's, or part at a step whose top two are a near-tie."""
    for step, (ours, theirs) in enumerate(zip(got, case["greedy_ids"], strict=True)):
        if ours != theirs:
            top = case["top5"][step]
            gap = top[0][1] - top[1][1]
            assert ours == top[1][0] and gap < TIE_NATS, (
                f"{case['prompt']!r} step {step}: {ours} instead of {theirs} (gap {gap:.3f})"
            )
            return


@pytest.mark.slow
def test_real_gptq_checkpoint_follows_reference_greedy():
    reference = json.loads((GPTQ_DIR / "reference_greedy.json").read_text())
    cases = reference["cases"]
    llm = LLM(str(GPTQ_DIR), device="cpu", kv_cache_memory=1 << 26, show_progress=False)
    # The file's own formula (README): W[r, o] = (q - (stored zero + 1)) * scale[g_idx[r]].
    from safetensors import safe_open

    with safe_open(str(GPTQ_DIR / "model.safetensors"), "pt") as f:
        p = "model.layers.0.mlp.down_proj."
        qweight, qzeros = f.get_tensor(p + "qweight"), f.get_tensor(p + "qzeros")
        scales, g_idx = f.get_tensor(p + "scales").float(), f.get_tensor(p + "g_idx").long()
    rows = torch.arange(qweight.shape[0] * 8)
    q = (qweight[rows // 8] >> (4 * (rows % 8))[:, None]) & 0xF  # [K, N]
    cols = torch.arange(qweight.shape[1])
    z = ((qzeros[:, cols // 8] >> (4 * (cols % 8))[None, :]) & 0xF) + 1  # [G, N]
    w = ((q - z[g_idx]).float() * scales[g_idx]).t()
    model = llm.runner.model  # on the CPU the weights are float32 (oneDNN-packed)
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.linear(x, model.layers[0].down_w), x @ w.t(),
                               rtol=1e-5, atol=1e-5)  # fmt: skip

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompts = [case["prompt_ids"] for case in cases]
    alone = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    batched = llm.generate(prompts, params, use_tqdm=False)
    for case, one, many in zip(cases, alone, batched, strict=True):
        _follow(one.outputs[0].token_ids, case)
        _follow(many.outputs[0].token_ids, case)
    assert llm.engine.scheduler.num_free_blocks == llm.runner.num_blocks
