#!/usr/bin/env bash
# The GPU check (issue 7), one script: versions, `pytest -m gpu`, then scripts/gpu_check.py's
# benchmarks on bench-1b in bf16 (engine vs HF static batching in the same run; batch-1 decode
# against the card's HBM bandwidth). Installs nothing: it needs python3 with torch, triton,
# transformers, pytest, typer, rich, safetensors and tokenizers; the repo need not be installed.
#   bash scripts/gpu_check.sh                      # on the GPU machine, < 6 minutes on an H100
#   bash scripts/gpu_check.sh --smoke --device cpu # the same steps on the tiny model, on CPU
# With OUT set, the summary goes to $OUT/gpu_check.json and pytest's report to $OUT/pytest.txt.
# Exits non-zero if any step fails (the targets are printed, not enforced).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
fail() { echo "FAILED: $*"; status=1; }
step() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

step "machine"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi || fail "nvidia-smi"
else
    echo "no nvidia-smi on this machine"
fi
python3 - <<'PY' || fail "versions"
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda)
for name in ("triton", "transformers"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "missing")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
else:
    print("device: no CUDA")
PY

step "pytest -m gpu"
ignore=()
if ! python3 -c "import fastapi, uvicorn, openai" 2>/dev/null; then
    ignore=(--ignore=tests/serve)  # the server's tests import fastapi / openai at module level
    echo "fastapi, uvicorn or openai missing: tests/serve not collected"
fi
report=/dev/null
[ -n "${OUT:-}" ] && report="$OUT/pytest.txt"
timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider ${ignore[@]+"${ignore[@]}"} tests \
    2>&1 | tee "$report"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "pytest -m gpu"

step "benchmarks"
json=()
[ -n "${OUT:-}" ] && json=(--json "$OUT/gpu_check.json")
timeout 420 python3 scripts/gpu_check.py ${json[@]+"${json[@]}"} "$@" || fail "scripts/gpu_check.py"

step "done: $([ $status -eq 0 ] && echo ok || echo FAILED)"
exit $status
