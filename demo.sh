#!/usr/bin/env bash
# The whole job on the embedded demo, on a CPU: generate the demo videos, extract features, train
# every method, print the offline table and the claims, draw the trade-off and online figures.
# Every line is a command a user can run on their own data. Run from the repository root.
set -euo pipefail
CACHE=data/features/demo_t16.h5
RUNS=data/runs/demo_t16
rm -rf "$RUNS"

# 1-2. generate data/demo (first time only) and cache EfficientNet-Lite0 features at 224 / 112 / 84 px
extract-features --dataset demo --num-frames 16 --no-progress \
    --backbone efficientnet_lite0@224 --backbone efficientnet_lite0@112 --backbone efficientnet_lite0@84

# 3. train every method (small LSTMs and Adam: 162 training videos, not 45,611)
COMMON=(--features "$CACHE" --batch-size 16 --no-progress)
BASE=(--epochs 30 --lr 1e-3)
train-policy --method uniform "${COMMON[@]}" "${BASE[@]}" --out "$RUNS/uniform"
train-policy --method uniform "${COMMON[@]}" "${BASE[@]}" --set fine=efficientnet_lite0@84 --out "$RUNS/uniform-coarse"
train-policy --method lstm "${COMMON[@]}" "${BASE[@]}" --set hidden=256 --out "$RUNS/lstm"
LITE=(--set coarse=efficientnet_lite0@84 --set hidden_coarse=128 --set hidden_fine=256)
for gamma in 0.05 0.1 0.25; do
    train-policy --method liteeval "${COMMON[@]}" "${BASE[@]}" "${LITE[@]}" --gamma $gamma --out "$RUNS/liteeval-gamma$gamma"
done
train-policy --method liteeval-rl "${COMMON[@]}" "${BASE[@]}" "${LITE[@]}" --gamma 0.1 --out "$RUNS/liteeval-rl"
ARNET=(--set optim=adam --set warmup_lr=1e-3 --set joint_lr=1e-3 --set finetune_lr=5e-4 --set alpha=0.3
       --set warmup_epochs=10 --set joint_epochs=30 --set finetune_epochs=10)
train-policy --method arnet "${COMMON[@]}" "${ARNET[@]}" --out "$RUNS/arnet"
train-policy --method random "${COMMON[@]}" "${ARNET[@]}" --set match_run="$RUNS/arnet" --out "$RUNS/random"
train-policy --method multiscale "${COMMON[@]}" "${ARNET[@]}" --out "$RUNS/multiscale"
train-policy --method scsampler "${COMMON[@]}" "${ARNET[@]}" --out "$RUNS/scsampler"

# 4. the tables and figures
evaluate --report table1 --runs "$RUNS"
evaluate --report claims --runs "$RUNS"
evaluate --report tradeoff --runs "$RUNS" --plot data/demo_tradeoff.png > /dev/null
evaluate --report online --runs "$RUNS" --plot data/demo_online.png > /dev/null
evaluate --report frames --runs "$RUNS/liteeval-gamma0.1" --videos 4 --plot data/demo_frames.png > /dev/null
