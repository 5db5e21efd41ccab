#!/usr/bin/env bash
# One-shot GPU acceptance (issue 14 item 7): one run, under 8 minutes on one
# H100/H200, of independent parts; each part runs even if an earlier one
# failed, and a summary table is printed last.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --small         # CPU dry run at toy sizes (no measurement)
#   bash benchmarks/gpu_check.sh --parts a,b     # only these parts, in this order
#   bash benchmarks/gpu_check.sh --list          # the parts' names
#
# Writes three files into "${OUT:-benchmarks/out}" (the device tool brings
# back at most 8): gpu_check.log (everything printed), gpu_check.json (every
# part's record merged: {"machine": ..., "parts": {name: record}}) and
# summary.txt (the table printed last). Exit status: non-zero if any part failed.
#
# The parts, in run order (PARTS below):
#   golden       (b) shared/golden/llada-tiny through the engine: float32 token for token, bfloat16 logits,
#                    dual_cache with CUDA graphs captured and replayed against eager, token for token
#   load_8b      (c) a LLaDA-8B-shaped random bf16 checkpoint written to local disk, loaded: time, peak memory
#   decode       (d) tokens/s at concurrency 1/16/64, exact / dual_cache / dual_cache 4 per step, graphs
#                    off/on, step time beside the roofline floor (reuses load_8b's checkpoint, or writes it)
#   kernel_tests (a) tests/kernels compiled for the GPU, bench_attention.py, bench_unmask.py
#   moe          the MoE kernel's tests compiled for the GPU, bench_moe.py at LLaDA2.0-mini's shapes
#   tp           with two GPUs: golden cases at tensor parallel 2 equal one GPU, bench_tp.py; else skipped
#
# Adding a part: write benchmarks/gpu_parts/NAME.py that calls
# _part.run_part("NAME", body) (see kernel_tests.py; NAME must not be a
# top-level package of the repository: kernels, server, sampler). It gets
# --json PATH and, in a dry run, --small; it must write that JSON (run_part
# does, even on a crash) with "ok" and "summary" (lines for the final table,
# ~100 chars each). Then add "NAME SECONDS" to PARTS. SECONDS is its hard limit; keep
# the sum of limits within GPU_CHECK_BUDGET (470 s, so a whole run with start-up stays under 8 minutes;
# the six parts above take 470): a part that would start
# with less than its limit left gets only what is left, and none with
# under 10 s. Make --small run on CPU in seconds (tests/test_gpu_check.py
# dry-runs every part), and keep files a part writes elsewhere than $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

PARTS=(
    "golden 55"
    "load_8b 85"
    "decode 140"
    "kernel_tests 105"
    "moe 55"
    "tp 30"
)

small=()
only=""
while [ $# -gt 0 ]; do
    case $1 in
        --small) small=(--small) ;;
        --parts) only=$2; shift ;;
        --list) for p in "${PARTS[@]}"; do echo "${p%% *}"; done; exit 0 ;;
        *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

out="${OUT:-benchmarks/out}"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
exec > >(tee "$out/gpu_check.log") 2>&1
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# The golden sets: the tests read ../shared/golden beside the repository, which does not travel to a
# lent GPU machine; a shared/golden inside the checkout does (copy it there before the run:
# `cp -r ../shared/golden shared/`), and is then named to the tests by their LLADA_GOLDEN_* variables.
if [ ! -d "$repo/../shared/golden" ] && [ -d "$repo/shared/golden" ]; then
    for set in llada llada-moe llada2 dream; do
        var="LLADA_GOLDEN_$(echo "$set" | tr 'a-z-' 'A-Z_')"
        [ -d "$repo/shared/golden/$set-tiny" ] && [ -z "${!var:-}" ] && export "$var=$repo/shared/golden/$set-tiny"
    done
fi
[ ${#small[@]} -gt 0 ] || unset TRITON_INTERPRET  # compiled kernels, not the interpreter
budget=${GPU_CHECK_BUDGET:-470}
# A dry run (--small) checks that every part runs, not its speed: on a loaded CPU the
# interpreter and the subprocesses take longer than the GPU will, so its limits are 4x.
scale=1; [ ${#small[@]} -eq 0 ] || scale=4
budget=$((budget * scale))
start=$SECONDS

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } \
    | tee "$work/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" \
    2>&1 | tee -a "$work/machine.txt"

names=()
if [ -n "$only" ]; then
    IFS=, read -r -a names <<< "$only"
else
    for p in "${PARTS[@]}"; do names+=("${p%% *}"); done
fi
for name in "${names[@]}"; do
    limit=""
    for p in "${PARTS[@]}"; do [ "${p%% *}" = "$name" ] && limit=$((${p##* } * scale)); done
    if [ -z "$limit" ] || [ ! -f "benchmarks/gpu_parts/$name.py" ]; then
        echo "== $name: no such part" | tee "$work/$name.skip"
        continue
    fi
    left=$((budget - (SECONDS - start)))
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped, ${left}s of the ${budget}s budget left" | tee "$work/$name.skip"
        continue
    fi
    echo "== $name (limit ${limit}s)"
    t0=$SECONDS
    timeout -k 10 "$limit" python3 "benchmarks/gpu_parts/$name.py" --json "$work/$name.json" "${small[@]}"
    rc=$?
    echo "$rc $((SECONDS - t0))" > "$work/$name.rc"
    echo "== $name: exit $rc after $((SECONDS - t0))s"
done

python3 - "$work" "$out" "${names[@]}" <<'PY'
import json, sys
from pathlib import Path
work, out, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
merged = {"machine": (work / "machine.txt").read_text().strip().splitlines(), "parts": {}}
lines = [f"== summary: {' | '.join(merged['machine'])}", f"{'part':12s} {'status':8s} {'seconds':>7s}"]
details, failed = [], []
for name in names:
    rec_path, rc_path, skip = work / f"{name}.json", work / f"{name}.rc", work / f"{name}.skip"
    rc, secs = (rc_path.read_text().split() if rc_path.exists() else ("-", "0"))
    if rec_path.exists():
        rec = json.loads(rec_path.read_text())
        if rc != "0" and rec.get("ok"):  # crashed or timed out after writing a record
            rec["ok"] = False
    elif skip.exists():
        rec = {"part": name, "ok": False, "summary": [skip.read_text().strip()]}
    else:
        rec = {"part": name, "ok": False, "summary": [f"no record: exit {rc} ({'timed out' if rc in ('124', '137') else 'crashed'})"]}
    rec["exit"], rec["wall_seconds"] = rc, int(secs)
    merged["parts"][name] = rec
    status = "ok" if rec.get("ok") else ("skipped" if skip.exists() else "FAILED")
    if status != "ok":
        failed.append(name)
    lines.append(f"{name:12s} {status:8s} {int(secs):7d}")
    details += [f"-- {name}"] + [f"   {s}" for s in rec.get("summary", [])]
text = "\n".join(lines + details + ([f"FAILED: {' '.join(failed)}"] if failed else ["all parts passed"]))
(out / "gpu_check.json").write_text(json.dumps(merged, indent=1, default=str))
(out / "summary.txt").write_text(text + "\n")
print("\n" + text)
sys.exit(1 if failed else 0)
PY
