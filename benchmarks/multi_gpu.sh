#!/usr/bin/env bash
# Issue 21 on one host with several GPUs: every measurement, one command each, results
# as JSON under OUT (default ./multi_gpu_out). Each block runs under its own timeout;
# run the blocks separately (BLOCKS="1 3") where a session limits a command's time.
#   bash benchmarks/multi_gpu.sh            # all four blocks
#   OUT=/tmp/r BLOCKS="2" bash benchmarks/multi_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-multi_gpu_out}
BLOCKS=${BLOCKS:-"1 2 3 4"}
PY=${PY:-python3}
GPUS=$(nvidia-smi -L | wc -l)
mkdir -p "$OUT"
echo "$GPUS GPUs: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
sizes() { for n in "$@"; do [ "$n" -le "$GPUS" ] && echo -n "$n "; done; }
for block in $BLOCKS; do case $block in
1)  # correctness: greedy tokens at N ranks against N = 1 (bf16, CUDA graphs)
    timeout 900 $PY -m pytest -q tests/executor/test_tensor_parallel_gpu.py -rs 2>&1 | tail -8 ;;
2)  # decode step scaling on the 8B shape, all-reduce time by category
    for n in $(sizes 1 2 4 8); do
        timeout 300 $PY benchmarks/decode_step.py --model random:llama-3.1-8b \
            --tensor-parallel-size "$n" --batch 1 64 256 --profile 1 64 256 --idle-batch \
            --json "$OUT/decode_tp$n.json" > "$OUT/decode_tp$n.log" 2>&1
        echo "decode N=$n rc=$?"
    done ;;
3)  # a model no one GPU holds, against one rank's roofline
    s=$(sizes 4 8 | tr ' ' ',' | sed 's/,$//')
    [ -n "$s" ] && timeout 1800 $PY benchmarks/tensor_parallel.py --device cuda --sizes "$s" \
        --model random:llama-3.1-70b --fixed 1000 1000 1024 --mixed 1000 \
        --json "$OUT/tp70b.json" 2>&1 | grep "N=" ;;
4)  # engine replicas, one GPU each, against K times one; cache-aware hit rate
    timeout 1800 $PY -P benchmarks/replicas.py --model random:llama-3.1-8b --device cuda \
        --scale $(sizes 1 2 4 8) --shared 32 8 1024 64 128 \
        --json "$OUT/replicas_scale.json" 2>&1 | tail -20 ;;
esac; done
