#!/usr/bin/env bash
# The GPU check: an ESD-x iteration (esd-jax against the official-style PyTorch loop, and esd-jax's fast
# mode) and sampling (esd-jax against diffusers) at SD 1.4's size, 512 px, bfloat16, random weights, as
# seconds, achieved TFLOP/s and share of the card's peak. From the repository's root, on a GPU machine
# that has no network (docs/benchmarks.md, "GPU check"):
#
#     scripts/gpu_check.sh           # with .whl/ from scripts/prepare_gpu_wheels.sh beside it
#     scripts/gpu_check.sh --smoke   # the same steps on a tiny UNet: on a CPU, about 2 minutes
#
# Each benchmark runs under a time limit, GPU_CHECK_ESD_S and GPU_CHECK_SAMPLE_S seconds (240 and 150),
# so that the whole takes at most about 7 minutes; one that fails or runs out is reported, and the rest
# still run. With OUT set, the log (gpu_check.log) and every result (gpu_check.json) are written there.
set -uo pipefail

smoke=0
case "$*" in
  "") ;;
  --smoke) smoke=1 ;;
  *)
    echo "usage: scripts/gpu_check.sh [--smoke]" >&2
    exit 2
    ;;
esac
if [ ! -f scripts/bench_esd.py ]; then
  echo "gpu_check.sh: run it from the esd-jax repository's root" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

stage() { # title, seconds, command...: the command under its time limit; a failure does not stop the check
  local title=$1 limit=$2
  shift 2
  echo
  echo "== $title, at most $limit s: $*"
  local began=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    echo "== $title: stopped at its limit of $limit s (GPU_CHECK_ESD_S and GPU_CHECK_SAMPLE_S set the limits)"
  elif [ $rc != 0 ]; then
    echo "== $title: failed (exit status $rc) after $((SECONDS - began)) s"
  else
    echo "== $title: $((SECONDS - began)) s"
  fi
}

check() {
  # The packages the GPU machine lacks, as wheels; esd-jax itself from this tree.
  if compgen -G ".whl/*.whl" >/dev/null; then
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$work/site" .whl/*.whl || return 1
  fi
  export PYTHONPATH="$work/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  if ! python3 -c "import diffusers, ml_collections" 2>/dev/null; then
    echo "gpu_check.sh: diffusers or ml_collections is missing: run scripts/prepare_gpu_wheels.sh where pip" \
      "works, and bring .whl/ along" >&2
    return 1
  fi

  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null ||
    echo "nvidia-smi: no NVIDIA GPU here"
  python3 - "$work/card.json" <<'PY' || return 1
import json
import os
import sys
import time

os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # JAX only lists its devices here
import jax
import torch

# Dense bfloat16 tensor-core TFLOP/s per NVIDIA's datasheets (they print twice these, "with sparsity"):
# the first name found in the card's name wins.
PEAKS = [("H200 NVL", 835), ("H200", 989), ("H100 NVL", 835), ("H100 PCIe", 756), ("H100", 989), ("A100", 312)]
print(f"python {sys.version.split()[0]}, jax {jax.__version__}: {jax.devices()}, torch {torch.__version__}")
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name() if cuda else "cpu"
peak = next((tflops for key, tflops in PEAKS if key in name), None)
matmul = None
if cuda:  # the ceiling a framework reaches on this card: the mean of 10 products after 3
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    matmul = 10 * 2 * 8192**3 / (time.perf_counter() - began) / 1e12
with open(sys.argv[1], "w") as f:
    json.dump(dict(name=name, peak_tflops=peak, matmul_tflops=matmul), f)
PY

  local esd sample
  if [ $smoke = 1 ]; then
    esd=(--unet tiny --latent 16 --iterations 2 --trajectories 2)
    sample=(--model tiny --batches 1)
    # Its times mean nothing, and on a CPU that other jobs share, PyTorch's OpenMP threads spin-wait on
    # each other: a tiny UNet's call took 1.3 s on two threads and 0.011 s on one.
    export OMP_NUM_THREADS=1
  else
    # With the benchmark's seed the three timed iterations run to k = 22, 19 and 33 (mean 24.7; E[k] = 24.5).
    esd=(--unet sd14 --latent 64 --iterations 3 --trajectories 20)
    sample=(--model sd14 --batches 2)
  fi
  stage "ESD-x iteration" "${GPU_CHECK_ESD_S:-240}" \
    python3 scripts/bench_esd.py "${esd[@]}" --dtype bfloat16 --json "$work/esd.json"
  stage "sampling" "${GPU_CHECK_SAMPLE_S:-150}" \
    python3 scripts/bench_sample.py "${sample[@]}" --dtype bfloat16 --json "$work/sample.json"

  echo
  python3 - "$work" "${OUT-}" <<'PY'
import json
import sys
from pathlib import Path

STAGES = {"esd": "ESD-x iteration", "sample": "sampling"}
work, out = Path(sys.argv[1]), sys.argv[2]
card = json.loads((work / "card.json").read_text())
results = {name: json.loads((work / f"{name}.json").read_text()) for name in STAGES if (work / f"{name}.json").exists()}
peak, matmul = card["peak_tflops"], card["matmul_tflops"]
line = f"GPU check on {card['name']}: "
line += f"peak {peak} TFLOP/s dense bfloat16 (NVIDIA's datasheet)" if peak else "no datasheet peak known for it"
if matmul:
    line += f"; an 8192^3 bfloat16 matrix product in PyTorch: {matmul:.0f} TFLOP/s"
    line += f" ({matmul / peak:.0%})" if peak else ""
print(line)
for result in results.values():
    print("\n".join(result["title"]))
print("TFLOP: 2 x the multiply-adds of esd-jax's programs, the same count for both sides")
print(f"{'':50s}{'seconds':>9s}{'TFLOP':>9s}{'TFLOP/s':>9s}{'of peak':>9s}")
for name, title in STAGES.items():
    if name not in results:
        print(f"{title}: no results, see its stage above")
        continue
    for label, seconds, tflop in results[name]["rows"]:
        share = f"{tflop / seconds / peak:9.1%}" if peak else f"{'-':>9s}"
        print(f"{label:50s}{seconds:9.3f}{tflop:9.3f}{tflop / seconds:9.2f}{share}")
if out:
    (Path(out) / "gpu_check.json").write_text(json.dumps(dict(card=card, **results), indent=1))
PY
}

# Through a pipe rather than `exec > >(tee ...)`, so that the log is complete when the script ends.
if [ -n "${OUT-}" ]; then
  mkdir -p "$OUT" && check 2>&1 | tee "$OUT/gpu_check.log"
else
  check
fi
