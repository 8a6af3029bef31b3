#!/usr/bin/env bash
# Finetune EfficientNet-Lite0@112 on the demo's training split, re-extract its features with the
# finetuned weights and compare UNIFORM on them with UNIFORM on the ImageNet features of demo.sh's
# cache. Run ./demo.sh first (it makes data/demo and data/features/demo_t16.h5). Run from the repository root.
set -euo pipefail
export ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
RUNS=data/runs/demo_finetune
rm -rf "$RUNS" data/features/demo_t16_finetuned.h5  # a cache of other weights would be refused

# 1. finetune (TSN: 16 segments, average consensus), 8 videos a step
finetune-backbone --dataset demo --backbone efficientnet_lite0@112 --epochs 8 --batch-size 8 --lr 0.01 --set min_scale=0.5 \
    --workers 2 --device cpu --no-progress
# 2. the same frames through the finetuned backbone (data/weights/demo_efficientnet_lite0@112.pt)
extract-features --dataset demo --video-root data/demo --num-frames 16 --backbone efficientnet_lite0@112 \
    --weights finetuned --out data/features/demo_t16_finetuned.h5 --device cpu --no-progress
# 3. UNIFORM on ImageNet features against UNIFORM on finetuned features
COMMON=(--batch-size 16 --epochs 30 --lr 1e-3 --device cpu --no-progress --set fine=efficientnet_lite0@112)
train-policy --method uniform --features data/features/demo_t16.h5 "${COMMON[@]}" --out "$RUNS/imagenet"
train-policy --method uniform --features data/features/demo_t16_finetuned.h5 "${COMMON[@]}" --out "$RUNS/finetuned"
evaluate --report table1 --runs "$RUNS"
