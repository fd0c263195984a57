#!/usr/bin/env bash
# The tests, as CI runs them (.ci/run) and README's second command: install what they need,
# lint, the test suite, then the quick benchmark on the suite's own trained run (each
# backend against naive, parity checked on its first call). pytest's exit code is the
# script's: 5 ("no tests collected") fails too.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export SLM_TEST_RUN="${SLM_TEST_RUN:-artifacts/test-run}"  # the trained run the tests share
bash scripts/install.sh test
.venv/bin/ruff check .
.venv/bin/python -m pytest -q
.venv/bin/python -m pytest bench --benchmark-only --bench-model "$SLM_TEST_RUN/run" --bench-quick -q
