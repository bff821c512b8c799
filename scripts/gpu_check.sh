#!/usr/bin/env bash
# One-shot GPU check (`make gpu-check`): the gpu-marked tests, the nccl all-reduce benchmark
# (2+ GPUs only) and MFU of gpt:124m and gpt:1.3b on one GPU (ZeRO-2, then single), printing
# RESULT lines. The 1.3b runs accumulate 4 micro-batches of 8 x 2048 per optimizer step (MFU's
# usual setting: the optimizer step and ZeRO's copies are paid once per 4 micro-batches).
# Each step has its own timeout, cut to what is left of the whole budget (BUDGET_S, default
# 460 s: under 8 minutes with start-up); a failed step is reported and the others still run.
# Usage: scripts/gpu_check.sh [python]   (default: python3)
set -u
PY=${1:-${PY:-python3}}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_SILENT=true
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
failed=()
deadline=$(($(date +%s) + ${BUDGET_S:-460}))

step() {  # step NAME SECONDS COMMAND...   (the limit is cut to the budget left)
    local name=$1 limit=$2 start rc left
    shift 2
    left=$((deadline - $(date +%s) - 10))
    if [ "$left" -lt 30 ]; then
        echo "=== $name: skipped (${left}s of the budget left)"
        [ -n "${optional:-}" ] || failed+=("$name (skipped: budget spent)")
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "=== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - start))s"
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))")
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: $PY sees no CUDA device (torch missing or no GPU)"
    exit 2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")

step gpu-tests 180 "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider -o addopts=""
if [ "$gpus" -ge 2 ]; then
    step allreduce-nccl 60 "$PY" benchmarks/allreduce.py --backend nccl --worlds 2 --reps 3 \
        --sizes-mb 4 64 256
else
    echo "=== allreduce-nccl: skipped (needs 2+ GPUs, found $gpus)"
fi
step mfu-124m 70 "$PY" benchmarks/mfu.py --flavor 124m --device cuda --precision bf16 \
    --steps 30 --window 5
step mfu-1.3b-zero2 120 "$PY" benchmarks/mfu.py --flavor 1.3b --device cuda --precision bf16 \
    --strategy deepspeed --zero-stage 2 --accum 4 --steps 10 --window 2
step mfu-1.3b-single 100 "$PY" benchmarks/mfu.py --flavor 1.3b --device cuda --precision bf16 \
    --accum 4 --steps 10 --window 2
# With the budget left: ZeRO-2 with its gradient reduction on a side stream, overlapping the
# backward (overlap_comm; one GPU has no peer, so the "reduction" is only bucket copies).
optional=1 step mfu-1.3b-zero2-overlap 120 "$PY" benchmarks/mfu.py --flavor 1.3b --device cuda \
    --precision bf16 --strategy deepspeed --zero-stage 2 --accum 4 --steps 10 --window 2 \
    --ds-config '{"zero_optimization": {"overlap_comm": true}}'

if [ ${#failed[@]} -gt 0 ]; then
    printf 'gpu-check FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu-check: all steps passed"
