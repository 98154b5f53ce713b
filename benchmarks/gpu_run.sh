#!/usr/bin/env bash
# Every GPU number the benchmarks and training issues ask for, in parts that fit separate calls of a GPU
# machine that has torch/transformers but no registry. Run from the repository root:
#   bash benchmarks/gpu_run.sh OUT [PART ...]        (no PART: the four speed parts; OUT: runs/gpu)
# OUT gets each part's log and the benchmarks' summaries (<benchmark>_<preset>_cuda.{json,md}); only the
# summaries belong in benchmarks/results.
# Parts, each with its own time limit so that one slow part cannot eat the rest; a part that fails or
# runs out of time is reported and the others still run:
#   layer_speed_7b      benchmarks/layer_speed.py --preset 7b
#   speed_default_cuda  benchmarks/speed.py --preset default
#   speed_7b_cuda       benchmarks/speed.py --preset 7b
#                       (both with PEFT's LoRA as a row: speed.py's default methods include peft_lora)
#   speed_peft_default_cuda  benchmarks/speed.py --preset default, LoRA, task-routed and dense E=4 and 8,
#                       and PEFT's LoRA, each timed round by round against asymlora's LoRA and PEFT's LoRA
#                       (paired): every method's ratio to both LoRAs in one run
#   speed_budget_default_cuda  benchmarks/speed.py --preset default --matched-budget: every method at LoRA's
#                       parameter count (E = 4, 5), peak memory from the CUDA allocator (on CPU, RSS follows
#                       glibc's heap instead)
#   inference_cache_default_cuda  benchmarks/inference_cache.py: decoding with the kept stacked bank against
#                       re-stacking it per step (one copy kernel per adapted layer and token)
#   compile_default_cuda   the default preset's LoRA, task-routed and dense E=8 steps under torch.compile
#   compile_cg_default_cuda  the same with mode reduce-overhead (CUDA graphs): does compiling close the gap
#                       that launch overhead leaves (237 ms per eager LoRA step on an H200, ~14 us per operator)?
#   gpu_tests           tests/test_gpu_training.py (bf16, fp16, FSDP2, DeepSpeed ZeRO-2/3 Trainer runs + resume)
#   default_run         configs/default_asymlora_moe.yaml on the real default model, bf16 (needs $GPU_PAYLOAD:
#                       a folder with pack/ from `benchmarks/pack_default.py pack` and data/ from
#                       `asymlora data build`; DEFAULT_RUN_ARGS adds overrides)
# GPU_RUN_DRY=1 prints each part's command (DRY NAME LIMIT ARGS..., shell-quoted) instead of running it:
# tests/test_benchmark_scripts.py parses those commands here, so a typo cannot cost device time.
set -uo pipefail
dry="${GPU_RUN_DRY:-}"
out="${1:-runs/gpu}"
shift || true
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(speed_peft_default_cuda layer_speed_7b speed_default_cuda speed_7b_cuda)
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error \
  TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -z "$dry" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_env.txt"
  python -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpu_env.txt"
fi
status=0
run() {  # run LIMIT_SECONDS NAME COMMAND...
  local limit=$1 name=$2 started=$SECONDS
  shift 2
  if [ -n "$dry" ]; then printf 'DRY %q %q' "$name" "$limit"; printf ' %q' "$@"; echo; return; fi
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 4 "$out/$name.log"
  echo "-- $name: exit $rc after $((SECONDS - started)) s"
  [ "$rc" -eq 0 ] || { echo "!! $name exited $rc (124: out of time)"; status=1; }
}
default_run() {
  local cache=/tmp/asymlora_cache
  python benchmarks/pack_default.py unpack "$GPU_PAYLOAD/pack" --out "$cache/models/default" || return 1
  rm -rf "$cache/data" && cp -r "$GPU_PAYLOAD/data" "$cache/data" || return 1
  # shellcheck disable=SC2086
  ASYMLORA_CACHE="$cache" python -m asymlora.cli train configs/default_asymlora_moe.yaml training.bf16=true \
    training.output_dir=/tmp/default_run training.report_to=[] ${DEFAULT_RUN_ARGS:-} || return 1
  cp /tmp/default_run/trainer_state.json "$out/default_run_trainer_state.json"
  cp /tmp/default_run/param_report.json "$out/default_run_param_report.json" 2>/dev/null || true
}
export out
export -f default_run
for part in "${parts[@]}"; do
  case "$part" in
    # --no-paired: the round-by-round ratios against LoRA (speed.py's default) are there for a shared CPU
    # host whose speed drifts over minutes; a dedicated GPU with synchronised timing does not, and pairing
    # doubles the steps. --no-count-ops: the ATen operator count does not depend on the device (the CPU
    # runs have it) and profiling a 30-layer step costs seconds per configuration. On an H200
    # the default preset took about 12 s per configuration (20 of them) with both on.
    layer_speed_7b) run 150 "$part" python benchmarks/layer_speed.py --preset 7b --device cuda --profile 6 --out "$out" ;;
    # --decode-tokens 16: the inference rows' decoding steps fit the limit beside the 20 training rows
    speed_default_cuda) run 330 "$part" python benchmarks/speed.py --preset default --device cuda --no-paired --no-count-ops \
      --decode-tokens 16 --out-dir "$out" ;;
    # paired (unlike speed_default_cuda): PEFT's LoRA and asymlora's differ by less than a GPU's run-to-run
    # spread of separate medians; fused only, no inference rows, E = 4 and 8: 7 configurations
    speed_peft_default_cuda) run 240 "$part" python benchmarks/speed.py --preset default --device cuda \
      --methods lora asymlora asymlora_moe peft_lora --experts 4 8 --impls fused --no-inference --no-count-ops \
      --out-dir "$out/speed_peft" ;;
    inference_cache_default_cuda) run 150 "$part" python benchmarks/inference_cache.py --preset default --device cuda \
      --experts 3 8 --rounds 6 --out-dir "$out" ;;
    speed_budget_default_cuda) run 150 "$part" python benchmarks/speed.py --preset default --device cuda --matched-budget \
      --experts 4 5 --impls fused --no-inference --no-paired --no-count-ops --out-dir "$out" ;;
    speed_7b_cuda) run 300 "$part" python benchmarks/speed.py --preset 7b --device cuda --no-paired --no-count-ops --out-dir "$out" ;;
    compile_default_cuda|compile_cg_default_cuda)
      mode=default; [ "$part" = compile_cg_default_cuda ] && mode=reduce-overhead
      run 300 "$part" python benchmarks/speed.py --preset default --device cuda --compile "$mode" --methods lora asymlora \
        asymlora_moe --experts 8 --impls fused --no-paired --no-count-ops --no-inference --out-dir "$out/$part" ;;
    gpu_tests) run 300 "$part" python -m pytest tests/test_gpu_training.py -m gpu -v -s -p no:cacheprovider ;;
    default_run) run "${DEFAULT_RUN_LIMIT:-330}" "$part" bash -c default_run ;;
    *) echo "unknown part $part"; status=1 ;;
  esac
done
exit $status
