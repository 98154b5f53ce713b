#!/usr/bin/env bash
# The 12-step runs behind isa_avx2_vs_avx512/ and isa_avx512_twice/ (2026-12-05, 2-core Xeon with AVX-512):
# the seed-1 LoRA-MoE config of quality.py (isa_config.yaml) trained three times, the second time with MKL,
# oneDNN and ATen held to AVX2. Run from the repository root with the venv's asymlora on PATH.
set -euo pipefail
dir="${1:-/tmp/isa}"
mkdir -p "$dir"
for run in native avx2 native2; do
  sed "s#OUT#$run#; s#/tmp/isa#$dir#" benchmarks/results/repeat_check/isa_config.yaml > "$dir/$run.yaml"
done
asymlora train "$dir/native.yaml"
MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 asymlora train "$dir/avx2.yaml"
asymlora train "$dir/native2.yaml"
python benchmarks/repeat_check.py adapters "$dir/native" "$dir/avx2" --out benchmarks/results/repeat_check/isa_avx2_vs_avx512
python benchmarks/repeat_check.py adapters "$dir/native" "$dir/native2" --out benchmarks/results/repeat_check/isa_avx512_twice
