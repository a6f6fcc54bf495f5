"""Greedy tokens of a tensor-parallel engine against N = 1 and Hugging Face, in float32.

N = 2 on a tiny Llama made here in Hugging Face format (4 heads, 2 KV heads: each rank
one KV head, weights read from safetensors shard by shard) and N = 3 on SmolLM2 (9
heads, 3 KV heads, from the GGUF), 32 tokens per prompt, one prompt alone and all
batched. The tolerance is test_greedy_vs_hf's: a token may differ only where the two
candidates are within 1e-3 in transformers' logprobs (the all-reduce sums in another
order than one matmul does), and comparison stops there. The other ranks are
processes; ``LLM.close`` must leave none behind (the session's autouse check).
"""

from __future__ import annotations

import pytest
import torch

from tessera import LLM, SamplingParams
from tests.tessera.test_greedy_vs_hf import NUM_TOKENS, TIE_TOLERANCE, encode_prompts

pytestmark = pytest.mark.slow


def hf_greedy(model, prompts: list[list[int]]) -> list[tuple[list[int], torch.Tensor]]:
    """Per prompt: transformers' greedy tokens and the logprobs [NUM_TOKENS, V] behind them."""
    refs = []
    with torch.inference_mode():
        for ids in prompts:
            past, step_input, tokens, logprobs = None, torch.tensor([ids]), [], []
            for _ in range(NUM_TOKENS):
                out = model(input_ids=step_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                tokens.append(int(lp.argmax()))
                logprobs.append(lp)
                step_input = torch.tensor([[tokens[-1]]])
            refs.append((tokens, torch.stack(logprobs)))
    return refs


def assert_agree(reference, want: list[list[int]], got: list[list[int]], label: str) -> int:
    """``got`` equals ``want`` up to a near-tie of HF's logprobs; returns the tokens
    compared before the first tolerated tie (so a test can see it compared enough)."""
    compared = 0
    for i, ((_, ref_lp), a_tokens, b_tokens) in enumerate(zip(reference, want, got, strict=True)):
        assert len(b_tokens) == NUM_TOKENS, f"{label} prompt {i}: {len(b_tokens)} tokens"
        for pos, (a, b) in enumerate(zip(a_tokens, b_tokens, strict=True)):
            if a != b:
                gap = abs(ref_lp[pos, a].item() - ref_lp[pos, b].item())
                assert gap < TIE_TOLERANCE, (
                    f"{label} prompt {i}: token {pos} is {b}, not {a} (logprob gap {gap:.2e})"
                )
                break
            compared += 1
    return compared


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)


def run(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """(the first prompt alone, all batched): token ids per prompt. (One alone: a step
    costs ~60 collectives, slow with 3 ranks on 2 cores.)"""
    alone = [llm.generate([p], greedy(), use_tqdm=False)[0] for p in prompts[:1]]
    batched = llm.generate(prompts, greedy(), use_tqdm=False)
    assert llm.engine.scheduler.num_free_blocks == llm.runner.num_blocks
    return [r.outputs[0].token_ids for r in alone], [r.outputs[0].token_ids for r in batched]


def check(llm_n: LLM, llm_1: LLM, reference, prompts) -> None:
    hf_tokens = [tokens for tokens, _ in reference]
    alone, batched = run(llm_n, prompts)
    one = [r.outputs[0].token_ids for r in llm_1.generate(prompts, greedy(), use_tqdm=False)]
    compared = 0
    for label, got in (("alone", alone), ("batched", batched)):
        n = len(got)
        compared += assert_agree(reference[:n], hf_tokens[:n], got, f"{label} vs HF")
        compared += assert_agree(reference[:n], one[:n], got, f"{label} vs N=1")
    # Near-ties are rare: most tokens were compared, not skipped after a tie.
    assert compared > 0.75 * 2 * NUM_TOKENS * (1 + len(prompts)), compared


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, hf_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.2, tie_word_embeddings=False, torch_dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    hf_tokenizer.save_pretrained(path)  # detokenizes ids < 512; prompts are token ids
    return path, model


def test_tiny_llama_at_2_ranks(tiny_llama_dir):
    path, model = tiny_llama_dir
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 17, 90)]
    reference = hf_greedy(model, prompts)
    kwargs = dict(device="cpu", dtype="float32", kv_cache_memory=1 << 24, show_progress=False)
    llm_2 = LLM(str(path), tensor_parallel_size=2, **kwargs)
    try:
        assert llm_2.runner.kv_caches[0][0].shape[2] == 1  # one of the 2 KV heads each
        check(llm_2, LLM(str(path), **kwargs), reference, prompts)
    finally:
        llm_2.close()


def test_embeddings_at_2_ranks(tiny_llama_dir):
    """Rank 0 returns the pooled vector: transformers' mean final-norm hidden state, with
    the longest prompt chunked over several steps beside a generating request."""
    path, model = tiny_llama_dir
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 90)]
    with torch.inference_mode():
        reference = [model(input_ids=torch.tensor([p]), output_hidden_states=True)
                     .hidden_states[-1][0].mean(dim=0) for p in prompts]  # fmt: skip
    llm_2 = LLM(str(path), tensor_parallel_size=2, device="cpu", dtype="float32",
                kv_cache_memory=1 << 24, max_num_batched_tokens=32, show_progress=False)
    try:
        llm_2.engine.add_sequence("gen", prompts[0], greedy())
        vectors = llm_2.embed(prompts, normalize=False, use_tqdm=False)
        for i, (vector, ref) in enumerate(zip(vectors, reference, strict=True)):
            error = float((torch.tensor(vector) - ref).norm() / ref.norm())
            assert error < 1e-4, f"prompt {i}: relative error {error:.2e}"
        while llm_2.engine.has_unfinished():  # the generating request, still running
            llm_2.engine.step()
        assert llm_2.engine.scheduler.num_free_blocks == llm_2.runner.num_blocks
    finally:
        llm_2.close()


def test_smollm2_at_3_ranks(hf_model, hf_tokenizer):
    all_prompts = encode_prompts(hf_tokenizer)
    prompts = [all_prompts[1], all_prompts[3], all_prompts[6]]  # plain, plain, chat
    reference = hf_greedy(hf_model, prompts)
    kwargs = dict(device="cpu", dtype="float32", kv_cache_memory=1 << 26, show_progress=False)
    llm_3 = LLM("smollm2-135m-instruct", tensor_parallel_size=3, **kwargs)
    try:
        assert llm_3.runner.kv_caches[0][0].shape[2] == 1  # 3 KV heads, one per rank
        check(llm_3, LLM("smollm2-135m-instruct", **kwargs), reference, prompts)
    finally:
        llm_3.close()


def test_a_split_the_model_refuses_fails_before_any_rank_starts(tiny_llama_dir):
    path, _ = tiny_llama_dir  # 4 heads: 3 ranks cannot split them
    with pytest.raises(ValueError, match="num_attention_heads 4 is not a multiple of 3"):
        LLM(str(path), tensor_parallel_size=3, device="cpu", show_progress=False)
