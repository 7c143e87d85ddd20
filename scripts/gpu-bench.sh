#!/usr/bin/env bash
# The figures only a GPU can give, in one short run (under 10 minutes on one modern GPU):
#   1. `bench iteration` at the Flickr-500 shape (NFNet-L0 at 224 px, BERT-size texts, mini-batch 40, 8 synthetic
#      steps, 200 pairs), float32, then with the GPU switches (distill.autocast = bfloat16, distill.channels_last);
#   2. `mmdistill demo` on the GPU, timed.
# Everything lands in OUT (default runs/gpu-bench): machine.txt, iteration-*.json, demo.log, summary.txt.
# Nothing is downloaded: the benchmark builds randomly initialised encoders; the demo uses the offline weights
# that `make setup` installed. Each step has its own time limit, and a step that fails is reported, not hidden.
#
#   scripts/gpu-bench.sh [OUT]
#   GPU_BENCH_TINY=1 scripts/gpu-bench.sh [OUT]   # the same steps shrunk to a CPU smoke test of this script
#
# PYTHON selects the interpreter (default .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-bench}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"

if [ "${GPU_BENCH_TINY:-0}" = 1 ]; then
  DEVICE=cpu
  SHAPE=(--preset shapes-tiny)
  DEMO=(run --preset shapes-tiny)
  LIMIT_BENCH=900 LIMIT_DEMO=900
else
  DEVICE=cuda
  SHAPE=(--preset flickr30k-500 --set data.image_size=224 --set distill.mini_batch_size=40 --set distill.syn_steps=8)
  DEMO=(demo)
  LIMIT_BENCH=210 LIMIT_DEMO=150
  if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu-bench: no CUDA device visible to $PY (GPU_BENCH_TINY=1 runs the CPU smoke test)" >&2
    exit 2
  fi
fi

{
  date -u
  uptime
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, mmdistill; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'mmdistill', mmdistill.__version__)"
} > "$OUT/machine.txt" 2>&1

status=0
run_step() {  # name, time limit (s), output file, command...
  local name=$1 limit=$2 file=$3
  shift 3
  local start=$SECONDS
  timeout "$limit" "$@" > "$file" 2> "$OUT/$name.err"
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" >> "$OUT/summary.txt"
  [ $rc -eq 0 ] || { status=1; tail -n 5 "$OUT/$name.err" >> "$OUT/summary.txt"; }
}

: > "$OUT/summary.txt"
run_step iteration-fp32 "$LIMIT_BENCH" "$OUT/iteration-fp32.json" \
  "$PY" -m mmdistill bench iteration "${SHAPE[@]}" --device "$DEVICE" --json
run_step iteration-bf16 "$LIMIT_BENCH" "$OUT/iteration-bf16.json" \
  "$PY" -m mmdistill bench iteration "${SHAPE[@]}" --device "$DEVICE" --json \
  --set distill.autocast=true --set distill.channels_last=true
rm -rf "$OUT/demo"
run_step demo "$LIMIT_DEMO" "$OUT/demo.log" "$PY" -m mmdistill "${DEMO[@]}" --device "$DEVICE" --out "$OUT/demo"

"$PY" - "$OUT" >> "$OUT/summary.txt" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
keys = ("seconds_per_iteration", "ratio", "peak_rss_gib", "peak_cuda_gib", "seconds_per_iteration_tesla",
        "ratio_tesla", "memory_ratio_20_vs_5")
for variant in ("fp32", "bf16"):
    path = out / f"iteration-{variant}.json"
    lines = path.read_text().strip().splitlines() if path.exists() else []
    if not lines:
        print(f"iteration {variant}: no result")
        continue
    result = json.loads(lines[-1])
    shown = ", ".join(f"{k} {result[k]:.3g}" for k in keys if isinstance(result.get(k), (int, float)))
    print(f"iteration {variant} ({result['device']}, {result['syn_steps']} steps, mini-batch "
          f"{result['mini_batch_size']}, {result['pairs']} pairs): {shown}")
EOF
cat "$OUT/summary.txt"
exit $status
