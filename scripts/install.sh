#!/usr/bin/env bash
# Creates .venv (if absent) and installs slm-export with the given extras (e.g. "test").
#   TORCH_SPEC   what to install for torch; default the CPU wheel CI uses (torch==2.13.0).
#                GPU users: install a CUDA build of torch >= 2.6 into .venv first and set
#                TORCH_SPEC=skip (see README, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
[ "$torch_spec" = skip ] || "${pip[@]}" "$torch_spec"
# The GPT-2 BPE ranks ship inside openai-whisper; we read one file of it and want none of
# its dependencies (numba, triton), hence --no-deps.
"${pip[@]}" --no-deps "openai-whisper==20250625"
"${pip[@]}" -e ".${extras:+[$extras]}"
.venv/bin/python -c "from slm_export.tokenizer import get_encoding; assert get_encoding().n_vocab == 50257"
