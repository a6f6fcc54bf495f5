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
        help="model name, GGUF file, Hugging Face directory or cached model id, or "
        "random:<shape> (default %(default)s)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens; default min(model context, KV pool)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once")
    p.add_argument("--kv-cache-memory", type=int, default=None,
                   help="CPU: bytes for the KV pool (default 2 GiB)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="CUDA: share of device memory Tessera may use")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate, at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    p.add_argument("--seed", type=int, default=None, help="per-request seed (reproducible)")


def build_parser() -> argparse.ArgumentParser:
    """Every command's flags; ``serve`` takes ServeConfig's fields (flag or variable)."""
    from tessera.common.cli_args import add_config_args
    from tessera.serve import ServeConfig

    parser = argparse.ArgumentParser(prog="tessera", description="Tessera LLM engine",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("generate", "complete prompts"), ("chat", "answer as the assistant")):
        p = sub.add_parser(name, help=help_text, description=f"{help_text}, offline (in "
                           "this process, no server)", allow_abbrev=False)
        p.add_argument("prompts", nargs="+", help="one or more prompts")
        _add_engine_args(p)
        _add_sampling_args(p)
    serve = sub.add_parser(
        "serve", help="run the server: tokenizers, scheduler + executor, gateway",
        description="Serve a model over gRPC and the OpenAI-compatible HTTP API (every "
        "process on this machine). Every flag may also come from its TESSERA_* variable; "
        "the flag wins.", allow_abbrev=False,
    )
    serve.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                       help="the model, as --model (which it replaces)")
    add_config_args(serve, ServeConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(parser, args)
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


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from tessera.common.cli_args import config_from_args
    from tessera.common.preflight import EXIT_CONFIG
    from tessera.serve import ServeConfig, run_serve

    if args.model_arg is not None:
        if hasattr(args, "model") and args.model != args.model_arg:
            parser.exit(EXIT_CONFIG, f"tessera serve: error: two models given: "
                        f"{args.model_arg!r} and --model {args.model!r}\n")
        args.model = args.model_arg
    try:
        config = config_from_args(ServeConfig, args)
    except ValueError as e:  # a setting at fault, named: one line, no traceback
        parser.exit(EXIT_CONFIG, f"tessera serve: error: {e}\n")
    return run_serve(config)


if __name__ == "__main__":
    sys.exit(main())
