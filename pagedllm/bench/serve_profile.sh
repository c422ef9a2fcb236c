#!/usr/bin/env bash
# py-spy profiles of a live `pagedllm serve` (Qwen3-0.6B, dummy weights, bf16) while the nano workload
# streams through it: the API process and the engine core process sampled side by side for 8 s.
#   usage: bash pagedllm/bench/serve_profile.sh OUT_DIR [SERVE_FLAG...]   (from the repository root; needs py-spy)
# Writes OUT_DIR/profile-{api,core}.txt (py-spy's raw collapsed stacks), profile-{server,client}.log.
# Summarise a profile with: python3 -m pagedllm.bench.profile_summary OUT_DIR/profile-api.txt
set -u
OUT=${1:?usage: serve_profile.sh OUT_DIR [SERVE_FLAG...]}
shift
mkdir -p "$OUT"
PY=${PYTHON:-python3}
PORT=${PORT:-8765}
"$PY" -m pagedllm.entrypoints.cli serve ${MODEL:-Qwen/Qwen3-0.6B} --load-format dummy --dtype ${DTYPE:-bfloat16} --max-model-len 4096 \
  --port "$PORT" --uvicorn-log-level warning "$@" > "$OUT/profile-server.log" 2>&1 &
SERVER=$!
for _ in $(seq 300); do
  "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null && break
  sleep 1
done
CORE=$(pgrep -P "$SERVER" -f pagedllm.engine.core_proc | head -1)
"$PY" -m pagedllm.entrypoints.cli bench serve --base-url "http://127.0.0.1:$PORT/v1" --dataset nano --vocab-size ${VOCAB:-151936} \
  --num-prompts 256 --client-processes 4 > "$OUT/profile-client.log" 2>&1 &
CLIENT=$!
sleep 6
py-spy record -p "$SERVER" -d 8 -r 100 -f raw -o "$OUT/profile-api.txt" --nonblocking > "$OUT/py-spy-api.log" 2>&1 &
API_SPY=$!
py-spy record -p "$CORE" -d 8 -r 100 -f raw -o "$OUT/profile-core.txt" --nonblocking > "$OUT/py-spy-core.log" 2>&1 &
CORE_SPY=$!
wait "$API_SPY" "$CORE_SPY"
wait "$CLIENT"
tail -n 4 "$OUT/profile-client.log"
kill -TERM "$SERVER"
wait "$SERVER"
