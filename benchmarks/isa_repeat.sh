#!/usr/bin/env bash
# Does a training run repeat across CPU instruction sets? The seed-1 LoRA-MoE run of benchmarks/quality.py
# (default model, mix5, the budget's r=4, E=4), cut to 12 steps and trained three times: natively, with
# MKL, oneDNN and ATen held to AVX2, and natively again. benchmarks/repeat_check.py then compares the
# adapters (first logged step whose loss differs; saved tensors that differ, and by how much).
#   bash benchmarks/isa_repeat.sh [DIR]          (DIR: runs/isa; needs the CPU to have more than AVX2)
# Writes DIR/{native,avx2,native2}/ (the runs) and DIR/avx2_vs_native/, DIR/native_twice/
# (repeat_check.{json,md}). Run from the repository root with the venv's asymlora on PATH.
set -euo pipefail
dir="${1:-runs/isa}"
train() {  # train NAME [ENV=VALUE ...]
  local name=$1
  shift
  env "$@" asymlora train configs/default_lora_moe.yaml adapter.r=4 adapter.alpha=8 data.eval_split=null \
    training.max_steps=12 training.logging_steps=1 training.save_steps=12 training.save_total_limit=1 \
    training.seed=1 training.report_to=[] "training.output_dir=$dir/$name"
}
train native
train avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
train native2
python benchmarks/repeat_check.py adapters "$dir/native" "$dir/avx2" --out "$dir/avx2_vs_native"
python benchmarks/repeat_check.py adapters "$dir/native" "$dir/native2" --out "$dir/native_twice"
