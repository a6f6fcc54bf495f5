"""Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2) over a paged KV cache.

The forward pass takes one flattened batch of mixed prefill and decode tokens
(``input_ids: [T]``, ``positions: [T]``), writes each layer's new K/V into the pool
through the slot mapping and reads context back through block tables, via an
attention backend (``executor.attention``). Weights arrive as a dict in Hugging Face
naming from ``executor.weights``.

Numerics follow Hugging Face transformers (RMSNorm in float32, rotary tables built
in float32, neox-style rotate-half), so greedy tokens match it token for token in
float32.

Registered in ``executor.models`` for the architectures ``llama``, ``mistral`` and
``qwen2``: one forward pass, the differences carried by ``ModelConfig`` flags.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tessera.common.model_config import ModelConfig
from tessera.executor.attention import TorchAttentionBackend
from tessera.executor.parallel import TPGroup, local_heads, vocab_parallel_embedding
from tessera.executor.weights import quant


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # The same operations in one ATen kernel (bit-identical in float32, ~4x faster).
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rope_inv_freq(config: ModelConfig, rope_freqs: torch.Tensor | None) -> torch.Tensor:
    """Inverse frequencies [D/2] in float32, with Llama 3 / linear scaling applied."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_freqs is not None:
        # GGUF files of Llama 3 models carry the scaling as per-frequency divisors.
        return inv_freq / rope_freqs.float().cpu()
    if kind in ("default", None):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")


class RotaryEmbedding:
    """cos/sin tables [max_pos, D] indexed by position, neox (rotate-half) layout."""

    def __init__(
        self,
        config: ModelConfig,
        max_positions: int,
        device: torch.device,
        rope_freqs: torch.Tensor | None = None,
    ) -> None:
        inv_freq = rope_inv_freq(config, rope_freqs)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = emb.cos().to(device)
        self.sin = emb.sin().to(device)

    def tables(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, D] of a step's positions: looked up once, used by every layer."""
        return (
            self.cos[positions].unsqueeze(1).to(dtype),
            self.sin[positions].unsqueeze(1).to(dtype),
        )

    @staticmethod
    def apply(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, H, D], k: [T, H_kv, D], cos / sin: [T, 1, D]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def onednn_linear_available(dtype: torch.dtype) -> bool:
    """Whether this torch build can run a float32 matmul on oneDNN-packed weights here
    (and gets the same numbers as F.linear on a small case)."""
    if dtype != torch.float32:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(40, 72, generator=g)
        x = torch.randn(5, 72, generator=g)
        got = _packed_linear(x, pack_weight(w))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return torch.allclose(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked layout of a [out, in] weight: an opaque tensor that only
    ``_packed_linear`` reads."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)


def _packed_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class LlamaForCausalLM:
    """Weights plus a pure forward function; no autograd, no nn.Module machinery.

    Each layer's q/k/v projections are stored as one matrix, and gate/up as another,
    so a layer runs four matmuls. With ``fused_kernels`` (the CUDA path) the glue runs
    in Triton kernels: RMSNorm fused with the residual add, rotary in place on views
    of the qkv output, SiLU-and-multiply; otherwise in plain torch with Hugging Face's
    numerics.

    On the CPU in float32 the weights are repacked once into oneDNN's blocked layout
    and every matmul runs there (``pack_weight``): 1.4x F.linear's rate at 64 rows and
    about 2x at 1 to 16 rows on the 2-core AMD EPYC development VM, where the stock path (MKL's
    sgemm) is slow on small batches; the result is float32 all the same (relative
    error ~1e-6 against float64, as F.linear's). A build without oneDNN keeps F.linear.
    """

    def __init__(
        self,
        config: ModelConfig,
        tensors: dict[str, torch.Tensor],
        device: torch.device,
        max_positions: int,
        attention=None,
        fused_kernels: bool = False,
        group: TPGroup | None = None,
    ) -> None:
        self.config = config
        # Tensor parallel: the weights are this rank's shards (executor.parallel), the
        # heads below are this rank's, and o/down/embedding are all-reduced.
        self.group = group or TPGroup.single()
        self.num_heads, self.num_kv_heads = local_heads(config, self.group)
        self.attention = attention or TorchAttentionBackend()
        self.fused_kernels = fused_kernels
        self.scale = config.head_dim**-0.5
        self.embed = tensors["model.embed_tokens.weight"]
        self.lm_head = tensors.get("lm_head.weight", self.embed)
        self.norm = tensors["model.norm.weight"]
        self.layers = [_Layer(tensors, i, config) for i in range(config.num_hidden_layers)]
        self.linear = quant.linear  # F.linear, or a 4-bit weight's GEMM (GPTQ / AWQ)
        if device.type == "cpu" and not fused_kernels and onednn_linear_available(self.embed.dtype):
            self.linear = _packed_linear
            self.lm_head = pack_weight(self.lm_head)  # a copy when tied: embed stays dense
            for layer in self.layers:
                for name in ("qkv_w", "o_w", "gate_up_w", "down_w"):
                    setattr(layer, name, pack_weight(getattr(layer, name)))
        self.rotary = RotaryEmbedding(config, max_positions, device, tensors.get("rope_freqs"))
        c = config
        self.q_size = self.num_heads * c.head_dim
        self.kv_size = self.num_kv_heads * c.head_dim
        if fused_kernels:
            from tessera.kernels.rotary import build_cos_sin_cache

            inv_freq = rope_inv_freq(c, tensors.get("rope_freqs"))
            self.cos_sin = build_cos_sin_cache(inv_freq, max_positions, device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer ([N,B,Hkv,D], same)
        meta,
    ) -> torch.Tensor:  # hidden states [T, hidden]
        if self.fused_kernels:
            return self._forward_fused(input_ids, positions, kv_caches, meta)
        c = self.config
        reduce = self.group.all_reduce
        h = vocab_parallel_embedding(input_ids, self.embed, self.group)
        cos, sin = self.rotary.tables(positions, h.dtype)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            x = rms_norm(h, layer.input_norm, c.rms_norm_eps)
            q, k, v = self._qkv(x, layer)
            q, k = self.rotary.apply(q, k, cos, sin)
            self.attention.write_kv(k, v, k_cache, v_cache, meta)
            o = self.attention.forward(q, k_cache, v_cache, meta, self.scale)  # [T, H, D]
            h = h + reduce(self.linear(o.reshape(o.shape[0], -1), layer.o_w))
            x = rms_norm(h, layer.post_norm, c.rms_norm_eps)
            gate, up = self.linear(x, layer.gate_up_w).chunk(2, dim=-1)
            h = h + reduce(self.linear(F.silu(gate) * up, layer.down_w))
        return rms_norm(h, self.norm, c.rms_norm_eps)

    def _qkv(self, x: torch.Tensor, layer: _Layer):
        c = self.config
        qkv = self.linear(x, layer.qkv_w, layer.qkv_b)
        q = qkv[:, : self.q_size].view(-1, self.num_heads, c.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size]
        v = qkv[:, self.q_size + self.kv_size :]
        return (
            q,
            k.view(-1, self.num_kv_heads, c.head_dim),
            v.view(-1, self.num_kv_heads, c.head_dim),
        )

    def _forward_fused(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        from tessera.kernels.activation import silu_and_mul
        from tessera.kernels.norm import fused_add_rms_norm
        from tessera.kernels.norm import rms_norm as rms_norm_kernel
        from tessera.kernels.rotary import apply_rotary_

        c = self.config
        eps = c.rms_norm_eps
        reduce = self.group.all_reduce
        residual = vocab_parallel_embedding(input_ids, self.embed, self.group)
        x = rms_norm_kernel(residual, self.layers[0].input_norm, eps)
        num_layers = len(self.layers)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches, strict=True)):
            q, k, v = self._qkv(x, layer)
            apply_rotary_(q, k, positions, self.cos_sin)
            self.attention.write_kv(k, v, k_cache, v_cache, meta)
            o = self.attention.forward(q, k_cache, v_cache, meta, self.scale)
            x = reduce(self.linear(o.reshape(o.shape[0], -1), layer.o_w))
            fused_add_rms_norm(x, residual, layer.post_norm, eps)  # residual += x; x = norm
            x = reduce(self.linear(silu_and_mul(self.linear(x, layer.gate_up_w)), layer.down_w))
            next_norm = self.layers[i + 1].input_norm if i + 1 < num_layers else self.norm
            fused_add_rms_norm(x, residual, next_norm, eps)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V]
        # Tensor parallel: each rank's vocabulary slice, gathered whole on every rank.
        return self.group.all_gather_last(self.linear(hidden, self.lm_head))


class _Layer:
    __slots__ = ("input_norm", "post_norm", "qkv_w", "qkv_b", "o_w", "gate_up_w", "down_w")

    def __init__(self, t: dict[str, torch.Tensor], i: int, config: ModelConfig) -> None:
        p = f"model.layers.{i}."
        self.input_norm = t[p + "input_layernorm.weight"]
        self.post_norm = t[p + "post_attention_layernorm.weight"]
        names = ("q_proj", "k_proj", "v_proj")
        # One matrix, and the three originals dropped, so weights are held once.
        self.qkv_w = quant.cat_out_features([t.pop(p + f"self_attn.{n}.weight") for n in names])
        biases = [t.pop(p + f"self_attn.{n}.bias", None) for n in names]
        if config.attention_bias and biases[0] is None:
            raise ValueError(f"layer {i}: the model has attention bias but no q_proj.bias")
        self.qkv_b = torch.cat(biases) if biases[0] is not None else None
        self.o_w = t[p + "self_attn.o_proj.weight"]
        self.gate_up_w = quant.cat_out_features(
            [t.pop(p + "mlp.gate_proj.weight"), t.pop(p + "mlp.up_proj.weight")]
        )
        self.down_w = t[p + "mlp.down_proj.weight"]
