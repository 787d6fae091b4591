#!/bin/sh
# Issue 10's GPU checks as one prepared command, for a session lent a GPU through the workplace's device tool:
#
#     run(command="sh benchmarks/device_check.sh", timeout_s=600)
#
# About 7 minutes on one H200. It needs only what the device image holds (python3 with torch, numpy, tqdm,
# matplotlib, scikit-learn, pillow, pytest, hypothesis): the package is imported from the working tree. It writes to
# $OUT (or ./device-out): env.txt, cuda_tests.txt (the CUDA tests: batched ResNet20 gradients on the GPU against
# one-at-a-time ones, deferred checks with no host sync under torch.cuda.set_sync_debug_mode("error"), a short run on
# the GPU against the CPU) and gpu_throughput.txt/.json (messages/s sequential, batched, packed; the each-message
# column; the projected GPU-hours of OrMo Table 1). Each step has its own time limit, so a hang in one still returns
# the others' results.
set -u
# Cut off (a time limit's TERM, or Ctrl-C): take the steps still running along, so nothing outlives this script.
trap 'trap - INT TERM; kill 0' INT TERM
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
"$PY" -c "import torch, ormo; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'); print('ormo from', ormo.__file__)" \
    2>&1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/env.txt"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_benchmarks.py tests/test_batched.py \
    tests/test_deferred.py -k cuda 2>&1 | tee "$OUT/cuda_tests.txt"
timeout 380 "$PY" benchmarks/gpu_throughput.py --seconds 3 --json "$OUT/gpu_throughput.json" 2>&1 \
    | tee "$OUT/gpu_throughput.txt"
