#!/usr/bin/env bash
# GPU checks for one lent H100/H200, in phases (default: tests cifar step jpeg224 graphs, in this order; each step
# logs to $OUT/<step>.out and a summary to $OUT/gpu_check.log):
#   tests    the CUDA-marked tests (pytest -m cuda): the batched view executor, dataset.cache=device and nvJPEG
#            against the CPU paths, a compiled run with CUDA graphs against an eager one
#   cifar    CIFAR-10 JPEGs ($CIFAR_TAR), SimCLR ResNet-18 (CIFAR stem), batch 512: seconds per epoch, compiled,
#            batched views of resident images (dataset.cache=device) against per-sample views in 14 workers; the
#            views and loaders alone (benchmark_data: per-sample / batched on CPU and GPU, each dataset.cache)
#   step     training-step throughput on synthetic data, batch 256, 224 px, bf16, compiled: SimCLR ResNet-50 and
#            MAE ViT-B/16 (the targets)
#   jpeg224  a 224 px JPEG folder (CIFAR upscaled) with ResNet-50 through workers: the loader and compiled training
#            against its synthetic rate (CPU decoding), then the loader with nvJPEG (data.decode=device)
#   graphs   the step benchmarks again with CUDA graphs (compile_mode=reduce-overhead); the LARS step alone
#   smoke    SimCLR, ODC and MAE train compiled through the CLI; fp16 + GradScaler; the default run (not in the
#            default list: the spine's check, run when a session has device time to spare)
# Usage: OUT=/some/dir bash selfsup/tools/gpu_check.sh [phase ...]. Estimated on an H200 (compiling dominates):
#   tests ~2 min, cifar ~4, step ~3, jpeg224 ~4, graphs ~3. A call may run 10 minutes and a session has 15 of
#   device time, start included: run `tests cifar`, then `step jpeg224`, then `graphs` if time is left.
#   DEVICE=cpu rehearses every command at toy sizes on a CPU (a broken script costs a device session).
#   CIFAR_TAR: the cifar10-train.tar.gz (default ../shared/data/, else .devdata/ in the repo: the device
#   machine gets only the repo, so copy it there and carry it).
# On this project's lent device (no hydra, omegaconf, submitit there; see the device tool's README), once here:
#   printf '/.whl/\n/.devdata/\n' >> .git/info/exclude; mkdir -p .devdata; cp ../shared/data/cifar10-train.tar.gz .devdata/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.0 submitit hydra-submitit-launcher kornia kornia_rs
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# then run with carry [".whl", ".devdata"]:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD &&
#   bash selfsup/tools/gpu_check.sh tests cifar
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
CIFAR_TAR=${CIFAR_TAR:-$( [ -f ../shared/data/cifar10-train.tar.gz ] && echo ../shared/data/cifar10-train.tar.gz || echo .devdata/cifar10-train.tar.gz )}
PHASES=${*:-tests cifar step jpeg224 graphs}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if [ "$DEVICE" = cpu ]; then  # the rehearsal: every command once, at toy sizes
  PER_CLASS=40; BIG=64; EPOCHS=1; BS=64; BS224=8; SIZE224=64; STEPS="--steps 2 --warmup 1"; NW=2; BATCHES=2
  R50="backbone=resnet18"; VITB="backbone=vit_tiny"; COMPILE=compile=false  # compiling on 2 cores: minutes
else
  PER_CLASS=5000; BIG=10240; EPOCHS=3; BS=512; BS224=256; SIZE224=224; STEPS="--steps 30 --warmup 8"; NW=14
  BATCHES=40; R50="backbone=resnet50"; VITB="backbone=vit_base"; COMPILE=compile=true
fi

step() {  # step NAME TIMEOUT CMD...: run, keep its output, log its tail and status
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.out" 2>&1
  local rc=$?
  tail -n 12 "$OUT/$name.out" | tee -a "$LOG"
  echo "--- $name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$LOG"
}
epochs() {  # epochs RUN_DIR: the seconds of each epoch of a finished run
  $PY -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1]+'/metrics.jsonl')]; \
print('epoch seconds:', ' '.join(f\"{x['seconds']:.2f}\" for x in r if x['kind']=='epoch'), \
'| img/s:', ' '.join(f\"{x['img_per_s']:,.0f}\" for x in r if x['kind']=='epoch'))" "$1"
}

prepare() {  # once: CIFAR-10 class folders ($PER_CLASS per class) and a 224 px folder of $BIG JPEGs upscaled from them
  [ -d "$WORK/big" ] && return 0
  [ -f "$CIFAR_TAR" ] || { echo "data: $CIFAR_TAR not found (set CIFAR_TAR)" | tee -a "$LOG"; return 1; }
  $PY - "$CIFAR_TAR" "$WORK" "$PER_CLASS" "$BIG" "$SIZE224" <<'EOF' 2>&1 | tee -a "$LOG"
import sys, tarfile, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from PIL import Image

tar_path, work, per_class, big, size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t0, counts, files = time.time(), {}, []
with tarfile.open(tar_path, "r:gz") as tar:
    for m in tar:
        parts = Path(m.name).parts
        if m.isfile() and len(parts) == 4 and counts.get(parts[2], 0) < per_class:
            counts[parts[2]] = counts.get(parts[2], 0) + 1
            out = work / "cifar" / parts[2] / parts[3]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(m).read())
            files.append(out)

def upscale(i):
    src = files[i * len(files) // big]
    out = work / "big" / src.parent.name / f"{i}.jpg"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.open(src).convert("RGB").resize((size * 8 // 7, size * 8 // 7), Image.BICUBIC).save(out, quality=90)

with ProcessPoolExecutor() as pool:
    list(pool.map(upscale, range(big), chunksize=64))
print(f"data: {len(files)} CIFAR-10 JPEGs, {big} JPEGs of {size * 8 // 7} px, in {time.time() - t0:.0f} s")
EOF
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', '$DEVICE')"
  echo "phases: $PHASES"; } | tee -a "$LOG"

for phase in $PHASES; do
  case $phase in
  tests)
    export SELFSUP_CIFAR_TAR=$CIFAR_TAR
    step tests_cuda 300 $PY -m pytest -q -m cuda -p no:cacheprovider -rs \
      tests/data/test_batched.py tests/data/test_data_path.py tests/engine/test_compile.py
    ;;
  cifar)
    prepare || continue
    CIFAR="dataset=imagefolder dataset.root=$WORK/cifar dataset.image_size=32 backbone=resnet18 backbone.stem=cifar
           device=$DEVICE knn.enabled=false log.progress=false log.tensorboard=false loader.num_workers=$NW"
    # the target: seconds per CIFAR-10 epoch, compiled, batched views of resident images vs per-sample views
    step cifar_epochs_batched 300 $PY -m selfsup.train $CIFAR dataset.cache=device schedule.batch_size=$BS \
      schedule.epochs=$EPOCHS $COMPILE checkpoint.keep=1 hydra.run.dir=$WORK/runs/batched
    epochs "$WORK/runs/batched" 2>&1 | tee -a "$LOG"
    step cifar_epochs_per_sample 300 $PY -m selfsup.train $CIFAR data.executor=per_sample schedule.batch_size=$BS \
      schedule.epochs=1 $COMPILE checkpoint.keep=1 hydra.run.dir=$WORK/runs/per_sample
    epochs "$WORK/runs/per_sample" 2>&1 | tee -a "$LOG"
    # the views and loaders alone against per-sample (the ratios; kornia and torchvision on a batch beside)
    step cifar_views_loaders 300 $PY -m selfsup.tools.benchmark_data --batches $BATCHES --compare --what views,loader \
      -- $CIFAR dataset.cache=device schedule.batch_size=$BS
    ;;
  jpeg224)
    prepare || continue
    # 224 px JPEGs through workers: compiled training vs its synthetic rate; then the loader alone, nvJPEG
    BIG224="dataset=imagefolder dataset.root=$WORK/big dataset.image_size=$SIZE224 $R50 backbone.stem=imagenet
            device=$DEVICE knn.enabled=false log.tensorboard=false loader.num_workers=$NW dataset.cache=none
            schedule.batch_size=$BS224"
    step jpeg224_train_vs_synthetic 300 $PY -m selfsup.tools.benchmark_data --batches $BATCHES --what loader,train -- \
      $BIG224 $COMPILE
    step jpeg224_loader_cpu_vs_nvjpeg 200 $PY -m selfsup.tools.benchmark_data --batches $BATCHES --what loader -- \
      $BIG224 data.decode=device
    ;;
  step)
    BENCH="dataset=fake dataset.num_samples=512 dataset.image_size=$SIZE224 schedule.batch_size=$BS224 device=$DEVICE"
    SIMCLR="algo=simclr $R50 backbone.stem=imagenet"
    MAE="algo=mae $VITB backbone.patch_size=16"
    # the targets: compiled (the reference figures are compiled too)
    step step_simclr_r50_compiled 300 $PY -m selfsup.tools.benchmark_step $STEPS -- $SIMCLR $BENCH $COMPILE
    step step_mae_vitb_compiled 300 $PY -m selfsup.tools.benchmark_step $STEPS -- $MAE $BENCH $COMPILE
    ;;
  graphs)
    BENCH="dataset=fake dataset.num_samples=512 dataset.image_size=$SIZE224 schedule.batch_size=$BS224 device=$DEVICE"
    SIMCLR="algo=simclr $R50 backbone.stem=imagenet"
    MAE="algo=mae $VITB backbone.patch_size=16"
    step step_simclr_r50_graphs 300 $PY -m selfsup.tools.benchmark_step $STEPS -- $SIMCLR $BENCH $COMPILE \
      compile_mode=reduce-overhead
    step step_mae_vitb_graphs 300 $PY -m selfsup.tools.benchmark_step $STEPS -- $MAE $BENCH $COMPILE \
      compile_mode=reduce-overhead
    step step_lars_r50 100 $PY -m selfsup.tools.benchmark_step --lars -- $SIMCLR $BENCH
    ;;
  smoke)
    SMOKE="dataset=fake dataset.num_samples=1024 dataset.image_size=64 schedule.batch_size=128 schedule.epochs=2
           schedule.warmup_epochs=0 $COMPILE loader.num_workers=3 log.interval=4 log.progress=false device=$DEVICE"
    [ "$DEVICE" = cpu ] && SMOKE="${SMOKE/num_samples=1024/num_samples=128} schedule.batch_size=32"
    step smoke_simclr 300 $PY -m selfsup.train algo=simclr backbone=resnet18 $SMOKE hydra.run.dir=$WORK/runs/simclr &
    step smoke_odc 300 $PY -m selfsup.train algo=odc backbone=resnet18 algo.model.num_clusters=32 $SMOKE \
      hydra.run.dir=$WORK/runs/odc &
    step smoke_mae 300 $PY -m selfsup.train algo=mae backbone=vit_tiny backbone.patch_size=8 $SMOKE \
      hydra.run.dir=$WORK/runs/mae &
    wait
    if [ "$DEVICE" != cpu ]; then
      step smoke_fp16 200 $PY -m selfsup.train algo=simclr backbone=resnet18 precision=fp16 ${SMOKE/compile=true/compile=false} \
        hydra.run.dir=$WORK/runs/fp16 &
    fi
    step default_run 300 $PY -m selfsup.train device=$DEVICE loader.num_workers=3 hydra.run.dir=$WORK/runs/default &
    wait
    ;;
  *) echo "unknown phase $phase (tests, cifar, step, jpeg224, graphs, smoke)" | tee -a "$LOG" ;;
  esac
done
echo "done $(date +%T)" | tee -a "$LOG"
