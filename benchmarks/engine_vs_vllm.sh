#!/usr/bin/env bash
# The engine's headline benchmark: aiinfra's offline engine and vLLM's CPU build on the same bench-32m
# folder and the standard workload, back to back in one run, then the ratio.
# Usage: benchmarks/engine_vs_vllm.sh [OUT_DIR]   (creates the model and the workload when missing)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:-/tmp/aiinfra-engine-vs-vllm}
mkdir -p "$OUT"
[ -f "$OUT/bench-32m/config.json" ] || aiinfra models create --preset bench-32m --seed 0 "$OUT/bench-32m"
SHARED=${AIINFRA_SHARED:-$HERE/../../shared}
[ -f "$OUT/w128.jsonl" ] || python "$SHARED/bench/make_workload.py" "$OUT/w128.jsonl" 128 0
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
aiinfra bench serve --model "$OUT/bench-32m" --workload "$OUT/w128.jsonl" \
    --max-num-batched-tokens 8192 --json "$OUT/aiinfra.json"
"$HERE/vllm_baseline.sh" "$OUT/bench-32m" "$OUT/w128.jsonl" | tee "$OUT/vllm.json"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
ours = json.load(open(f"{out}/aiinfra.json"))
vllm = json.loads(open(f"{out}/vllm.json").read().strip().splitlines()[-1])
print(json.dumps({"aiinfra_tok_per_s": round(ours["output_tok_per_s"], 1),
                  "vllm_tok_per_s": round(vllm["output_tok_per_s"], 1),
                  "ratio": round(ours["output_tok_per_s"] / vllm["output_tok_per_s"], 3),
                  "output_tokens": [ours["output_tokens"], vllm["output_tokens"]]}))
PY
