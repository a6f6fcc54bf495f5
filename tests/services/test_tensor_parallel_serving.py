"""``tessera serve --tensor-parallel-size 2`` on the CPU (gloo): streams through gRPC, and
a rank SIGKILLed mid-stream fails the whole group, which is replaced: every stream
completes token-exact and no process of the old group is left.

The model is a tiny Llama made here in Hugging Face format with SmolLM2's tokenizer (so
the gateway's text prompts tokenize into its vocabulary); 4 heads and 2 KV heads split
over the two ranks.
"""

from __future__ import annotations

import os
import signal

import grpc
import pytest
import torch

from tests.proctable import cmdline, descendants, wait_gone
from tests.services.launch import Server
from tests.services.test_failures import request, run_streams

pytestmark = pytest.mark.slow

NUM_STREAMS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory, hf_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(hf_tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, initializer_range=0.2, torch_dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    hf_tokenizer.save_pretrained(path)
    s = Server(
        tmp_path_factory.mktemp("tp-serve"), model=str(path), tensor_parallel_size=2,
        max_num_seqs=8, kv_cache_memory=1 << 24, device="cpu",
    )  # fmt: skip
    yield s
    s.stop()


def ranks(server: Server) -> dict[int, int]:
    """Executor pid by rank, among the launcher's live descendants."""
    found = {}
    for pid in descendants(server.proc.pid):
        line = cmdline(pid)
        if "tessera.executor" in line:
            rank = int(line.split("--tensor-parallel-rank=")[1].split()[0])
            assert rank not in found, f"two processes of rank {rank}"
            found[rank] = pid
    return found


def test_a_killed_rank_fails_the_group_and_every_stream_completes_token_exact(server):
    requests = [request(i, max_tokens=16) for i in range(NUM_STREAMS)]
    expected, _ = run_streams(server, requests)
    for out in expected:
        assert out.code == grpc.StatusCode.OK and len(out.tokens) == 16, out.details
    before = ranks(server)
    assert sorted(before) == [0, 1]
    outs, _ = run_streams(server, requests, lambda: os.kill(before[1], signal.SIGKILL))
    for i, (out, want) in enumerate(zip(outs, expected, strict=True)):
        assert out.code == grpc.StatusCode.OK, out.details
        assert out.tokens == want.tokens, f"stream {i}: tokens lost or repeated"
    for pid in before.values():  # rank 0 too: killed with its group, and reaped
        assert wait_gone(pid, 10), f"pid {pid} of the old group is left"
    after = ranks(server)
    assert sorted(after) == [0, 1] and not set(after.values()) & set(before.values())
