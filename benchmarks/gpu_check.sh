#!/usr/bin/env bash
# GPU check for the Triton kernels (issue 5), on one CUDA machine in < 8 min:
#   1. the kernel tests compiled for the GPU (bf16 and large shapes included),
#   2. benchmarks/bench_attention.py and benchmarks/bench_unmask.py,
#   3. a short summary table, printed last.
# Everything lands in "${OUT:-benchmarks/out}": gpu.txt, pytest.txt, *.json, *.txt.
# A failing step does not stop the next (GPU time is scarce); the exit status
# is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
export PYTHONDONTWRITEBYTECODE=1
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep a log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" \
    | tee -a "$out/gpu.txt"
step pytest 240 python3 -m pytest tests/kernels -q -rs -p no:cacheprovider
step bench_attention 150 python3 benchmarks/bench_attention.py --iters 20 --json "$out/bench_attention.json"
step bench_unmask 75 python3 benchmarks/bench_unmask.py --iters 20 --json "$out/bench_unmask.json"

echo
echo "== summary ($(head -n1 "$out/gpu.txt"))"
grep -E "passed|failed|error" "$out/pytest.txt" | tail -n1
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
att, unm = out / "bench_attention.json", out / "bench_unmask.json"
if att.exists():
    print(f"{'attention':24s} {'ours us':>9s} {'x sdpa loop':>11s} {'x sdpa dense':>12s} {'floor':>6s}")
    for r in json.loads(att.read_text())["rows"]:
        name = f"{r['case']} b{r['batch']} q{r['q_len']} kv{r['cache_len']}"
        print(f"{name:24s} {r['ours_us']:9.1f} {r['speedup_vs_loop']:11.2f} {r['speedup_vs_batched']:12.2f} "
              f"{r['floor_frac']:6.1%}")
if unm.exists():
    print(f"{'unmask':24s} {'ours us':>9s} {'x torch':>11s} {'':>12s} {'floor':>6s}")
    for r in json.loads(unm.read_text())["rows"]:
        name = f"{r['case']} b{r['batch']} rows{r['rows']}"
        print(f"{name:24s} {r['ours_us']:9.1f} {r['speedup']:11.2f} {'':>12s} {r['floor_frac']:6.1%}")
PY
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
