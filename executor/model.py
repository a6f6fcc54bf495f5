"""Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2) over a paged KV cache.

The forward pass takes one flattened batch of mixed prefill and decode tokens
(``input_ids: [T]``, ``positions: [T]``), writes each layer's new K/V into the pool
through the slot mapping and reads context back through block tables, via an
attention backend (``executor.attention``). Weights arrive as a dict in Hugging Face
naming from ``executor.weights``.

Numerics follow Hugging Face transformers (RMSNorm in float32, rotary tables built
in float32, neox-style rotate-half), so greedy tokens match it token for token in
float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from executor.attention import AttentionMetadata, TorchAttentionBackend
from executor.model_config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
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

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, H, D], k: [T, H_kv, D], positions: [T]
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaForCausalLM:
    """Weights plus a pure forward function; no autograd, no nn.Module machinery."""

    def __init__(
        self,
        config: ModelConfig,
        tensors: dict[str, torch.Tensor],
        device: torch.device,
        max_positions: int,
        attention: TorchAttentionBackend | None = None,
    ) -> None:
        self.config = config
        self.attention = attention or TorchAttentionBackend()
        self.scale = config.head_dim**-0.5
        self.embed = tensors["model.embed_tokens.weight"]
        self.lm_head = tensors.get("lm_head.weight", self.embed)
        self.norm = tensors["model.norm.weight"]
        self.layers = [_Layer(tensors, i, config) for i in range(config.num_hidden_layers)]
        self.rotary = RotaryEmbedding(config, max_positions, device, tensors.get("rope_freqs"))

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer ([N,B,Hkv,D], same)
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # hidden states [T, hidden]
        c = self.config
        h = F.embedding(input_ids, self.embed)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            x = rms_norm(h, layer.input_norm, c.rms_norm_eps)
            q = F.linear(x, layer.q_w, layer.q_b).view(-1, c.num_attention_heads, c.head_dim)
            k = F.linear(x, layer.k_w, layer.k_b).view(-1, c.num_key_value_heads, c.head_dim)
            v = F.linear(x, layer.v_w, layer.v_b).view(-1, c.num_key_value_heads, c.head_dim)
            q, k = self.rotary.apply(q, k, positions)
            self.attention.write_kv(k, v, k_cache, v_cache, meta)
            o = self.attention.forward(q, k_cache, v_cache, meta, self.scale)  # [T, H, D]
            h = h + F.linear(o.reshape(o.shape[0], -1), layer.o_w)
            x = rms_norm(h, layer.post_norm, c.rms_norm_eps)
            h = h + F.linear(
                F.silu(F.linear(x, layer.gate_w)) * F.linear(x, layer.up_w), layer.down_w
            )
        return rms_norm(h, self.norm, c.rms_norm_eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V]
        return F.linear(hidden, self.lm_head)


class _Layer:
    __slots__ = (
        "input_norm",
        "post_norm",
        "q_w",
        "k_w",
        "v_w",
        "o_w",
        "q_b",
        "k_b",
        "v_b",
        "gate_w",
        "up_w",
        "down_w",
    )

    def __init__(self, t: dict[str, torch.Tensor], i: int, config: ModelConfig) -> None:
        p = f"model.layers.{i}."
        self.input_norm = t[p + "input_layernorm.weight"]
        self.post_norm = t[p + "post_attention_layernorm.weight"]
        self.q_w = t[p + "self_attn.q_proj.weight"]
        self.k_w = t[p + "self_attn.k_proj.weight"]
        self.v_w = t[p + "self_attn.v_proj.weight"]
        self.o_w = t[p + "self_attn.o_proj.weight"]
        self.q_b = t.get(p + "self_attn.q_proj.bias")
        self.k_b = t.get(p + "self_attn.k_proj.bias")
        self.v_b = t.get(p + "self_attn.v_proj.bias")
        if config.attention_bias and self.q_b is None:
            raise ValueError(f"layer {i}: the model has attention bias but no q_proj.bias")
        self.gate_w = t[p + "mlp.gate_proj.weight"]
        self.up_w = t[p + "mlp.up_proj.weight"]
        self.down_w = t[p + "mlp.down_proj.weight"]
