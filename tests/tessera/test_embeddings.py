"""LLM.embed against Hugging Face transformers on the same GGUF weights.

The reference is transformers' last hidden state (after the model's final norm, as
``output_hidden_states`` gives it) averaged over every prompt position, float32 on both
sides. It must hold alone, batched, with the prompt chunked over several steps, over a
prompt whose blocks the prefix cache already holds, and with generating requests in the
same steps (whose tokens stay exactly what they are without the embeddings beside them).
"""

from __future__ import annotations

import math

import pytest
import torch

from tessera import LLM, SamplingParams

pytestmark = pytest.mark.slow  # whole-model runs

REL_TOLERANCE = 1e-4
_LONG = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden screw press. "
)
TEXTS = ["Hello, my name is", "def fibonacci(n):\n    ", _LONG * 4 + "Summary:"]


@pytest.fixture(scope="module")
def prompts(hf_tokenizer) -> list[list[int]]:
    ids = [hf_tokenizer(t).input_ids for t in TEXTS]
    assert len(ids[0]) < 8 and len(ids[-1]) > 100
    return ids


@pytest.fixture(scope="module")
def reference(hf_model, prompts) -> list[torch.Tensor]:
    refs = []
    with torch.inference_mode():
        for ids in prompts:
            out = hf_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            last = out.hidden_states[-1][0]  # [T, H]
            # after the final norm: what the base model hands the LM head
            base = hf_model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            assert torch.equal(last, base)
            refs.append(last.mean(dim=0))
    return refs


def make_llm(**kwargs) -> LLM:
    return LLM(
        "smollm2-135m-instruct", device="cpu", dtype="float32", show_progress=False, **kwargs
    )


def assert_close(ours: list[list[float]], reference: list[torch.Tensor], label: str) -> None:
    assert len(ours) == len(reference)
    for i, (vector, ref) in enumerate(zip(ours, reference, strict=True)):
        got = torch.tensor(vector)
        assert got.shape == ref.shape, f"{label} {i}: {got.shape} vs {ref.shape}"
        error = float((got - ref).norm() / ref.norm())
        assert error < REL_TOLERANCE, f"{label} prompt {i}: relative error {error:.2e}"


def test_alone_batched_and_normalised(prompts, reference):
    llm = make_llm()
    alone = [llm.embed([p], normalize=False, use_tqdm=False)[0] for p in prompts]
    assert_close(alone, reference, "alone")
    batched = llm.embed(prompts, normalize=False, use_tqdm=False)
    assert_close(batched, reference, "batched")
    unit = llm.embed(TEXTS, use_tqdm=False)  # text in, normalised by default
    assert_close(unit, [r / r.norm() for r in reference], "normalised")
    assert all(math.isclose(math.hypot(*v), 1.0, rel_tol=1e-6) for v in unit)
    assert llm.engine.scheduler.num_free_blocks == llm.runner.num_blocks
    with pytest.raises(ValueError, match="empty"):
        llm.embed([[]])


def test_chunked_and_over_a_cached_prefix(prompts, reference):
    budget = 16
    llm = make_llm(max_num_batched_tokens=budget)
    assert len(prompts[-1]) > 6 * budget  # the long prompt takes several steps
    steps = []
    schedule = llm.engine.scheduler.schedule

    def recording_schedule():
        plan = schedule()
        steps.append(dict(plan.num_scheduled_tokens))
        return plan

    llm.engine.scheduler.schedule = recording_schedule
    chunked = llm.embed(prompts, normalize=False, use_tqdm=False)
    assert_close(chunked, reference, f"chunked by {budget}")
    assert max(sum(s.values()) for s in steps) <= budget
    assert sum(1 for s in steps if any(n for n in s.values())) > 6

    # The prompt's blocks are cached now (embed requests register what they compute):
    # a generating request reuses them, an embedding does not (it needs every position).
    scheduler = llm.engine.scheduler
    params = SamplingParams(temperature=0.0, max_tokens=2)
    [out] = llm.generate([prompts[-1]], params, use_tqdm=False)
    assert out.num_cached_tokens >= 96
    hits = scheduler.num_prefix_cache_hits
    again = llm.embed([prompts[-1]], normalize=False, use_tqdm=False)
    assert scheduler.num_prefix_cache_hits == hits
    assert_close(again, reference[-1:], "over a cached prefix")
    assert scheduler.num_free_blocks == llm.runner.num_blocks


def run_mixed(llm: LLM, prompts: list[list[int]], params: SamplingParams):
    """Generating requests and embeddings added together and stepped to the end; returns
    (tokens by generating request, vectors by embed request, the steps' request ids)."""
    engine = llm.engine
    for i, ids in enumerate(prompts):
        engine.add_sequence(f"gen-{i}", ids, params)
        engine.add_embedding(f"emb-{i}", ids)
    steps, tokens, vectors = [], {}, {}
    schedule = engine.scheduler.schedule

    def recording_schedule():
        plan = schedule()
        steps.append(set(plan.num_scheduled_tokens))
        return plan

    engine.scheduler.schedule = recording_schedule
    while engine.has_unfinished():
        for seq in engine.step():
            if seq.finished:
                if seq.request_id.startswith("gen"):
                    tokens[seq.request_id] = seq.token_ids
                else:
                    vectors[seq.request_id] = seq.embedding
    engine.scheduler.schedule = schedule
    return tokens, vectors, steps


def test_mixed_with_generating_requests(prompts, reference):
    llm = make_llm(max_num_batched_tokens=32)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(prompts, params, use_tqdm=False)
    llm.reset_prefix_cache()
    tokens, vectors, steps = run_mixed(llm, prompts, params)
    for i, out in enumerate(alone):
        assert tokens[f"gen-{i}"] == out.outputs[0].token_ids, f"prompt {i}"
    assert_close([vectors[f"emb-{i}"] for i in range(len(prompts))], reference, "mixed")
    shared = [s for s in steps if any(r.startswith("gen") for r in s)
              and any(r.startswith("emb") for r in s)]  # fmt: skip
    assert shared, "no step ran an embedding beside a generating request"
    assert llm.engine.scheduler.num_free_blocks == llm.runner.num_blocks


def test_triton_backend(prompts, reference):
    """The tensor path (interpreted Triton on the CPU, native on CUDA): pooled on the
    device, copied back with the step's tokens, chunked, beside a generating request."""
    cuda = torch.cuda.is_available()
    llm = LLM(
        "smollm2-135m-instruct",
        device="cuda" if cuda else "cpu",
        dtype="float32",
        attention_backend="triton",
        max_num_batched_tokens=64 if cuda else 8,
        show_progress=False,
    )
    picked = [0, 2] if cuda else [0]  # the interpreter is slow
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    alone = llm.generate([prompts[1]], params, use_tqdm=False)
    llm.reset_prefix_cache()
    tokens, vectors, steps = run_mixed(llm, [prompts[1]], params)
    assert tokens["gen-0"] == alone[0].outputs[0].token_ids
    assert_close([vectors["emb-0"]], reference[1:2], "triton mixed")
    assert any(len(s) == 2 for s in steps)
    vectors = llm.embed([prompts[i] for i in picked], normalize=False, use_tqdm=False)
    assert_close(vectors, [reference[i] for i in picked], "triton")
    assert llm.engine.scheduler.num_free_blocks == llm.runner.num_blocks
