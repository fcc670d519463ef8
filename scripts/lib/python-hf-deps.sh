#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs what kvc.hf and its tests need into a venv: torch for the CPU, transformers, gguf and
# accelerate (loading a GGUF model in transformers needs both).
#   scripts/lib/python-hf-deps.sh VENV
# PyPI's Linux torch wheel depends on ~3 GB of CUDA wheels. The CPU needs none of them, but
# libtorch_cuda.so is loaded at import and links four libraries that only those wheels carry
# (cufile, cusparseLt, nvshmem and an NCCL recent enough); the rest it finds in the system's CUDA
# toolkit when there is one. So: torch without its dependencies, its pure-Python dependencies, those
# four wheels (~560 MB), and `import torch` decides; if it fails (another machine), the full
# `pip install torch`. Versions are pinned: the four wheels are those this torch names.
set -euo pipefail
venv=${1:?usage: python-hf-deps.sh VENV}
pip=("$venv/bin/pip" install -q --disable-pip-version-check)
TORCH=torch==2.15.0
"${pip[@]}" --no-deps "$TORCH" "nvidia-cufile==1.17.1.22.*" nvidia-cusparselt-cu13==0.8.1 \
  nvidia-nvshmem-cu13==3.7.2 nvidia-nccl-cu13==2.30.7 accelerate==1.16.0
"${pip[@]}" filelock "sympy>=1.13.3" "mpmath<1.4" "networkx>=2.5.1" jinja2 "fsspec>=0.8.5" "typing_extensions>=4.13" \
  psutil transformers==5.25.0 gguf==0.19.0
if ! "$venv/bin/python" -c "import torch" > /dev/null 2>&1; then
  echo "python-hf-deps: torch without its CUDA wheels does not import here; installing it whole (~3 GB)"
  "${pip[@]}" "$TORCH"
fi
"$venv/bin/python" -c "import torch, transformers; print('python-hf-deps: torch', torch.__version__, '| transformers', transformers.__version__)"
