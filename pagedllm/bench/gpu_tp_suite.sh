#!/usr/bin/env bash
# Tensor parallelism on a 2-GPU host (Qwen3-0.6B, dummy weights): the GPU tests, then the nano
# workload at --tensor-parallel-size 1 and 2 on the same machine, one after the other.
#   usage: bash pagedllm/bench/gpu_tp_suite.sh OUT_DIR        (run from the repository root)
# Writes OUT_DIR/{tests.log, throughput-nano-tp1.*, throughput-nano-tp2.*, suite.log}.
set -u
OUT=${1:?usage: gpu_tp_suite.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ENGINE=(--load-format dummy --dtype bfloat16 --max-model-len 4096)

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/suite.log"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0))s" | tee -a "$OUT/suite.log"
}

nvidia-smi topo -m > "$OUT/topology.log" 2>&1
step tests 300 "$PY" -m pytest -v -s tests/test_gpu.py -k two_gpus -p no:cacheprovider
for tp in 1 2; do
  step "throughput-nano-tp$tp" 140 "$PY" -m pagedllm.entrypoints.cli bench throughput --workload nano \
    --num-prompts 256 Qwen/Qwen3-0.6B "${ENGINE[@]}" --tensor-parallel-size "$tp" --output "$OUT/throughput-nano-tp$tp"
done
