#!/usr/bin/env bash
# One command to verify the GPU path on a machine with an NVIDIA GPU (docs/performance.md, "GPU check"):
#   1. parity: every graph a CUDA worker serves, on CUDA with I/O binding vs CPU, on real posts; encoder
#      throughput at the GPU sub-batch sizes (python -m stream.tools.gpu_check);
#   2. bench: compute limit and the real pipeline (broker → Faust → ONNX on CUDA → Redis → broker) with
#      CUDA workers, adaptive batches, latency at 50 and 80 % of saturation.
# Needs the `gpu` extra (onnxruntime-gpu instead of onnxruntime) and CUDA/cuDNN libraries. About 4 minutes.
#
#   scripts/gpu-check.sh MODEL_DIR DATA_DIR [OUT_DIR]
#
# GPU_CHECK_PROVIDER=cpu runs the same steps on CPU (checks the script on a machine without a GPU).
set -euo pipefail

model_dir=${1:?usage: scripts/gpu-check.sh MODEL_DIR DATA_DIR [OUT_DIR]}
data_dir=${2:?usage: scripts/gpu-check.sh MODEL_DIR DATA_DIR [OUT_DIR]}
out_dir=${3:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
provider=${GPU_CHECK_PROVIDER:-cuda}
python=${PYTHON:-python}
mkdir -p "$out_dir"

if [[ $provider == cuda ]]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out_dir/gpu.txt"
    "$python" -c 'import onnxruntime as ort, sys; p = ort.get_available_providers(); print(ort.__version__, p);
sys.exit(0 if "CUDAExecutionProvider" in p else "onnxruntime has no CUDA provider: pip install the gpu extra")'
fi
uptime | tee "$out_dir/uptime.txt"

echo "== 1/2 parity and encoder throughput on $provider"
"$python" -m stream.tools.gpu_check --model-dir "$model_dir" --data-dir "$data_dir" --provider "$provider" \
    ${GPU_CHECK_QUICK:+--posts 32 --batches 8 --seconds 0.3} --json "$out_dir/parity.json"

echo "== 2/2 bench with $provider workers"
workers=$(( $(nproc) < 4 ? $(nproc) : 4 ))
if [[ -n ${GPU_CHECK_QUICK:-} ]]; then
    sizes=(--seconds 1 --min-posts 40 --cell-seconds 0.3 --batches 8 --head-batches 32 --latency-seconds 1
           --sample-posts 32)
else
    sizes=(--seconds 10 --cell-seconds 2 --batches 64 128 256 --head-batches 256 --latency-seconds 6)
fi
SENTIMENT_PROVIDERS=$provider "$python" -m stream.cli bench --model-dir "$model_dir" --data-dir "$data_dir" \
    --mixes realistic --latency-mixes realistic --cache-mixes --policies adaptive --skip-naive \
    --procs "$workers" --loads 0.5 0.8 "${sizes[@]}" \
    --json "$out_dir/bench.json" --markdown "$out_dir/bench.md"
uptime | tee -a "$out_dir/uptime.txt"
echo "results in $out_dir (parity.json, bench.json, bench.md)"
