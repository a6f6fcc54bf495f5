"""The CPU model's matmuls on oneDNN-packed weights, against a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.executor.models.llama import _packed_linear, onednn_linear_available, pack_weight

pytestmark = pytest.mark.skipif(
    not onednn_linear_available(torch.float32), reason="this torch build has no oneDNN"
)


@pytest.mark.parametrize("rows", [1, 3, 16, 64, 517])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_matmul_is_float32_accurate(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(960, 576, generator=g)
    b = torch.randn(960, generator=g) if bias else None
    x = torch.randn(rows, 576, generator=g)
    got = _packed_linear(x, pack_weight(w), b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (rows, 960)
    # float32 rounding over a 576-term dot product, not a lower-precision path
    # (bf16 would be off by ~1e-2 relative).
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_the_cpu_model_runs_its_matmuls_on_packed_weights():
    from dataclasses import replace

    from tessera.common.registry import random_config
    from tessera.executor.models.llama import LlamaForCausalLM
    from tessera.executor.weights.layout import expected_shapes

    c = replace(
        random_config("smollm2-135m"),  # tied embeddings
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    assert c.tie_word_embeddings
    g = torch.Generator().manual_seed(0)
    shapes = expected_shapes(c)
    tensors = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    embed = tensors["model.embed_tokens.weight"]
    model = LlamaForCausalLM(c, tensors, torch.device("cpu"), 64)
    assert model.linear is _packed_linear
    assert model.layers[0].gate_up_w.is_mkldnn and model.lm_head.is_mkldnn
    hidden = torch.randn(3, 32, generator=g)
    # Tied weights: the embedding table stays a dense tensor, the head is a packed copy.
    assert model.embed is embed and not model.embed.is_mkldnn
    torch.testing.assert_close(
        model.compute_logits(hidden).double(),
        hidden.double() @ embed.double().T,
        rtol=1e-5,
        atol=1e-5,
    )
