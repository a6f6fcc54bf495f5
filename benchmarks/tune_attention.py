"""Sweep the paged attention kernels' configurations on a GPU.

Decode: replaces ``kernels.paged_decode``'s config function for each measurement and
times tiles and split counts (KV GB/s) at a few shapes.

Prefill (``--only prefill``): the candidates of ``prefill_candidates`` (tiles and the code
variants of ``PrefillConfig``, the old defaults first) on one causal prompt of 1k, 4k
and 16k tokens, Llama-3-8B attention shapes (32 query / 8 KV heads, head size 128),
bf16, K/V in a shuffled paged pool as in ``bench_kernels.py``. Each candidate's output
is checked against torch SDPA on the same data laid out contiguously (max abs error
reported, wrong ones rejected), and timed beside flash SDPA and the bf16 matmul rate
measured in the same run. Prints a table, the best candidate per length, and rows to
paste into ``kernels/paged_prefill.py``'s ``D128_TUNED``. ``--time-limit`` bounds the
sweep (candidates left when it runs out are listed as skipped): the default keeps the
whole command under 4 minutes on an H100/H200.

    python3 benchmarks/tune_attention.py --only prefill --json $OUT/tune_prefill.json
    python benchmarks/tune_attention.py --only prefill --dry-run  # CPU: interpreter, tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import platform
import time
from datetime import date

import bench_kernels as bk  # benchmarks/ is sys.path[0] when run as a script
import torch
import torch.nn.functional as F
from bench_kernels import Timer, contiguous_kv, matmul_rate, shuffled_pool

DECODE_SHAPES = ((64, 2048), (8, 8192), (256, 1024), (1, 32768))
PREFILL_TOKENS = (1024, 4096, 16384)


def tune_decode(timer: Timer, gen: torch.Generator) -> list[dict]:
    from tessera.kernels import _paged_common as paged
    from tessera.kernels import paged_decode as dec

    rows = []
    default = dec._decode_config
    for batch, ctx in DECODE_SHAPES:
        k_cache, v_cache, table = shuffled_pool(batch, ctx, timer.device, torch.bfloat16, gen)
        q = torch.randn(batch, bk.NUM_HEADS, bk.HEAD_SIZE, device=timer.device,
                        dtype=torch.bfloat16)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=timer.device)
        kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
        call = functools.partial(dec.paged_decode_attention, q, k_cache, v_cache, table, lens,
                                 bk.HEAD_SIZE**-0.5)
        for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
            dec._decode_config = lambda *_, c=(block_n, warps, stages): c
            try:
                seconds = timer(call)
            except Exception as e:  # out of shared memory / registers: not a candidate
                print(f"decode {batch}x{ctx} {block_n}/{warps}/{stages}: {type(e).__name__}")
                continue
            finally:
                dec._decode_config = default
            rows.append({"batch": batch, "context": ctx, "block_n": block_n, "warps": warps,
                         "stages": stages, "us": seconds * 1e6, "gbps": kv_bytes / seconds / 1e9})
        best = sorted((r for r in rows if r["batch"] == batch and r["context"] == ctx),
                      key=lambda r: r["us"])[:5]
        for r in best:
            print(f"decode B={batch:4d} ctx={ctx:6d}  n={r['block_n']:3d} w={r['warps']} "
                  f"s={r['stages']}  {r['us']:8.1f} us  {r['gbps']:6.0f} GB/s")
        # The split count, at the best tiles: the default heuristic's choice among them.
        top = best[0]
        dec._decode_config = lambda *_, c=(top["block_n"], top["warps"], top["stages"]): c
        chosen = dec.default_num_splits(batch, bk.NUM_KV_HEADS, ctx, top["block_n"],
                                       paged.num_sms(timer.device))
        line = []
        for splits in (1, 2, 4, 8, 16, 32, 64):
            seconds = timer(functools.partial(call, num_splits=splits))
            rows.append({"batch": batch, "context": ctx, **{k: top[k] for k in
                         ("block_n", "warps", "stages")}, "num_splits": splits,
                         "us": seconds * 1e6, "gbps": kv_bytes / seconds / 1e9})
            line.append(f"{splits}{'*' if splits == chosen else ''}:{kv_bytes / seconds / 1e9:.0f}")
        dec._decode_config = default
        print(f"decode B={batch:4d} ctx={ctx:6d}  splits GB/s (* = default {chosen}): "
              + " ".join(line))
        k_cache = v_cache = call = None
        torch.cuda.empty_cache()
    return rows


def prefill_candidates() -> list:
    """Old defaults first (the baseline every other row is read against), then the new
    variants, the likeliest first: the sweep stops at its time limit."""
    from tessera.kernels.paged_prefill import PrefillConfig as C

    new = dict(mask_full=False, page_reads=True, ahead=True)  # table reads off the path
    over = dict(new, overlap=True)  # P @ V in flight during the next tile's softmax
    return [
        C(128, 64, 4, 3),  # the old default from 3 waves of programs (4k, 16k)
        C(64, 64, 4, 2),  # the old default below (1k)
        C(64, 64, 4, 2, **over),
        C(128, 64, 8, 3, **over),
        C(128, 64, 8, 3, **new),
        C(64, 64, 4, 2, **new),
        C(128, 64, 8, 4, **new),
        C(128, 64, 8, 2, **over),
        C(128, 64, 8, 4, **over),
        C(64, 64, 4, 3, **over),
        C(64, 64, 4, 2, **over, lazy_rescale=True),
        C(128, 64, 8, 3, **over, lazy_rescale=True),
        C(128, 64, 8, 3, **new, lazy_rescale=True),
        C(128, 128, 8, 2, **new),
        C(128, 128, 8, 3, **new),
        C(128, 128, 8, 2, **over),
        C(128, 64, 4, 3, **new),
        C(128, 64, 4, 2, **new),
        C(64, 64, 4, 3, **new),
        C(64, 64, 4, 4, **new),
        C(64, 128, 4, 2, **new),
        C(128, 64, 8, 3),  # what 8 warps alone give
        C(128, 64, 4, 3, mask_full=False),  # what each new piece gives alone
        C(128, 64, 8, 3, mask_full=False, ahead=True),
        C(128, 64, 8, 3, mask_full=False, overlap=True),
        C(128, 128, 8, 2),
        C(64, 128, 4, 2),
        C(64, 64, 4, 3),
    ]


@dataclasses.dataclass
class PrefillCase:
    """One prompt length's inputs, its SDPA output and SDPA's time."""

    tokens: int
    flops: int
    args: tuple  # q, k_cache, v_cache, block_tables, query_start_loc, context_lens
    out: torch.Tensor  # [T, H, D]
    ref: torch.Tensor  # [T, H, D]: SDPA over the same K/V laid out contiguously
    sdpa_s: float
    sdpa_backend: str
    sdpa_args: tuple  # q4 [1, H, T, D], k, v [1, H_kv, T, D], scale


def _calls(timer: Timer, tokens: int) -> int:
    """Kernel calls per timed graph replay: enough to dwarf a replay's own cost."""
    return max(2, 16384 // max(tokens, 1)) if timer.cuda else 1


def prefill_case(timer: Timer, tokens: int, gen: torch.Generator) -> PrefillCase:
    device, dtype = timer.device, torch.bfloat16
    k_cache, v_cache, table = shuffled_pool(1, tokens, device, dtype, gen)
    q = torch.randn(tokens, bk.NUM_HEADS, bk.HEAD_SIZE, device=device, dtype=dtype,
                    generator=gen)
    qsl = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    lens = torch.tensor([tokens], dtype=torch.int32, device=device)
    q4 = q.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
    k, v = contiguous_kv(k_cache, table, tokens), contiguous_kv(v_cache, table, tokens)
    sdpa_args = (q4, k, v, bk.HEAD_SIZE**-0.5)
    sdpa, backend = _flash_sdpa(*sdpa_args)
    ref = sdpa()[0].transpose(0, 1).contiguous()  # [T, H, D]
    flops = 4 * bk.HEAD_SIZE * bk.NUM_HEADS * tokens * (tokens + 1) // 2
    sdpa_s = timer(sdpa, calls=_calls(timer, tokens))
    return PrefillCase(tokens, flops, (q, k_cache, v_cache, table, qsl, lens),
                       torch.empty_like(q), ref, sdpa_s, backend, sdpa_args)


def _flash_sdpa(q4, k, v, scale: float):
    """A call of causal SDPA on the flash backend (GQA through ``enable_gqa``, else K/V
    heads repeated), or on torch's own pick where there is no CUDA (dry runs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(k, v, gqa: bool):
        return F.scaled_dot_product_attention(q4, k, v, is_causal=True, scale=scale,
                                              enable_gqa=gqa)

    if q4.device.type != "cuda":
        return functools.partial(sdpa, k, v, True), "torch's pick (no CUDA)"

    def flash(k, v, gqa: bool):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return sdpa(k, v, gqa)

    try:
        flash(k, v, True)
        return functools.partial(flash, k, v, True), "flash, enable_gqa"
    except RuntimeError:
        group = q4.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return functools.partial(flash, k, v, False), "flash, K/V heads repeated"


def run_candidate(timer: Timer, case: PrefillCase, config, matmul_flops: float,
                  baseline_rms: float | None) -> dict:
    """Check one candidate's output, then time it. Wrong: NaN or an element off by more
    than the kernel tests' bf16 tolerance, or a relative RMS error over twice the first
    (old default) candidate's plus 1e-3, which catches a few lost tiles at 16k."""
    from tessera.kernels.paged_prefill import paged_prefill_attention

    call = functools.partial(paged_prefill_attention, *case.args, bk.HEAD_SIZE**-0.5,
                             max_query_len=case.tokens, out=case.out, config=config)
    row: dict = {"tokens": case.tokens}
    case.out.fill_(float("nan"))
    call()
    got, want = case.out.float(), case.ref.float()
    err = (got - want).abs()
    row["max_abs_err"] = err.max().item()  # nan if any row was left unwritten
    row["rel_rms_err"] = (err.square().mean() / want.square().mean()).sqrt().item()
    close = bool((err <= 2e-2 + 2e-2 * want.abs()).all())
    if baseline_rms is not None and not row["rel_rms_err"] <= 2 * baseline_rms + 1e-3:
        close = False
    if not close:
        row["status"] = "wrong"
        return row
    seconds = timer(call, calls=_calls(timer, case.tokens))
    tflops = case.flops / seconds / 1e12
    row.update(status="ok", us=seconds * 1e6, tflops=tflops,
               vs_matmul=tflops * 1e12 / matmul_flops, vs_sdpa=case.sdpa_s / seconds)
    return row


def tune_prefill(timer: Timer, gen: torch.Generator, token_counts: list[int],
                 time_limit: float, only: int | None = None) -> dict:
    """The candidate sweep (see the module docstring); ``only`` keeps the first few."""
    from tessera.kernels import _paged_common as paged
    from tessera.kernels import paged_prefill as pre

    device = timer.device
    result: dict = {"matmul_tflops": matmul_rate(timer, 8192 if device.type == "cuda"
                                                 else 256) / 1e12}
    cases = [prefill_case(timer, t, gen) for t in token_counts]
    group = bk.NUM_HEADS // bk.NUM_KV_HEADS
    num_sms = paged.num_sms(device)
    result["lengths"] = []
    for case in cases:
        tiles_of_128 = bk.NUM_KV_HEADS * -(-case.tokens // (128 // group))
        default = pre._prefill_config(bk.HEAD_SIZE, group, torch.bfloat16, tiles_of_128,
                                      num_sms)
        sdpa_tflops = case.flops / case.sdpa_s / 1e12
        result["lengths"].append({
            "tokens": case.tokens, "waves": tiles_of_128 / num_sms,
            "default": default.label(), "sdpa_backend": case.sdpa_backend,
            "sdpa_us": case.sdpa_s * 1e6, "sdpa_tflops": sdpa_tflops,
            "sdpa_vs_matmul": sdpa_tflops / result["matmul_tflops"],
        })
    deadline = time.monotonic() + time_limit
    rows = []
    baseline_rms: list[float | None] = [None] * len(cases)  # the first correct candidate's
    for config in prefill_candidates()[:only]:
        entry = {"label": config.label(), "config": dataclasses.asdict(config)}
        if time.monotonic() > deadline:
            entry["skipped"] = "time limit"
            rows.append(entry)
            continue
        t0 = time.monotonic()
        try:
            entry["lengths"] = [
                run_candidate(timer, c, config, result["matmul_tflops"] * 1e12, rms)
                for c, rms in zip(cases, baseline_rms, strict=True)
            ]
            if all(r["status"] == "ok" for r in entry["lengths"]):
                baseline_rms = [rms or r["rel_rms_err"]
                                for rms, r in zip(baseline_rms, entry["lengths"], strict=True)]
        except Exception as e:  # out of shared memory or registers, a compile error
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        entry["seconds"] = time.monotonic() - t0
        rows.append(entry)
        print(f"  {entry['seconds']:5.1f} s  {entry['label']}  "
              + _summary(entry), flush=True)
    result["candidates"] = rows
    # SDPA once more: how far the device drifted (clocks, heat) over the sweep.
    for case, length in zip(cases, result["lengths"], strict=True):
        length["sdpa_us_after"] = timer(_flash_sdpa(*case.sdpa_args)[0],
                                        calls=_calls(timer, case.tokens)) * 1e6
    return result


def _summary(entry: dict) -> str:
    if "error" in entry:
        return entry["error"]
    if "skipped" in entry:
        return f"skipped ({entry['skipped']})"
    return "  ".join(f"{r['tokens']}: {r['tflops']:.0f}" if r["status"] == "ok"
                     else f"{r['tokens']}: WRONG (max err {r['max_abs_err']:.3g})"
                     for r in entry["lengths"])


def best_per_length(result: dict) -> list[dict]:
    """The fastest correct candidate of each length (None where none ran)."""
    best = []
    for i in range(len(result["lengths"])):
        ok = [(e["lengths"][i]["tflops"], e) for e in result["candidates"]
              if "lengths" in e and e["lengths"][i]["status"] == "ok"]
        best.append(max(ok, key=lambda x: x[0])[1] if ok else None)
    return best


def config_source(config: dict) -> str:
    """``PrefillConfig(...)`` as it reads in paged_prefill.py: tiles, then changed flags."""
    from tessera.kernels.paged_prefill import PrefillConfig

    fields = dataclasses.fields(PrefillConfig)
    tiles = [str(config[f.name]) for f in fields[:4]]
    flags = [f"{f.name}={config[f.name]}" for f in fields[4:] if config[f.name] != f.default]
    return f"PrefillConfig({', '.join(tiles + flags)})"


def print_prefill(result: dict) -> None:
    lengths = result["lengths"]
    print(f"\nprefill on {result['device']}: bf16 matmul {result['matmul_tflops']:.0f} TFLOP/s;"
          f" SDPA ({lengths[0]['sdpa_backend']}, contiguous K/V):")
    for r in lengths:
        drift = r["sdpa_us_after"] / r["sdpa_us"]
        print(f"  {r['tokens']:6d} tokens  {r['sdpa_tflops']:6.1f} TFLOP/s  "
              f"{r['sdpa_vs_matmul']:.2f} of matmul  (time after the sweep / before: "
              f"{drift:.3f})  default: {r['default']}")
    head = "".join(f" | {r['tokens']:>5d}: TFLOP/s /mm  /sdpa  err" for r in lengths)
    print(f"\n{'candidate':44s}{head}")
    for e in result["candidates"]:
        cells = []
        for i, r in enumerate(e.get("lengths", [])):
            mark = "*" if e["label"] == lengths[i]["default"] else " "
            if r["status"] == "ok":
                cells.append(f" |{mark}{r['tflops']:12.1f} {r['vs_matmul']:4.2f} "
                             f"{r['vs_sdpa']:5.2f} {r['max_abs_err']:4.2g}")
            else:
                cells.append(f" |{mark}{'WRONG':>12s} {'':4s} {'':5s} {r['max_abs_err']:4.2g}")
        if not cells:
            cells = [f" | {e.get('error') or 'skipped: ' + e['skipped']}"]
        print(f"{e['label']:44s}{''.join(cells)}")
    print("(* = the current default; /mm = of the bf16 matmul rate; /sdpa = speed over "
          "flash SDPA; err = max abs error against SDPA)")

    best = best_per_length(result)
    print()
    rows = []
    for r, e in zip(lengths, best, strict=True):
        if e is None:
            print(f"best at {r['tokens']:6d} tokens: none ran correctly")
            continue
        m = next(x for x in e["lengths"] if x["tokens"] == r["tokens"])
        print(f"best at {r['tokens']:6d} tokens: {e['label']}  {m['tflops']:.1f} TFLOP/s, "
              f"{m['vs_matmul']:.2f} of matmul, {m['vs_sdpa']:.2f}x SDPA")
        rows.append((r["waves"], r["tokens"], config_source(e["config"])))
    if not rows:
        return
    # Each config applies from the geometric middle between its length's program waves
    # and the previous length's; consecutive lengths with one winner share a row.
    print(f"\nD128_TUNED rows for kernels/paged_prefill.py ({result['device']}, "
          f"{result['date']}):")
    print("D128_TUNED: tuple[tuple[float, PrefillConfig], ...] = (")
    previous = None
    for i, (waves, tokens, source) in enumerate(rows):
        if source == previous:
            continue
        start = 0.0 if i == 0 else round(math.sqrt(rows[i - 1][0] * waves), 1)
        print(f"    ({start}, {source}),  # best at {tokens} tokens ({waves:.1f} waves)")
        previous = source
    print(")")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--only", choices=("decode", "prefill"), default=None)
    p.add_argument("--head-size", type=int, default=bk.HEAD_SIZE, help="decode only")
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=list(PREFILL_TOKENS))
    p.add_argument("--time-limit", type=float, default=150.0,
                   help="seconds for the prefill candidates (setup and SDPA not counted)")
    p.add_argument("--dry-run", action="store_true",
                   help="prefill on the CPU under TRITON_INTERPRET=1, tiny shapes: logic only")
    args = p.parse_args()
    if args.dry_run:
        if torch.cuda.is_available():
            raise SystemExit("--dry-run is for machines without a GPU")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
        args.only, args.prefill_tokens = "prefill", [40, 72]
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --dry-run to check the script on the CPU")
    import triton  # after TRITON_INTERPRET is set

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timer = Timer(device, reps=1 if args.dry_run else 10, warmup=0 if args.dry_run else 2)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    result = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "host": platform.node(), "torch": torch.__version__,
        "triton": triton.__version__,
        "num_kv_heads": bk.NUM_KV_HEADS, "head_size": bk.HEAD_SIZE,
    }
    if args.only != "prefill":
        bk.HEAD_SIZE = args.head_size  # shuffled_pool reads it from its module
        result["decode"] = tune_decode(timer, gen)
        bk.HEAD_SIZE = result["head_size"]
    if args.only != "decode":
        print(f"prefill candidates ({args.time_limit:.0f} s at most):", flush=True)
        result["prefill"] = tune_prefill(timer, gen, args.prefill_tokens, args.time_limit,
                                         only=3 if args.dry_run else None)
        result["prefill"].update(device=result["device"], date=result["date"])
        print_prefill(result["prefill"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nresult: {args.json}")


if __name__ == "__main__":
    main()
