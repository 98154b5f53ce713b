#!/usr/bin/env bash
# Every GPU number the benchmarks issue asks for, in one call (e.g. one `device` run, where the machine
# has torch/transformers but no registry): run from the repository root, results go to $1 (default
# benchmarks/results). Each benchmark has its own time limit so that one slow part cannot eat the rest;
# a part that fails or runs out of time is reported and the others still run.
#   bash benchmarks/gpu_run.sh "$OUT"
set -uo pipefail
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_env.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/gpu_env.txt"
status=0
run() {  # run LIMIT_SECONDS NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$out/$name.log"
  [ "$rc" -eq 0 ] || { echo "!! $name exited $rc (124: out of time)"; status=1; }
}
run 150 layer_speed_7b python benchmarks/layer_speed.py --preset 7b --device cuda --out "$out"
# --no-paired: the round-by-round ratios against LoRA (speed.py's default) are there for a shared CPU host
# whose speed drifts over minutes; a dedicated GPU with synchronised timing does not, and pairing doubles
# the steps, which these time limits were not sized for (speed.py writes its files only at the end).
run 200 speed_default_cuda python benchmarks/speed.py --preset default --device cuda --no-paired --out-dir "$out"
run 200 speed_7b_cuda python benchmarks/speed.py --preset 7b --device cuda --no-paired --out-dir "$out"
exit $status
