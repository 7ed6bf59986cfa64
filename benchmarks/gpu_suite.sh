#!/usr/bin/env bash
# Every GPU measurement of the README's Performance section, in one run (one lease of a lent GPU).
#
#   bash benchmarks/gpu_suite.sh            # on a CUDA machine; results in $OUT (default: ./gpu-results)
#   SMALL=1 bash benchmarks/gpu_suite.sh    # the same commands at toy sizes, to check the script on a CPU
#
# Offline GPU machines lack jsonargparse, pycocotools and faster-coco-eval: put their wheels (see
# ../shared/gpu-wheels) in .gpu/ and they are installed first. Each step has its own time limit, so one
# slow step cannot take the others with it; every JSON line is also appended to $OUT/bench.jsonl.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if compgen -G ".gpu/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
if [ "${SMALL:-0}" = 1 ]; then
  DEV=cpu; CB=4; CS=64; DB=2; DS=128; SB=2; SS=64; STEPS="--steps 1 --warmup 1"; IMAGES=64; JB=8; TRAIN=0
  FIT="--steps 2 --warmup 1 --repeats 1"
else
  DEV=cuda; CB=256; CS=224; DB=16; DS=800; SB=16; SS=480; STEPS="--steps 12 --warmup 4"; IMAGES=4096; JB=256; TRAIN=40
  FIT="--steps 30 --warmup 10 --repeats 2"  # the Lightning loop vs torchvision's reference loop
fi
step() {  # step <seconds> <command...>
  local limit=$1; shift
  echo "### $*" >&2
  timeout "$limit" "$@" 2>>"$OUT/stderr.log" | tee -a "$OUT/bench.jsonl"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision, lightning; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"

CL="--precision bf16 --channels-last"
CB_OPTS="--cudnn-benchmark"  # what the classification task sets (trainer.benchmark)
step 150 python3 -m benchmarks.train_step --task classify --models resnet50 resnet101 resnext50_32x4d --device $DEV --batch $CB --size $CS $CL $CB_OPTS $STEPS
step 300 python3 -m benchmarks.dataloader --root /tmp/zoo-jpegs --images $IMAGES --batch $JB --workers 0 $( [ "$DEV" = cuda ] && echo "--gpu-decode --train-step $TRAIN --cpu-share 0.25 0.5" )
step 120 python3 -m benchmarks.fit_loop --models resnet50 --device $DEV --batch $CB --size $CS $FIT
step 120 python3 -m benchmarks.fit_loop --models resnet50 --device $DEV --batch $CB --size $CS $FIT --no-progress-bar
step 90 python3 -m benchmarks.train_step --task detect --models resnet50 --device $DEV --batch $DB --size $DS --precision bf16 --steps 8 --warmup 3
step 90 python3 -m benchmarks.train_step --task segment --models resnet101 --device $DEV --batch $SB --size $SS $CL --steps 8 --warmup 3
if [ "$DEV" = cuda ]; then
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_benchmarks.py -k "gpu or raw or packed" 2>&1 | tail -3 | tee "$OUT/pytest_gpu.txt"
  # the tasks themselves on the GPU (bf16, channels_last, fused SGD, the prefetching GPU decoder in Lightning)
  timeout 120 python3 -m tasks.classify fit --data datamodules.ImageFolderDataModule --data.root /tmp/zoo-jpegs \
    --data.val_dir train --data.decode_device cuda --data.batch_size 128 --data.num_workers 8 \
    --model.backbone resnet50 --trainer.max_steps 30 --trainer.limit_val_batches 2 --trainer.logger false \
    --trainer.enable_progress_bar false --trainer.default_root_dir /tmp/runs 2>&1 | tail -4 | tee "$OUT/fit_classify.txt"
  timeout 120 python3 -m tasks.detect fit --config configs/demo_detect.yaml --data.root /tmp/shapes \
    --trainer.max_epochs 2 --trainer.logger false --trainer.enable_progress_bar false \
    --trainer.default_root_dir /tmp/runs 2>&1 | tail -4 | tee "$OUT/fit_detect.txt"
fi
step 240 python3 -m benchmarks.train_step --task classify --models resnet50 --device $DEV --batch $CB --size $CS $CL $CB_OPTS --compile $STEPS
echo "done" >&2
