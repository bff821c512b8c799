#!/usr/bin/env bash
# One-shot GPU check (`make gpu-check`): the gpu-marked tests, the nccl all-reduce benchmark
# (2+ GPUs only) and MFU of gpt:124m and gpt:1.3b (ZeRO-2, one GPU), printing RESULT lines.
# Each step has its own timeout; a failed step is reported and the others still run.
# Total budget: under 8 minutes. Usage: scripts/gpu_check.sh [python]   (default: python3)
set -u
PY=${1:-${PY:-python3}}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_SILENT=true
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
failed=()

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
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

step gpu-tests 220 "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider -o addopts=""
if [ "$gpus" -ge 2 ]; then
    step allreduce-nccl 60 "$PY" benchmarks/allreduce.py --backend nccl --worlds 2 --reps 3 \
        --sizes-mb 4 64 256
else
    echo "=== allreduce-nccl: skipped (needs 2+ GPUs, found $gpus)"
fi
step mfu-124m 80 "$PY" benchmarks/mfu.py --flavor 124m --device cuda --precision bf16 \
    --steps 30 --window 5
step mfu-1.3b-zero2 150 "$PY" benchmarks/mfu.py --flavor 1.3b --device cuda --precision bf16 \
    --strategy deepspeed --zero-stage 2 --steps 20 --window 4

if [ ${#failed[@]} -gt 0 ]; then
    printf 'gpu-check FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu-check: all steps passed"
