"""The model runner pipelined (the next plan submitted before the last is collected)
against the same runner one step at a time.

With the tensor path (Triton kernels; interpreted on the CPU, compiled with CUDA
graphs on a GPU) ``submit`` returns with the sampled tokens still on the device, and a
plan submitted next takes them from there. Without EOS or stop tokens both loops run
the very same batches, so every token and logprob must be equal, whatever the
sampling: greedy, seeded with top-k/top-p, logprobs, min_tokens, logit_bias, and
penalties (which read the output history on the host, so submit collects first).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tessera.common.executor_config import ExecutorConfig
from tessera.common.plan import SamplingOptions
from tessera.executor.model_runner import ModelRunner
from tessera.scheduler import Request, Scheduler, SchedulerConfig, StopConditions

CUDA = torch.cuda.is_available()
VOCAB = 96


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer Llama with random weights, as a Hugging Face directory."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


def make_runner(model: str) -> ModelRunner:
    return ModelRunner(
        ExecutorConfig(
            model=model,
            device="cuda" if CUDA else "cpu",
            dtype="float32",
            attention_backend="triton",
            block_size=4,
            num_kv_blocks=256,
            max_num_seqs=16,
            max_num_batched_tokens=24,
            show_progress=False,
        )
    )


SAMPLINGS = [
    SamplingOptions(temperature=0.0),
    SamplingOptions(temperature=0.9, top_k=8, seed=11),
    SamplingOptions(temperature=1.0, top_p=0.8, seed=5, logprobs=3),
    SamplingOptions(temperature=0.0, logprobs=0, logit_bias=((7, 3.0),)),
    SamplingOptions(temperature=0.7, seed=3, min_tokens=4, min_tokens_blocked_ids=(1, 2)),
    SamplingOptions(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.3),
]


def requests() -> list[Request]:
    out = []
    for i in range(8):  # more prompt tokens than one step's budget: chunked prefills
        prompt = [(7 * i + 3 * j) % VOCAB for j in range(3 + 5 * i % 17)]
        stop = StopConditions(max_tokens=6 + i % 5, ignore_eos=True)
        out.append(Request(f"r{i}", prompt, SAMPLINGS[i % len(SAMPLINGS)], stop))
    return out


def run(runner: ModelRunner, pipelined: bool) -> dict[str, tuple[list[int], list]]:
    scheduler = Scheduler(
        SchedulerConfig(
            num_blocks=runner.num_blocks,
            block_size=runner.block_size,
            max_num_batched_tokens=24,
            max_num_seqs=16,
            max_model_len=128,
        )
    )
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
        scheduler.check_invariants()
    assert scheduler.num_free_blocks == runner.num_blocks
    return {r.request_id: (r.output_token_ids, r.output_logprobs) for r in reqs}


def test_pipelined_steps_equal_one_at_a_time(tiny_model, monkeypatch):
    runner = make_runner(tiny_model)
    assert runner.overlaps
    one_at_a_time = run(runner, pipelined=False)

    fed_on_device = []  # steps whose inputs came from the step before, on the device
    original = runner._pending_inputs

    def spy(dst, src):
        fed_on_device.append(len(dst))
        return original(dst, src)

    monkeypatch.setattr(runner, "_pending_inputs", spy)
    runner.requests.clear()
    pipelined = run(runner, pipelined=True)

    assert sum(n > 0 for n in fed_on_device) >= 3, "the loop never ran ahead"
    for request_id, (tokens, logprobs) in one_at_a_time.items():
        tokens_p, logprobs_p = pipelined[request_id]
        assert tokens_p == tokens, request_id
        assert len(logprobs_p) == len(logprobs)
        for a, b in zip(logprobs, logprobs_p, strict=True):
            assert (a.token_id, a.rank) == (b.token_id, b.rank)
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    # The reference itself is no constant: the sampled streams differ between requests.
    assert len({tuple(t) for t, _ in one_at_a_time.values()}) > 5


@pytest.mark.parametrize(
    "bad",
    [SamplingOptions(top_p=0.0), SamplingOptions(logit_bias=((VOCAB, 1.0),))],
    ids=["top_p-0", "bias-outside-vocab"],
)
def test_options_are_checked_when_a_request_arrives(tiny_model, bad):
    """Sampling options are checked once, in the plan that brings the request (steps
    after it pack them unchecked): a bad one fails that plan with its ValueError and
    the request is not taken in."""
    from tessera.common.plan import NewRequestData, StepPlan

    runner = make_runner(tiny_model)
    new = NewRequestData("bad", [1, 2, 3], 3, bad, [0])
    plan = StepPlan(new_requests=[new], num_scheduled_tokens={"bad": 3})
    with pytest.raises(ValueError, match="top_p|vocabulary"):
        runner.execute(plan)
    assert "bad" not in runner.requests
