"""The offline API end to end on the default model: sampling guarantees, stop rules,
logprobs against transformers, loaders agreeing, and errors that leave the pool whole."""

from __future__ import annotations

import pytest
import torch

from tessera import LLM, SamplingParams

CHAT = [{"role": "user", "content": "Tell me a short story about a robot."}]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2-135m-instruct", device="cpu", show_progress=False)


def pool_is_whole(llm: LLM) -> bool:
    s = llm.engine.scheduler
    return s.num_free_blocks == llm.runner.num_blocks and not s.has_unfinished_requests()


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llm):
    sp = SamplingParams(
        temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True
    )
    alone = llm.generate(["Once upon a time"], sp, use_tqdm=False)[0].outputs[0].token_ids
    others = [
        SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=7, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=5),
    ]
    prompts = ["The weather today", "def add(a, b):", "Once upon a time", "List three fruits"]
    batch = llm.generate(prompts, [others[0], others[1], sp, others[2]], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(
        temperature=0.9, top_p=0.95, top_k=50, seed=4321, max_tokens=24, ignore_eos=True
    )
    differs = llm.generate(["Once upon a time"], other_seed, use_tqdm=False)[0]
    assert differs.outputs[0].token_ids != alone
    assert pool_is_whole(llm)


def test_logprobs_equal_transformers(llm, hf_model):
    sp = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, ignore_eos=True)
    out = llm.generate(["The capital of France is"], sp, use_tqdm=False)[0]
    tokens = out.prompt_token_ids + out.outputs[0].token_ids
    with torch.inference_mode():
        logits = hf_model(torch.tensor([tokens])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)[len(out.prompt_token_ids) - 1 : -1]  # [8, V]
    lps = out.outputs[0].logprobs
    assert lps is not None and len(lps) == 8
    for pos, lp in enumerate(lps):
        assert lp.token_id == out.outputs[0].token_ids[pos]
        assert lp.rank == 1  # greedy
        assert lp.logprob == pytest.approx(ref[pos, lp.token_id].item(), abs=1e-4)
        top_ids = ref[pos].topk(5).indices.tolist()
        assert [t for t, _ in lp.top] == top_ids
        for t, v in lp.top:
            assert v == pytest.approx(ref[pos, t].item(), abs=1e-4)


def test_gguf_and_hf_directory_give_the_same_logits(llm, hf_dir):
    from tessera.common.executor_config import ExecutorConfig
    from tessera.executor.attention import build_attention_metadata
    from tessera.executor.model_runner import ModelRunner

    hf_runner = ModelRunner(
        ExecutorConfig(model=str(hf_dir), device="cpu", num_kv_blocks=8, show_progress=False)
    )
    ids = llm.get_tokenizer().encode("Paged attention stores keys and values in blocks.")
    logits = []
    for runner in (llm.runner, hf_runner):
        n = len(ids)
        blocks = list(range(-(-n // runner.block_size)))
        meta = build_attention_metadata([n], [n], [blocks], runner.block_size, runner.device)
        hidden = runner.model.forward(torch.tensor(ids), torch.arange(n), runner.kv_caches, meta)
        logits.append(runner.model.compute_logits(hidden))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-5)
    llm.reset_prefix_cache()  # its pool was written behind the scheduler's back
    # and the HF directory's tokenizer.json agrees with the GGUF-built tokenizer
    from tessera.common.registry import resolve_model
    from tessera.tokenizer_svc.tokenizer import Tokenizer

    assert Tokenizer.load(resolve_model(str(hf_dir))).encode("Paged attention") == (
        llm.get_tokenizer().encode("Paged attention")
    )


def test_stop_strings_cut_the_text_and_free_the_request(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    full = llm.chat(CHAT, greedy, use_tqdm=False)[0].outputs[0].text
    words = full.split()
    assert len(words) > 6, full
    stop = " " + words[4]  # a stop string in the middle of the text
    cut = full.index(stop)
    res = llm.chat(
        CHAT,
        SamplingParams(
            temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop, "never-appears"]
        ),
        use_tqdm=False,
    )[0]
    assert res.outputs[0].text == full[:cut]
    assert res.outputs[0].finish_reason == "stop"
    assert res.outputs[0].stop_reason == stop
    kept = llm.chat(
        CHAT,
        SamplingParams(
            temperature=0.0,
            max_tokens=40,
            ignore_eos=True,
            stop=stop,
            include_stop_str_in_output=True,
        ),
        use_tqdm=False,
    )[0]
    assert kept.outputs[0].text == full[: cut + len(stop)]
    assert pool_is_whole(llm)


def test_finish_reasons_eos_length_and_stop_token(llm):
    res = llm.chat(
        [{"role": "user", "content": "Say hi."}],
        SamplingParams(temperature=0.0, max_tokens=200),
        use_tqdm=False,
    )[0]
    eos = llm.model_config.eos_token_ids
    assert res.outputs[0].finish_reason == "stop"
    assert res.outputs[0].token_ids[-1] in eos  # EOS ended it
    short = llm.chat(
        [{"role": "user", "content": "Say hi."}],
        SamplingParams(temperature=0.0, max_tokens=2),
        use_tqdm=False,
    )[0]
    assert short.outputs[0].finish_reason == "length" and len(short.outputs[0].token_ids) == 2
    third = res.outputs[0].token_ids[2]
    by_id = llm.chat(
        [{"role": "user", "content": "Say hi."}],
        SamplingParams(temperature=0.0, max_tokens=200, stop_token_ids=[third]),
        use_tqdm=False,
    )[0]
    assert by_id.outputs[0].token_ids == res.outputs[0].token_ids[:3]
    assert by_id.outputs[0].finish_reason == "stop"
    # min_tokens holds EOS back: the answer must run past where EOS came
    longer = llm.chat(
        [{"role": "user", "content": "Say hi."}],
        SamplingParams(
            temperature=0.0, max_tokens=200, min_tokens=len(res.outputs[0].token_ids) + 3
        ),
        use_tqdm=False,
    )[0]
    assert len(longer.outputs[0].token_ids) >= len(res.outputs[0].token_ids) + 3
    assert not set(longer.outputs[0].token_ids[: len(res.outputs[0].token_ids) + 2]) & set(eos)


def test_n_samples_and_text_equals_decode(llm):
    res = llm.generate(
        ["My favourite animal is"],
        SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert [o.index for o in res.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in res.outputs}) == 3
    tok = llm.get_tokenizer()
    for o in res.outputs:
        assert o.text == tok.decode(o.token_ids)


def test_bad_requests_raise_clear_errors_and_leave_the_pool_whole(llm):
    vocab = llm.model_config.vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, vocab + 5]], use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    too_long = [100] * llm.scheduler_config.max_model_len
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([too_long], use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    # A bad prompt in the middle of a batch: nothing of the batch stays behind.
    with pytest.raises(ValueError):
        llm.generate(["fine", [vocab + 1], "also fine"], use_tqdm=False)
    assert pool_is_whole(llm)
    ok = llm.generate(
        ["Still serving?"], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False
    )
    assert len(ok[0].outputs[0].token_ids) == 3


def test_a_request_that_can_never_fit_the_pool_fails_instead_of_hanging():
    small = LLM(
        "smollm2-135m-instruct",
        device="cpu",
        num_kv_blocks=4,
        block_size=16,
        max_model_len=1024,
        show_progress=False,
    )
    with pytest.raises(ValueError, match="block"):
        small.generate(
            [[100] * 40], SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False
        )
    fits = small.generate(
        [[100] * 40], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False
    )
    assert len(fits[0].outputs[0].token_ids) == 20
    assert pool_is_whole(small)


def test_priority_policy_runs_urgent_requests_first():
    llm = LLM(
        "smollm2-135m-instruct",
        device="cpu",
        max_num_seqs=1,
        scheduling_policy="priority",
        show_progress=False,
    )
    order = []
    engine = llm.engine
    sp = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    for rid, prio in (("low", 5), ("high", 0), ("mid", 2)):
        engine.add_sequence(rid, [100, 101, 102], sp, priority=prio)
    while engine.has_unfinished():
        order += [s.request_id for s in engine.step() if s.finished]
    assert order == ["high", "mid", "low"]
