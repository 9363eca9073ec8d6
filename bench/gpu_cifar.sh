#!/usr/bin/env bash
# The CIFAR-10 SimCLR recipe through local_runner.py on an NVIDIA GPU (ResNet-18, batch 512,
# mixed precision, kNN monitor every 10 epochs) for EPOCHS pretraining epochs, recording seconds
# per epoch, kNN top-1 over time and peak device memory as a markdown snippet.
#
#   bench/gpu_cifar.sh EPOCHS [local_runner.py flags...]
#
# Flags after EPOCHS are passed on last, so they override the recipe (tests run it on CPU with a
# tiny subset and model that way). Precision: bfloat16 on GPUs of compute capability 8.0 and up,
# float16 (loss scaling) below, float32 without a GPU; --mixed_precision=... overrides.
#
# Environment:
#   DATA_DIR          CIFAR-10 class folders (default ../shared/data/cifar10)
#   OUT_DIR           where each run gets a folder run-<UTC time> (default output/gpu_cifar)
#   PYTHON            interpreter (default .venv/bin/python)
#   NVIDIA_SMI        the nvidia-smi to query and poll (default nvidia-smi)
#   GPU_CIFAR_RECORD  file the snippet is appended to (default docs/benchmarks.md when a GPU is
#                     present, none otherwise; empty: none)
#   DRY_RUN=1         print the precision and the local_runner.py command, run nothing
#
# Writes <run>/log.txt, gpu_memory.csv (nvidia-smi polled every 500 ms), gpu_cifar.json and
# gpu_cifar.md. TF_FORCE_GPU_ALLOW_GROWTH=true makes TensorFlow take device memory as it needs it
# rather than all of it up front, so the polled peak means something.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: bench/gpu_cifar.sh EPOCHS [local_runner.py flags...]"
epochs="${1:-}"
if [[ ! "$epochs" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: EPOCHS must be a positive integer, got '${epochs}'" >&2
  echo "$usage" >&2
  exit 2
fi
shift

DATA_DIR="${DATA_DIR:-../shared/data/cifar10}"
OUT_DIR="${OUT_DIR:-output/gpu_cifar}"
PYTHON="${PYTHON:-.venv/bin/python}"
NVIDIA_SMI="${NVIDIA_SMI:-nvidia-smi}"

gpu_name=""
compute_cap=""
if command -v "$NVIDIA_SMI" >/dev/null 2>&1 && "$NVIDIA_SMI" -L >/dev/null 2>&1; then
  gpu_name="$("$NVIDIA_SMI" --query-gpu=name --format=csv,noheader | head -n 1)"
  compute_cap="$("$NVIDIA_SMI" --query-gpu=compute_cap --format=csv,noheader | head -n 1)"
fi

# bfloat16 tensor cores arrived with compute capability 8.0 (Ampere); older GPUs get float16.
if [[ -z "$gpu_name" ]]; then
  precision=float32
elif awk -v cap="$compute_cap" 'BEGIN { exit !(cap + 0 >= 8.0) }'; then
  precision=bfloat16
else
  precision=float16
fi
for arg in "$@"; do
  case "$arg" in
    --mixed_precision=*) precision="${arg#--mixed_precision=}" ;;
  esac
done
device="${gpu_name:-CPU (no NVIDIA GPU)}"
# Where nvidia-smi sees a GPU, TensorFlow must see it too: --accelerator=gpu stops the run in one
# line instead of timing the CPU (an image without CUDA libraries, a hidden device).
accelerator=()
if [[ -n "$gpu_name" ]]; then
  accelerator=(--accelerator=gpu)
fi

run_dir="$OUT_DIR/run-$(date -u +%Y%m%d-%H%M%S)"
cmd=(
  "$PYTHON" local_runner.py
  --dataset=cifar10
  "--data_dir=$DATA_DIR"
  "--model_dir=$run_dir"
  --resnet_depth=18
  --train_batch_size=512
  "--mixed_precision=$precision"
  "${accelerator[@]}"
  --knn_every_epochs=10
  "--train_epochs=$epochs"
  "$@"
)
echo "device: $device; precision: $precision"
echo "command: ${cmd[*]}"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  exit 0
fi

mkdir -p "$run_dir"
memory_csv="$run_dir/gpu_memory.csv"
poller=""
if [[ -n "$gpu_name" ]]; then
  "$NVIDIA_SMI" --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 \
    >"$memory_csv" 2>/dev/null &
  poller=$!
fi
stop_poller() {
  if [[ -n "$poller" ]]; then
    kill "$poller" 2>/dev/null || true
    wait "$poller" 2>/dev/null || true
    poller=""
  fi
}
trap stop_poller EXIT

export TF_USE_LEGACY_KERAS=1 TF_FORCE_GPU_ALLOW_GROWTH=true
started=$(date +%s)
set +e
"${cmd[@]}" 2>&1 | tee "$run_dir/log.txt"
status=${PIPESTATUS[0]}
set -e
stop_poller
if [[ "$status" != 0 ]]; then
  echo "error: local_runner.py exited with $status (log: $run_dir/log.txt)" >&2
  exit "$status"
fi

record="${GPU_CIFAR_RECORD-}"
if [[ -z "${GPU_CIFAR_RECORD+set}" && -n "$gpu_name" ]]; then
  record=docs/benchmarks.md
fi
"$PYTHON" - "$run_dir" "$memory_csv" "$device" "$precision" "bench/gpu_cifar.sh $epochs $*" \
  "$(date -u +%Y-%m-%d)" "$(($(date +%s) - started))" <<'EOF'
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
sys.path.insert(0, "bench")
from quality import write_pipeline_run_report

run_dir, memory_csv, device, precision, command, date, wall = sys.argv[1:]
report = write_pipeline_run_report(
    run_dir,
    os.path.join(run_dir, "log.txt"),
    memory_csv,
    os.path.join(run_dir, "gpu_cifar"),
    device=device,
    precision=precision,
    command=command,
    date=date,
    script_wall_seconds=wall,
)
print(open(os.path.join(run_dir, "gpu_cifar.md")).read())
EOF
if [[ -n "$record" ]]; then
  { echo; cat "$run_dir/gpu_cifar.md"; } >>"$record"
  echo "recorded in $record"
fi
echo "report: $run_dir/gpu_cifar.md"
