#!/usr/bin/env bash
# Online serving against the offline engine on the same workload, in one run: offline throughput, then a
# server on a free port measured at saturation and at 2 and 4 requests/s (Poisson).
# Usage: benchmarks/serve_online.sh [OUT_DIR]
# Env: RATES (default "inf 2 4"), SERVE_ARGS (extra `aiinfra serve` flags, e.g. --no-engine-process).
set -euo pipefail
OUT=${1:-/tmp/aiinfra-serve-online}
RATES=${RATES:-inf 2 4}
N=0
mkdir -p "$OUT"
[ -f "$OUT/bench-32m/config.json" ] || aiinfra models create --preset bench-32m --seed 0 "$OUT/bench-32m"
W="--num-prompts 128 --input-len 64,512 --output-len 32,256 --vocab 8192 --seed 0"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
aiinfra bench serve --model "$OUT/bench-32m" $W --kv-cache-memory 4GiB --json "$OUT/offline.json"
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
aiinfra serve "$OUT/bench-32m" --port "$PORT" --kv-cache-memory 4GiB --max-num-seqs 256 \
    ${SERVE_ARGS:-} > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.5; done
URL=http://127.0.0.1:$PORT
# warm-up on other prompts (seed 99); each rate after saturation gets its own prompts (seeds 1, 2, ...), so
# no run is served from the prefix cache of an earlier one: saturation runs the offline workload
aiinfra bench serve --url "$URL" --num-prompts 4 --input-len 64,512 --output-len 32,256 --vocab 8192 --seed 99 > /dev/null
for RATE in $RATES; do
    SEED=0; [ "$RATE" = inf ] || SEED=$((++N))
    aiinfra bench serve --url "$URL" ${W/--seed 0/--seed $SEED} --request-rate "$RATE" \
        --json "$OUT/online_$RATE.json" --plot "$OUT/cdf_$RATE.png"
    # the engine core's CPU seconds so far (the bench's server_cpu_seconds is the API process's)
    curl -s "$URL/metrics" | grep '^engine_core_process_cpu_seconds_total' || true
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
python - "$OUT" $RATES <<'PY'
import json, sys
out = sys.argv[1]
off = json.load(open(f"{out}/offline.json"))["output_tok_per_s"]
print(json.dumps({"offline_tok_per_s": round(off, 1)}))
for rate in sys.argv[2:]:
    on = json.load(open(f"{out}/online_{rate}.json"))
    print(rate, json.dumps({k: v for k, v in on.items() if not isinstance(v, (list, dict))})[:900])
    if rate == "inf":
        print(f"online/offline at saturation: {on['output_tok_per_s'] / off:.3f}")
PY
