"""The ``tessera`` command.

tessera generate "The capital of France is"       # plain completion
tessera chat "Write a haiku about the sea"        # through the chat template
"""

from __future__ import annotations

import argparse
import logging
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="model name, GGUF file, Hugging Face directory, or random:<shape>",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="CPU KV pool size in bytes")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera", description="Tessera LLM engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("generate", "complete prompts"), ("chat", "answer as the assistant")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("prompts", nargs="+")
        _add_engine_args(p)
        _add_sampling_args(p)
    serve = sub.add_parser("serve", help="run the gRPC server (all processes, one machine)")
    from tessera.common.cli_args import add_config_args
    from tessera.serve import ServeConfig

    add_config_args(serve, ServeConfig)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from tessera.common.cli_args import config_from_args
        from tessera.serve import run_serve

        return run_serve(config_from_args(ServeConfig, args))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from tessera import LLM, SamplingParams

    llm = LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    if args.command == "chat":
        results = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        results = llm.generate(args.prompts, params)
    for prompt, res in zip(args.prompts, results, strict=True):
        print(f"### {prompt}\n{res.outputs[0].text}\n[{res.outputs[0].finish_reason}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
