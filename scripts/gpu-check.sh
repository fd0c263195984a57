#!/usr/bin/env bash
# Proves the CUDA paths on a machine with an NVIDIA GPU; writes artifacts/gpu-check/:
#   doctor.txt / doctor.json   slm-doctor's tables (every backend on cpu and cuda)
#   tests.txt                  pytest -m cuda (every CUDA-only path has a test marked cuda)
#   results.json               pytest bench --bench-device cuda --bench-quick
# Run it after scripts/install.sh in GPU mode (README, GPU). Exit code: non-zero if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=artifacts/gpu-check
mkdir -p "$out"
py=.venv/bin/python
[ -x "$py" ] || py=python3
rc=0
"$py" -m slm_export.doctor --json "$out/doctor.json" 2>&1 | tee "$out/doctor.txt" || rc=1
"$py" -m pytest -m cuda -rs -q 2>&1 | tee "$out/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
grep -q "skipped" "$out/tests.txt" && grep -q "needs a CUDA device" "$out/tests.txt" && {
  echo "gpu-check: CUDA tests were skipped: this machine has no usable GPU" >&2; rc=1; }
"$py" -m pytest bench --benchmark-only --bench-device cuda --bench-quick \
  --bench-results "$out/results.json" 2>&1 | tee "$out/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
echo "gpu-check: $( [ $rc -eq 0 ] && echo PASSED || echo FAILED ); see $out/"
exit $rc
