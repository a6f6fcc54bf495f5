"""Structured output: throughput with every request constrained by a JSON schema against
the same requests unconstrained, in the same run; and compile times of the 20 test
schemas, cold and cached.

A constrained request ends when its JSON is complete, so the unconstrained run is given
each request's constrained output length as ``max_tokens`` (with ``ignore_eos``): both
runs decode the same number of tokens per request, and the ratio of their throughputs
is the cost of the masks (computed on the host per step) and of the steps the executor
no longer overlaps for constrained rows.

    python benchmarks/structured.py                   # default model, CPU
    python benchmarks/structured.py --num-prompts 64 --device cuda \
        --model random:llama-3.1-8b --tokenizer-from <dir with tokenizer.json>

Random weights have no tokenizer, and a constraint needs one (the grammar is over
token strings). ``--tokenizer-from`` lends the random shape another model's tokenizer
(a Hugging Face directory or a model name): the grammar allows only that tokenizer's
ids, and the logits beyond them are masked off like any disallowed token. The mask
work per row is what it would be with the model's own tokenizer of that size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path


def load_schemas() -> list[dict]:
    """The 20 schemas of tests/tessera/test_structured_output.py, loaded by path (the
    repository root is never put on sys.path)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "tessera" / "test_structured_output.py"
    spec = importlib.util.spec_from_file_location("structured_schemas", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SCHEMAS


def compile_times() -> dict:
    from tessera.common.constraints import Constraint, ConstraintChecker

    SCHEMAS = load_schemas()
    checker = ConstraintChecker()
    constraints = [Constraint.json_schema(s) for s in SCHEMAS]
    cold, warm = [], []
    for c in constraints:
        t0 = time.perf_counter()
        checker.check(c)
        cold.append(time.perf_counter() - t0)
    for c in constraints:
        t0 = time.perf_counter()
        checker.check(c)
        warm.append(time.perf_counter() - t0)
    checker.close()
    return {"schemas": len(constraints), "cold_ms_total": 1e3 * sum(cold),
            "cold_ms_max": 1e3 * max(cold), "cached_ms_total": 1e3 * sum(warm)}


def lend_tokenizer(donor: str) -> None:
    """Random weights get ``donor``'s tokenizer, in this process (the in-process engine
    and its grammar read it through Tokenizer.load)."""
    from tessera.common.registry import resolve_model
    from tessera.tokenizer_svc.tokenizer import Tokenizer

    source = resolve_model(donor)
    lent = Tokenizer.load(source)
    if lent is None:
        raise SystemExit(f"--tokenizer-from {donor!r} has no tokenizer")
    own = Tokenizer.load
    Tokenizer.load = staticmethod(lambda s: lent if s.kind == "random" else own(s))


def run(args) -> dict:
    from tessera import LLM, SamplingParams
    from tessera.common.constraints import Constraint

    if args.tokenizer_from:
        lend_tokenizer(args.tokenizer_from)

    SCHEMAS = load_schemas()
    # No prefix cache: the second run would find the first one's prompts cached.
    llm = LLM(args.model, device=args.device, show_progress=False,
              max_num_seqs=args.max_num_seqs, enable_prefix_caching=False)
    schemas = [SCHEMAS[i % len(SCHEMAS)] for i in range(args.num_prompts)]
    # Short prompts, so that decoding (where the masks are) dominates the time.
    prompts = [f"Record {i} as JSON:" for i in range(args.num_prompts)]
    constrained = [SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                  constraint=Constraint.json_schema(s)) for s in schemas]
    llm.generate(prompts[:2], constrained[:2], use_tqdm=False)  # warm-up (vocabulary, JIT)
    outs = llm.generate(prompts, constrained, use_tqdm=False)
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    free = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    # Alternate the two, best of args.rounds each: a shared machine's noise hits both
    # (across processes the constrained rate of the 8B shape varied by 1.7x).
    t_constrained = t_free = float("inf")
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        again = llm.generate(prompts, constrained, use_tqdm=False)
        t_constrained = min(t_constrained, time.perf_counter() - t0)
        assert [len(o.outputs[0].token_ids) for o in again] == lengths  # greedy: the same
        t0 = time.perf_counter()
        free_outs = llm.generate(prompts, free, use_tqdm=False)
        t_free = min(t_free, time.perf_counter() - t0)
        assert [len(o.outputs[0].token_ids) for o in free_outs] == lengths
    tokens = sum(lengths)
    return {
        "num_prompts": args.num_prompts, "output_tokens": tokens,
        "mean_output_len": statistics.mean(lengths),
        "constrained_tok_per_s": tokens / t_constrained,
        "unconstrained_tok_per_s": tokens / t_free,
        "ratio": (tokens / t_constrained) / (tokens / t_free),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokenizer-from", default="",
                   help="with random:<shape> weights: the model whose tokenizer they use")
    p.add_argument("--out", default="")
    args = p.parse_args()
    result = {"date": str(date.today()), "host": platform.node(), "device": args.device,
              "model": args.model, "tokenizer_from": args.tokenizer_from,
              "compile": compile_times(), "throughput": run(args)}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
