#!/usr/bin/env bash
# Creates .venv (if absent) and installs slm-export with the given extras (e.g. "test",
# "gpu", "gpu,test"). With "test", Debian's chromium and chromedriver too (the playground's
# browser test), where apt-get can install them; otherwise that test skips and says why.
#   TORCH_SPEC   what to install for torch; default torch==2.13.0 (on Linux x86_64 PyPI serves
#                it as a CUDA 13 build; this project's machines find a CPU wheel on disk).
#                TORCH_SPEC=skip keeps the torch already in .venv.
#   gpu          the extra that adds onnxruntime-gpu's CUDA 13 and cuDNN 9 libraries from pip;
#                the script then checks that torch and onnxruntime-gpu use one CUDA major.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
pip=("$py" -m pip --quiet --disable-pip-version-check)
# Earlier versions of this script installed openai-whisper without its dependencies, which
# pip check reports as broken; the one file we used from it now has its own place (below).
# (pip check without --quiet: --quiet hides its report.)
broken="$("$py" -m pip check 2>/dev/null || true)"
if grep -q '^openai-whisper ' <<<"$broken"; then
    "${pip[@]}" uninstall --yes openai-whisper
fi
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
[ "$torch_spec" = skip ] || "${pip[@]}" install "$torch_spec"
"${pip[@]}" install -e ".${extras:+[$extras]}"
# The GPT-2 BPE ranks ship inside the openai-whisper sdist (MIT). We take that one file out
# of the downloaded sdist into the environment's data folder (slm_export.tokenizer.BPE_DATA),
# checked by SHA-256, and install nothing of whisper: its dependencies (numba, triton) are
# not ours.
if ! "$py" -c "from slm_export import tokenizer as t; t.load_ranks(t.BPE_DATA)" 2>/dev/null; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "${pip[@]}" download --no-deps --no-binary openai-whisper --dest "$tmp" "openai-whisper==20250625"
    "$py" -c "import sys; from slm_export.tokenizer import extract_ranks; extract_ranks(sys.argv[1])" \
        "$tmp"/*.tar.gz
fi
"$py" -c "from slm_export.tokenizer import get_encoding; assert get_encoding().n_vocab == 50257"
if [[ ",$extras," == *,test,* ]] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
    if command -v apt-get >/dev/null && "${sudo[@]}" true 2>/dev/null; then
        { "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" \
            apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >/dev/null 2>&1 \
            || echo "install.sh: apt-get could not install chromium (the browser test will skip)"
    else
        echo "install.sh: no apt-get with root here: the browser test will skip without chromium"
    fi
fi
if [[ ",$extras," == *,gpu,* ]]; then  # GPU mode: refuse a mixed install now, not at first use
    "$py" - <<'PY'
import sys, torch
from slm_export.artifacts.loaders import ort_cuda_problem
if not torch.version.cuda:
    sys.exit(f"error: torch {torch.__version__} is a CPU build: install its CUDA build "
             "(TORCH_SPEC, README GPU) and run this again")
problem = ort_cuda_problem() or (None if torch.cuda.is_available() else
                                 "torch sees no CUDA device (is the NVIDIA driver installed?)")
if problem:
    sys.exit(f"error: {problem}")
print(f"GPU install: torch {torch.__version__} (CUDA {torch.version.cuda}) and onnxruntime-gpu"
      " agree; next: .venv/bin/slm-doctor")
PY
fi
