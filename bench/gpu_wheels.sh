#!/usr/bin/env bash
# The Python packages bench/gpu_check.py needs that a lent GPU machine lacks (its Python 3.12 has
# torch, transformers, tokenizers, safetensors, huggingface_hub, numpy, pillow, tqdm and
# nvidia-ml-py, but not diffusers, PyAV or sageattention), downloaded here as wheels into the ignored .whl/.
# On the device: carry .whl and start the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
# The wheels (42 MB) and the tracked tree (24 MB) together stay under the 64 MiB a call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl diffusers==0.42.1 av==18.1.0 importlib_metadata zipp
# SageAttention 1 is pure Python on Triton (which the device's CUDA torch brings): --attention sage
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl sageattention==1.0.6
ls -la .whl
