#!/usr/bin/env bash
# The GPU check: one script for a short slot on a machine with an NVIDIA GPU (CUDA torch,
# nvcc, CMake; maybe no package index, no `datasets`, no onnxruntime-gpu). Every step runs
# under its own time limit (scripts/gpu_check.py LIMITS) and says what it could not run and
# why; the report is OUT/gpu-check.json and OUT/gpu-check.txt.
#
#   bash scripts/gpu-check.sh --prepare          # here first: the data it needs (a few MB)
#   bash scripts/gpu-check.sh [--out DIR]        # on the GPU machine (~5-8 minutes)
#   bash scripts/gpu-check.sh --dry-run          # on a CPU: each step runs its CPU part or says
#                                                # "NEEDS CUDA" (CI runs this)
# Exit code: non-zero if a step failed (with --dry-run: failed other than needing CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
root="${SLM_GPU_CHECK_ROOT:-artifacts/gpu-check-root}"  # the prepared data, then the trained run
out=artifacts/gpu-check
dry=()
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) mode=prepare ;;
        --dry-run) dry=(--dry-run) ;;
        --out) out="$2"; shift ;;
        *) echo "gpu-check.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
    shift
done
py=.venv/bin/python
[ -x "$py" ] || py=python3
if [ "${mode:-}" = prepare ]; then
    exec "$py" scripts/gpu_check.py prepare "$root"
fi
if [ ! -d "$root/data" ]; then
    "$py" scripts/gpu_check.py prepare "$root" || { echo "gpu-check.sh: no prepared data in $root" \
        "and it cannot be prepared here: run --prepare where datasets is installed" >&2; exit 2; }
fi
rm -rf "$out/steps"
mkdir -p "$out"
limits="$("$py" -c 'import sys; sys.path.insert(0, "scripts"); import gpu_check as g; print(" ".join(f"{s}:{g.LIMITS[s]}" for s in g.STEPS))')"
for item in $limits; do
    step="${item%%:*}"; limit="${item##*:}"
    timeout --kill-after=10 "$limit" "$py" scripts/gpu_check.py step "$step" "$root" "$out" "${dry[@]}" \
        > "$out/$step.log" 2>&1
    echo "gpu-check: $step finished (exit $?)"
done
"$py" scripts/gpu_check.py report "$out" "${dry[@]}"
