#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one run, sized for a short device lease: ours and
# timm (train + inference), ours with cuBLAS for every matmul, and where the step's time goes.
# About 7 minutes for B/16 at batch 256 on an H100/H200 with the packages installed.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR
#   DEVICE=cpu ARGS="--variant Ti/4 --resolution 32 --batch 8 --steps 2 --repeats 2" bash benchmarks/gpu_checks.sh /tmp/dry
#
# Each step has its own time limit (STEP_TIMEOUT seconds), so one that hangs leaves the others' results.
set -uo pipefail
mkdir -p "${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR}"
out=$(cd "$1" && pwd)
device=${DEVICE:-gpu}
read -r -a args <<< "${ARGS:---variant B/16 --batch 256}"
cd "$(dirname "$0")/.."

run() {  # run NAME COMMAND...: log to OUT/NAME.log, print its exit status and the log's end.
  local name=$1
  shift
  local start=$SECONDS
  timeout "${STEP_TIMEOUT:-300}" "$@" > "$out/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - start)) s"
  tail -c 1200 "$out/$name.log"
  echo
}

if [ "$device" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$out/nvidia_smi.csv" 2>&1
fi
run throughput python benchmarks/throughput.py --device "$device" "${args[@]}" --json "$out/throughput.json"
run throughput_cublas env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
  python benchmarks/throughput.py --device "$device" "${args[@]}" --no_timm --json "$out/throughput_cublas.json"
run step_profile python tools/step_profile.py --device "$device" "${args[@]}" --steps 5 \
  --trace_dir "$out/trace" --json "$out/step_profile.json"
