#!/usr/bin/env bash
# GPU checks, one prepared run (used on the lent H100/H200; see README "GPU"):
#  1. each algorithm trains a few steps on CUDA through the CLI with bf16 autocast,
#     channels_last (ResNets), torch.compile and fused optimizers; fp16 + GradScaler once;
#  2. training-step throughput (img/s, peak memory) of SimCLR ResNet-50 and MAE ViT-B/16 at
#     batch 256, 224 px, synthetic data: compiled and eager;
#  3. the default run (`python -m selfsup.train`: SimCLR, ResNet-18, digits) on the GPU.
# Phase 1 runs its jobs side by side (they check that things work); phase 2 runs alone.
# Usage: OUT=/some/dir bash selfsup/tools/gpu_check.sh   (logs land in $OUT)
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
step() {  # step NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.out" 2>&1
  local rc=$?
  tail -n 4 "$OUT/$name.out" | tee -a "$LOG"
  echo "--- $name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$LOG"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee -a "$LOG"

SMOKE="dataset=fake dataset.num_samples=1024 dataset.image_size=64 schedule.batch_size=128 schedule.epochs=2
       schedule.warmup_epochs=0 compile=true loader.num_workers=3 log.interval=4 log.progress=false"
# phase 1, in parallel (correctness, not speed): every algorithm compiled on CUDA, fp16, the default run
step smoke_simclr 200 $PY -m selfsup.train algo=simclr backbone=resnet18 $SMOKE hydra.run.dir=$OUT/runs/simclr &
step smoke_odc 200 $PY -m selfsup.train algo=odc backbone=resnet18 algo.model.num_clusters=32 $SMOKE hydra.run.dir=$OUT/runs/odc &
step smoke_mae 200 $PY -m selfsup.train algo=mae backbone=vit_tiny backbone.patch_size=8 $SMOKE hydra.run.dir=$OUT/runs/mae &
step smoke_fp16 200 $PY -m selfsup.train algo=simclr backbone=resnet18 precision=fp16 ${SMOKE/compile=true/compile=false} hydra.run.dir=$OUT/runs/fp16 &
step default_run 200 $PY -m selfsup.train loader.num_workers=3 hydra.run.dir=$OUT/runs/default &
wait
# phase 2, one at a time (speed): training-step throughput on synthetic data already on the GPU
BENCH="dataset=fake dataset.num_samples=512 dataset.image_size=224 schedule.batch_size=256 backbone.stem=imagenet"
step bench_simclr_r50_compiled 200 $PY -m selfsup.tools.benchmark_step --steps 30 --warmup 6 -- algo=simclr backbone=resnet50 $BENCH compile=true
step bench_mae_vitb16_compiled 200 $PY -m selfsup.tools.benchmark_step --steps 30 --warmup 6 -- algo=mae backbone=vit_base backbone.patch_size=16 $BENCH compile=true
step bench_simclr_r50_eager 100 $PY -m selfsup.tools.benchmark_step --steps 20 --warmup 4 -- algo=simclr backbone=resnet50 $BENCH
step bench_mae_vitb16_eager 100 $PY -m selfsup.tools.benchmark_step --steps 20 --warmup 4 -- algo=mae backbone=vit_base backbone.patch_size=16 $BENCH
echo "done $(date +%T)" | tee -a "$LOG"
