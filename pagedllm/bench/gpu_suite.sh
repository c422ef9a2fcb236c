#!/usr/bin/env bash
# The GPU benchmark suite (H100, Qwen3-0.6B bf16 with dummy weights: no checkpoint, no network).
#   usage: bash pagedllm/bench/gpu_suite.sh OUT_DIR [STEP...]   (run from the repository root)
# STEPs: latency prefix prefix-out10 prefix-hit75 throughput-nano serve-nano serve-profile step-profile
# data-parallel data-parallel-tenants64 latency-8b prefix-hit75-8b throughput-nano-8b (default: the first five;
# all together can outlast one 10-minute device command, so run them in several calls). step-profile: wall vs
# GPU kernel time per decode step at batch 1 and 128, the top kernels, the host's hot spots
# (benchmarks/step_profile.py, in its log); data-parallel: one engine core against two behind the server (needs
# 2 GPUs: nvidia-h200-x2); data-parallel-tenants64: the same on 64 system prompts x 32 requests with 3,500-block
# pools a core, where routing decides how much is recomputed. The -8b steps run Qwen3-8B (dummy weights).
# serve-nano: offline nano + latency, then the same requests through `pagedllm serve` with 1 and 2 API
# processes, streamed and not (bench serve-vs-offline); serve-profile: py-spy of a live server. Writes OUT_DIR/STEP.{json,md,png}
# and one log per step. Each step has its own time limit and a failing step does not stop the others.
# The prefix steps: prefix is DESIGN.md's example (10 system prompts x 10 requests, 128 output
# tokens); prefix-out10 the same with 10 output tokens (vLLM's prefix-caching benchmark default);
# prefix-hit75 has 50 requests per system prompt, so that ~75% of prompt tokens are actually served
# from the cache (with 10 per prompt, each prompt's first request misses and the hit rate is 67.5%).
# The throughput step saves its pagedllm result before the (slow) HF baseline starts, so a timeout
# there still leaves the main figure. HF `generate` runs only the first 128 nano requests (one padded
# batch of 128; --hf-max-requests, recorded in the JSON) and HF continuous batching gets 100 s.
# prefix uses --gpu-memory-utilization 0.45 (its KV need is ~13 GB) so the on and off engines never compete.
# PNGs need matplotlib; without it, re-draw later with: python3 -m pagedllm.bench.plots OUT_DIR/*.json
set -u
OUT=${1:?usage: gpu_suite.sh OUT_DIR [STEP...]}
shift
STEPS=${*:-latency prefix prefix-out10 prefix-hit75 throughput-nano}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
MODEL=Qwen/Qwen3-0.6B
ENGINE=(--load-format dummy --dtype bfloat16 --max-model-len 4096)
CLI=("$PY" -m pagedllm.entrypoints.cli bench)

{
  date; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  nvidia-smi 2>&1 | head -20
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('transformers', transformers.__version__)
try:
    import triton; print('triton', triton.__version__)
except ImportError: print('no triton')
try:
    import matplotlib; print('matplotlib', matplotlib.__version__)
except ImportError: print('no matplotlib: no PNGs')"
} > "$OUT/environment.log" 2>&1

status=0
step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/suite.log"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/suite.log"
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}

step latency 90 "${CLI[@]}" latency "$MODEL" "${ENGINE[@]}" --input-len 512 --output-len 256 --repeats 5 \
  --output "$OUT/latency"
PREFIX_ARGS=("${ENGINE[@]}" --gpu-memory-utilization 0.45 --prefix-len 768 --unique-len 256)
PREFIX=("${CLI[@]}" prefix "$MODEL" "${PREFIX_ARGS[@]}")
step prefix 110 "${PREFIX[@]}" --num-prefixes 10 --per-prefix 10 --output-len 128 --output "$OUT/prefix"
step prefix-out10 110 "${PREFIX[@]}" --num-prefixes 10 --per-prefix 10 --output-len 10 --output "$OUT/prefix-out10"
step prefix-hit75 150 "${PREFIX[@]}" --num-prefixes 4 --per-prefix 50 --output-len 10 --output "$OUT/prefix-hit75"
step throughput-nano 300 "${CLI[@]}" throughput "$MODEL" "${ENGINE[@]}" --workload nano --num-prompts 256 \
  --baseline hf --hf-batch-size 128 --hf-max-requests 128 --hf-timeout 100 --output "$OUT/throughput-nano"

step latency-8b 90 "${CLI[@]}" latency Qwen/Qwen3-8B "${ENGINE[@]}" --input-len 512 --output-len 256 --repeats 5 \
  --output "$OUT/latency-8b"
step prefix-hit75-8b 150 "${CLI[@]}" prefix Qwen/Qwen3-8B "${PREFIX_ARGS[@]}" --num-prefixes 4 --per-prefix 50 \
  --output-len 10 --output "$OUT/prefix-hit75-8b"
step throughput-nano-8b 150 "${CLI[@]}" throughput Qwen/Qwen3-8B "${ENGINE[@]}" --workload nano --num-prompts 256 \
  --output "$OUT/throughput-nano-8b"

step serve-nano 420 "${CLI[@]}" serve-vs-offline "$MODEL" "${ENGINE[@]}" --api-server-counts 1 2 \
  --client-processes 4 --output "$OUT/serve-nano"
step serve-profile 240 bash pagedllm/bench/serve_profile.sh "$OUT"
step step-profile 150 "$PY" benchmarks/step_profile.py "$MODEL"
step data-parallel 480 "${CLI[@]}" data-parallel "$MODEL" "${ENGINE[@]}" -dp 2 --output "$OUT/data-parallel"
step data-parallel-tenants64 300 "${CLI[@]}" data-parallel "$MODEL" "${ENGINE[@]}" -dp 2 --workloads tenants \
  --num-tenants 64 --num-gpu-blocks-override 3500 --repeats 3 --output "$OUT/data-parallel-tenants64"

ls -la "$OUT" | tee -a "$OUT/suite.log"
exit $status
