#!/usr/bin/env bash
# Downloads into .whl/ the wheels of the packages that scripts/gpu_check.sh needs and the GPU machine
# lacks, since nothing can be downloaded there. From the repository's root, where pip reaches PyPI:
#
#     scripts/prepare_gpu_wheels.sh
#
# The machine's image has Python 3.12 with jax 0.11.2, flax, optax, orbax-checkpoint, torch 2.11.0,
# transformers 5.17.0, huggingface-hub 1.33.0, safetensors 0.8.0, numpy, scipy, pillow, matplotlib, tqdm,
# absl-py and PyYAML, but neither diffusers nor ml_collections. Their other requirements are there:
# diffusers 0.42.1 (the version this project's tests and benchmarks ran with) asks for huggingface-hub
# >= 1.32 and safetensors >= 0.8, and for importlib_metadata only on Python < 3.8; ml_collections for
# absl-py and PyYAML.
set -euo pipefail

WHEELS=(diffusers==0.42.1 ml_collections==1.1.0)
LIMIT_MIB=64 # what one run of the GPU machine carries: the working tree and .whl/ together

if [ ! -f scripts/gpu_check.sh ]; then
  echo "prepare_gpu_wheels.sh: run it from the esd-jax repository's root" >&2
  exit 2
fi
# Ignored, so that git leaves the wheels out and the run carries them by name.
if ! git check-ignore -q .whl/probe.whl; then
  echo /.whl/ >>"$(git rev-parse --git-path info/exclude)"
fi
# Afresh: two versions of one package stop the install there.
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"

ls -l .whl
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 2^20 }'; }
echo "wheels: $(mib "$wheels"); with the working tree that travels beside them: $(mib $((wheels + tree)))" \
  "of the $LIMIT_MIB MiB a run carries"
if [ $((wheels + tree)) -ge $((LIMIT_MIB * 2 ** 20)) ]; then
  echo "prepare_gpu_wheels.sh: over $LIMIT_MIB MiB: the run would not start" >&2
  exit 1
fi
