"""Constrained rows on the tensor path (Triton; interpreted on the CPU), pipelined against
one step at a time: a constrained row's next mask needs its last token on the host, so
``submit`` collects the step it waits for (executor/grammar.py). Both loops must give
the very same tokens, every finished output must full-match its regex (``re``), and
unconstrained rows in the same batches must still be fed on the device."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tessera.common.constraints import Constraint
from tessera.common.executor_config import ExecutorConfig
from tessera.common.plan import SamplingOptions
from tessera.executor.model_runner import ModelRunner
from tessera.scheduler import Request, Scheduler, SchedulerConfig, StopConditions

CUDA = torch.cuda.is_available()
EOS = 256
VOCAB = 260  # the 256 byte tokens, EOS, and three ids no text maps to


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (bytes as byte-level BPE spells them)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, moved = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + moved)
            moved += 1
    return [chars[b] for b in range(256)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer Llama with random weights and a byte-level tokenizer (one token a byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         eos_token_id=EOS)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-bytes")
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    vocab = {c: i for i, c in enumerate(_byte_chars())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<eos>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return str(directory)


def make_runner(model: str) -> ModelRunner:
    return ModelRunner(ExecutorConfig(
        model=model, device="cuda" if CUDA else "cpu", dtype="float32",
        attention_backend="triton", block_size=4, num_kv_blocks=256, max_num_seqs=16,
        max_num_batched_tokens=24, show_progress=False,
    ))


REGEXES = [r"[a-c]{2,4}x", r"(yes|no)", r"[0-9]{1,3}"]


def requests() -> list[Request]:
    out = []
    for i in range(6):
        prompt = [(11 * i + 5 * j) % 200 + 32 for j in range(3 + 4 * i % 11)]
        stop = StopConditions(max_tokens=8, eos_token_ids=(EOS,))
        if i % 3 == 2:  # an unconstrained row among them
            sampling = SamplingOptions(temperature=0.9, seed=i)
            stop = StopConditions(max_tokens=8, ignore_eos=True, eos_token_ids=(EOS,))
        else:
            sampling = SamplingOptions(temperature=1.0, seed=i,
                                       constraint=Constraint("regex", REGEXES[i % 3]))
        out.append(Request(f"r{i}", prompt, sampling, stop))
    return out


def run(runner: ModelRunner, pipelined: bool) -> dict[str, list[int]]:
    scheduler = Scheduler(SchedulerConfig(num_blocks=runner.num_blocks,
                                          block_size=runner.block_size,
                                          max_num_batched_tokens=24, max_num_seqs=16,
                                          max_model_len=128))
    reqs = requests()
    for request in reqs:
        scheduler.add_request(request)
    in_flight = None
    while scheduler.has_unfinished_requests() or in_flight is not None:
        plan = scheduler.schedule()
        submitted = None if plan.is_empty else (plan, runner.submit(plan))
        if not pipelined and submitted is not None:
            scheduler.update_from_result(plan, runner.collect(submitted[1]))
            submitted = None
        if in_flight is not None:
            scheduler.update_from_result(in_flight[0], runner.collect(in_flight[1]))
        in_flight = submitted
    assert scheduler.num_free_blocks == runner.num_blocks
    return {r.request_id: list(r.output_token_ids) for r in reqs}


def test_constrained_rows_pipelined_equal_one_at_a_time(tiny_model) -> None:
    runner = make_runner(tiny_model)
    assert runner.overlaps
    one_at_a_time = run(runner, pipelined=False)
    runner.requests.clear()
    pipelined = run(runner, pipelined=True)
    assert pipelined == one_at_a_time
    for i, request in enumerate(requests()):
        tokens = one_at_a_time[request.request_id]
        if request.sampling.constraint is None:
            assert len(tokens) == 8
            continue
        assert tokens[-1] == EOS, f"{request.request_id} ended without completing: {tokens}"
        text = bytes(tokens[:-1]).decode()
        assert re.fullmatch(REGEXES[i % 3], text), (REGEXES[i % 3], text)
