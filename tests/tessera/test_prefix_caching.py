"""Prefix caching end to end on the default model: greedy tokens with prefixes served
from the cache equal Hugging Face transformers' (and the engine's own with caching
off), with the hits counted exactly: prompts sharing a long system prompt, a
conversation replayed turn by turn, n > 1, chunked prefill and preemption."""

from __future__ import annotations

import pytest
import torch

from tessera import LLM, SamplingParams

pytestmark = pytest.mark.slow  # whole-model runs

NUM_TOKENS = 12
BLOCK = 16
TIE_TOLERANCE = 1e-3  # as in test_greedy_vs_hf: a flip only where HF's top two tie

SYSTEM = (
    "You are the reference desk of a small public library. Answer in one or two "
    "plain sentences, name a book when one fits, and never invent a title or an "
    "author. The library opens at nine, closes at six, and lends up to five books "
    "for three weeks; renewals are by phone or at the desk."
)
QUESTIONS = ["When do you open?", "How many books can I borrow?", "Can I renew by email?"]
TURNS = ["Thanks. What about Sundays?", "And how long is a loan?", "Is there a late fee?"]


def hf_greedy(hf_model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens (nothing blocks EOS) and logprobs [NUM_TOKENS, V]."""
    past, step_input, tokens, logprobs = None, torch.tensor([ids]), [], []
    with torch.inference_mode():
        for _ in range(NUM_TOKENS):
            out = hf_model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            tokens.append(int(lp.argmax()))
            logprobs.append(lp)
            step_input = torch.tensor([[tokens[-1]]])
    return tokens, torch.stack(logprobs)


def assert_follows(reference: tuple[list[int], torch.Tensor], ours: list[int], label: str):
    ref_tokens, ref_lp = reference
    assert len(ours) == NUM_TOKENS, label
    for pos, (a, b) in enumerate(zip(ref_tokens, ours, strict=True)):
        if a != b:
            gap = abs(ref_lp[pos, a].item() - ref_lp[pos, b].item())
            assert gap < TIE_TOLERANCE, f"{label}: token {pos} is {b}, transformers says {a}"
            break  # a tolerated near-tie: the continuations diverge from here


def greedy(n: int = 1) -> SamplingParams:
    return SamplingParams(n=n, temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)


def make_llm(**kwargs) -> LLM:
    return LLM(
        "smollm2-135m-instruct", device="cpu", dtype="float32", show_progress=False, **kwargs
    )


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def expected_hit(cached: list[int], prompt: list[int]) -> int:
    """Tokens of prompt served from a cache holding the full blocks of cached: whole
    common blocks, and never the block of the prompt's last token."""
    num_blocks = min(common_prefix(cached, prompt) // BLOCK, (len(prompt) - 1) // BLOCK)
    return num_blocks * BLOCK


@pytest.fixture(scope="module")
def shared(hf_tokenizer, hf_model) -> list[tuple[list[int], tuple]]:
    """Prompts with one long system prompt, each with transformers' greedy answer."""
    out = []
    for question in QUESTIONS:
        conv = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        text = hf_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = hf_tokenizer(text, add_special_tokens=False).input_ids
        out.append((ids, hf_greedy(hf_model, ids)))
    common = common_prefix(out[0][0], out[1][0])
    assert common >= 3 * BLOCK, f"the system prompt must fill 3 blocks: {common} tokens"
    return out


@pytest.fixture(scope="module")
def conversation(hf_tokenizer, hf_model, shared) -> list[tuple[list[int], tuple]]:
    """Turns of one conversation: each prompt is the previous one, its answer (the
    reference's), and the next question."""
    prompt, reference = shared[0]
    turns = [(prompt, reference)]
    for question in TURNS:
        text = f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        prompt = prompt + reference[0] + hf_tokenizer(text, add_special_tokens=False).input_ids
        reference = hf_greedy(hf_model, prompt)
        turns.append((prompt, reference))
    return turns


def test_prompts_sharing_a_system_prompt_compute_it_once(shared):
    prompts = [ids for ids, _ in shared]
    on, off = make_llm(), make_llm(enable_prefix_caching=False)
    results = {label: llm.generate(prompts, greedy(), use_tqdm=False) for label, llm in
               (("on", on), ("off", off))}  # fmt: skip
    for i, (_, reference) in enumerate(shared):
        for label in ("on", "off"):
            assert_follows(reference, results[label][i].outputs[0].token_ids, f"{label} {i}")
        assert results["on"][i].outputs[0].token_ids == results["off"][i].outputs[0].token_ids
    # The first computes the system prompt; the others wait for it and take its blocks.
    hits = [expected_hit(prompts[0], p) for p in prompts[1:]]
    assert hits[0] >= 3 * BLOCK
    assert [r.num_cached_tokens for r in results["on"]] == [0, *hits]
    assert [r.num_cached_tokens for r in results["off"]] == [0, 0, 0]
    scheduler = on.engine.scheduler
    assert scheduler.num_prefix_cache_hits == sum(hits)
    assert scheduler.num_prefix_cache_queries == sum(len(p) for p in prompts)
    # The same prompts again: each served from the cache up to its last block.
    again = on.generate(prompts, greedy(), use_tqdm=False)
    assert [r.num_cached_tokens for r in again] == [(len(p) - 1) // BLOCK * BLOCK for p in prompts]
    assert [r.outputs[0].token_ids for r in again] == [r.outputs[0].token_ids for r in
                                                       results["on"]]  # fmt: skip
    assert scheduler.num_free_blocks == on.runner.num_blocks
    assert scheduler.reset_prefix_cache() > 0
    assert on.generate(prompts[:1], greedy(), use_tqdm=False)[0].num_cached_tokens == 0


def test_n_sequences_share_the_prompt_blocks(shared):
    prompt, reference = shared[0]
    llm = make_llm()
    [result] = llm.generate([prompt], greedy(n=3), use_tqdm=False)
    for j, output in enumerate(result.outputs):
        assert_follows(reference, output.token_ids, f"sequence {j}")
    assert result.num_cached_tokens == 0  # sequence 0 computed the prompt
    # sequences 1 and 2 took every full block before the last token from it
    assert llm.engine.scheduler.num_prefix_cache_hits == 2 * ((len(prompt) - 1) // BLOCK * BLOCK)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(max_num_batched_tokens=24),  # every prompt chunked, the cached ones too
    ],
    ids=["whole", "chunked"],
)
def test_a_conversation_replayed_turn_by_turn_is_served_from_the_cache(conversation, options):
    on, off = make_llm(**options), make_llm(enable_prefix_caching=False, **options)
    computed: list[int] = []  # the tokens whose K/V the last turn left in the cache
    for turn, (prompt, reference) in enumerate(conversation):
        [result] = on.generate([prompt], greedy(), use_tqdm=False)
        [plain] = off.generate([prompt], greedy(), use_tqdm=False)
        ours = result.outputs[0].token_ids
        assert_follows(reference, ours, f"turn {turn}")
        assert ours == plain.outputs[0].token_ids, f"turn {turn}"
        assert plain.num_cached_tokens == 0
        assert result.num_cached_tokens == expected_hit(computed, prompt), f"turn {turn}"
        if turn > 0:
            assert result.num_cached_tokens >= len(conversation[turn - 1][0]) // BLOCK * BLOCK
        computed = prompt + ours[:-1]  # the last token was sampled, never run


def test_preemption_with_a_tiny_pool(shared, conversation):
    prompts = [ids for ids, _ in shared] + [ids for ids, _ in conversation[1:]]
    references = [ref for _, ref in shared] + [ref for _, ref in conversation[1:]]
    longest = max(len(p) for p in prompts) + NUM_TOKENS
    num_blocks = -(-longest // BLOCK) + 3  # the longest fits alone; all of them do not
    on = make_llm(num_kv_blocks=num_blocks, max_num_batched_tokens=64)
    off = make_llm(num_kv_blocks=num_blocks, max_num_batched_tokens=64,
                   enable_prefix_caching=False)  # fmt: skip
    results = on.generate(prompts, greedy(), use_tqdm=False)
    plain = off.generate(prompts, greedy(), use_tqdm=False)
    assert on.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    for i, reference in enumerate(references):
        assert_follows(reference, results[i].outputs[0].token_ids, f"prompt {i}")
        assert results[i].outputs[0].token_ids == plain[i].outputs[0].token_ids, f"prompt {i}"
    assert sum(r.num_cached_tokens for r in results) > 0
    assert on.engine.scheduler.num_prefix_cache_hits > 0
    assert [r.num_cached_tokens for r in plain] == [0] * len(prompts)
    for llm in (on, off):
        assert llm.engine.scheduler.num_free_blocks == num_blocks
