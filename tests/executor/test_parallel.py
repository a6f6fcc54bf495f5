"""Tensor-parallel layers (executor.parallel) at N = 2 and 3 against the unsharded ones.

Each case starts N ranks that join one gloo group and run, on the same seeded float32
inputs: a column-parallel and a row-parallel linear, the vocabulary-parallel embedding
and LM head, and the whole Llama forward pass over a paged KV cache (prefill then a
decode step), each compared with the same computation on the full weights. At N = 2
the model has 1 KV head (replicated on both ranks), at N = 3 it has 3 (split). The
tolerance allows for the all-reduce's summation order. This file is also the ranks'
script (``python test_parallel.py RANK N INIT OUT``).

Shapes that cannot be split are refused with the dimension named, without a process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOLERANCE = 1e-5


def _config(world_size: int):
    from tessera.common.model_config import ModelConfig

    heads, kv = (4, 1) if world_size == 2 else (6, 3)
    return ModelConfig(
        architecture="llama", vocab_size=96, hidden_size=48, intermediate_size=60,
        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
        tie_word_embeddings=world_size == 3, name=f"tiny-{world_size}",
    )  # fmt: skip


def _rank_main(rank: int, world_size: int, init: str, out: str) -> None:
    """One rank: every layer sharded vs full; rank 0 writes the largest errors."""
    import torch
    import torch.nn.functional as F

    from tessera.executor import parallel as tp
    from tessera.executor.attention import TorchAttentionBackend
    from tessera.executor.models.llama import LlamaForCausalLM
    from tessera.executor.weights.layout import expected_shapes

    group, device = tp.init_group(rank, world_size, init, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)  # the same draws on every rank
    errors: dict[str, float] = {}

    def err(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        errors[name] = max(errors.get(name, 0.0), (got - want).abs().max().item())

    # Linears: out 30, in 36 (both split by 2 and 3).
    w = torch.randn(30, 36, generator=g)
    b = torch.randn(30, generator=g)
    x = torch.randn(5, 36, generator=g)
    rows, cols = 30 // world_size, 36 // world_size
    w_rows = w[rank * rows : (rank + 1) * rows]
    part = tp.column_parallel_linear(x, w_rows, b[rank * rows : (rank + 1) * rows])
    err("column_parallel", group.all_gather_last(part), F.linear(x, w, b))
    w_cols = w[:, rank * cols : (rank + 1) * cols]
    x_cols = x[:, rank * cols : (rank + 1) * cols].contiguous()
    err("row_parallel", tp.row_parallel_linear(x_cols, w_cols, group), F.linear(x, w))
    table = torch.randn(96, 36, generator=g)
    ids = torch.tensor([0, 95, 31, 32, 63, 64, 5, 5])  # both edges of every shard
    shard_rows = table[rank * 96 // world_size : (rank + 1) * 96 // world_size]
    err("embedding", tp.vocab_parallel_embedding(ids, shard_rows, group), F.embedding(ids, table))
    err("lm_head", tp.parallel_lm_head(x, shard_rows, group), F.linear(x, table))

    # The model: a 7-token prefill and a decode step of 2 requests, logits compared.
    config = _config(world_size)
    shapes = expected_shapes(config)
    full = {name: torch.randn(shape, generator=g) * 0.3 for name, shape in shapes.items()}
    shard = tp.TensorShard(config, rank, world_size)
    mine = {name: shard.take(name, t) for name, t in full.items()}
    for name, tensors, grp in (("model", mine, group), ("reference", dict(full), None)):
        model = LlamaForCausalLM(config, tensors, device, 64, group=grp)
        kv_heads = model.num_kv_heads
        caches = [(torch.zeros(8, 4, kv_heads, 8), torch.zeros(8, 4, kv_heads, 8))
                  for _ in range(2)]  # fmt: skip
        att = model.attention
        logits = []
        meta = att.build_metadata([7, 3], [7, 3], [[0, 1], [2]], 4, device)
        tokens = torch.tensor([1, 2, 3, 4, 95, 50, 7, 60, 61, 62])
        positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2])
        hidden = model.forward(tokens, positions, caches, meta)
        logits.append(model.compute_logits(hidden[[6, 9]]))
        meta = att.build_metadata([1, 1], [8, 4], [[0, 1], [2]], 4, device)
        hidden = model.forward(torch.tensor([9, 10]), torch.tensor([7, 3]), caches, meta)
        logits.append(model.compute_logits(hidden))
        if name == "model":
            got = torch.cat(logits)
        else:
            err("model_logits", got, torch.cat(logits))
    assert isinstance(att, TorchAttentionBackend)
    if rank == 0:
        Path(out).write_text(json.dumps(errors))
    tp.destroy_group()


def _run_ranks(tmp_path: Path, world_size: int) -> dict[str, float]:
    init = f"file://{tmp_path}/rendezvous"
    out = tmp_path / "errors.json"
    procs = [
        subprocess.Popen(
            [sys.executable, "-P", __file__, str(rank), str(world_size), init, str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for rank in range(world_size)
    ]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_layers_and_model_equal_the_unsharded_ones(tmp_path, world_size):
    errors = _run_ranks(tmp_path, world_size)
    assert set(errors) == {
        "column_parallel", "row_parallel", "embedding", "lm_head", "model_logits",
    }  # fmt: skip
    assert max(errors.values()) < TOLERANCE, errors
    assert errors["embedding"] == 0.0  # one owner per row: nothing summed but zeros


def test_shapes_that_cannot_be_split_name_the_dimension():
    import dataclasses

    from tessera.executor.parallel import check_splittable

    config = _config(3)  # 6 heads, 3 KV heads, intermediate 60, vocab 96
    check_splittable(config, 3)
    check_splittable(config, 6)  # 3 KV heads, each on 2 ranks
    with pytest.raises(ValueError, match="num_attention_heads 6 is not a multiple of 4"):
        check_splittable(config, 4)
    with pytest.raises(ValueError, match="num_key_value_heads 3"):
        check_splittable(config, 2)
    with pytest.raises(ValueError, match="intermediate_size 60"):
        check_splittable(dataclasses.replace(config, num_attention_heads=9), 9)
    with pytest.raises(ValueError, match="vocab_size 97"):
        check_splittable(dataclasses.replace(config, vocab_size=97), 3)


@pytest.mark.parametrize("rank", [0, 1])
def test_random_weights_are_sliced_as_each_is_drawn(monkeypatch, rank):
    """A rank's random weights are its slices of the very model every N draws (each
    tensor drawn whole, by its name's seed), and a split tensor's whole is gone before
    the next one is drawn: a rank never holds the whole model (Llama-3.1-70B does not
    fit one GPU), only its slices and one whole tensor."""
    import weakref

    import torch

    from tessera.common.registry import random_config, resolve_model
    from tessera.executor.parallel import TensorShard
    from tessera.executor.weights import load_weights
    from tessera.executor.weights import random as random_weights

    source = resolve_model("random:qwen2.5-0.5b")  # 14 heads, 2 KV heads: split by 2
    full = load_weights(source, torch.float32, "meta", progress=False).tensors
    shard = TensorShard(random_config("qwen2.5-0.5b"), rank, 2)
    drawn: list[tuple[str, weakref.ref]] = []
    real = random_weights._random_tensor

    def draw(name, size, dtype, device, seed):
        alive = [n for n, ref in drawn if ref() is not None and shard.spec(n) is not None]
        assert not alive, f"drawing {name} while the whole of {alive} is still held"
        tensor = real(name, size, dtype, torch.device("cpu"), seed)
        drawn.append((name, weakref.ref(tensor)))
        return tensor

    monkeypatch.setattr(random_weights, "_random_tensor", draw)
    layers = [n for n in full if ".layers.0." in n or ".layers." not in n]
    monkeypatch.setattr(random_weights, "expected_shapes",
                        lambda config: {n: tuple(full[n].shape) for n in layers})  # fmt: skip
    sliced = load_weights(source, torch.float32, "cpu", progress=False, shard=shard).tensors
    assert set(sliced) == set(layers) and len(drawn) == len(layers)
    split = 0
    for name in layers:
        whole = real(name, tuple(full[name].shape), torch.float32, torch.device("cpu"), 0)
        assert torch.equal(sliced[name], shard.take(name, whole)), name
        split += shard.spec(name) is not None
    assert split >= 8  # embedding, LM head, q/k/v/o, gate/up/down of layer 0


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
