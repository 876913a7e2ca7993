#!/usr/bin/env bash
# The GPU numbers in BENCHMARKS.md, in one bounded run on a machine with jax's CUDA plugin,
# PyTorch, torchvision and timm (Python 3.12, jax 0.11.x):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR [PART...]]     PART: bf16 smoke fp32 pipeline jpeg resident
#                                                        (default: all but fp32)
#
# 1. bf16: the accelerator benchmark in bfloat16 (ResNet-50 and EfficientNet-B0, 224 px,
#    batch 128 and 256, against PyTorch on the same card), 2. smoke: `efficientnet_scaling:smoke`
#    on the GPU, 3. fp32: the same benchmark in float32, 4. pipeline: the input pipeline at
#    224 px with 0-12 grain workers, 5. jpeg: ResNet-50 bfloat16 trained from a JPEG folder
#    against synthetic data (benchmarks.jpeg_training; goal >= 0.9), 6. resident: the sweep's
#    base trial host-fed against device-resident (benchmarks.device_resident). Each part has its own time limit, so one slow part cannot
#    take the others' time, and the benchmark rewrites its JSON after every row. The limits
#    add up to 16 minutes (on an H100 machine EfficientNet-B0's step had not compiled and
#    warmed up in 105 s), more than one 10-minute device call: name the parts to split them. Packages
#    the image lacks (tensorflow-datasets, grain, ml_collections, array_record and their needs)
#    are installed from wheels in .whl/ when that folder exists (BENCHMARKS.md lists them).
set -u
out=${1:-${OUT:-benchmarks/results/gpu_check}}
shift $(( $# > 0 ? 1 : 0 ))
parts=${*:-bf16 smoke pipeline jpeg resident}
for name in $parts; do
  case $name in bf16|smoke|fp32|pipeline|jpeg|resident) ;;
    *) echo "unknown part '$name': choose from bf16 smoke fp32 pipeline jpeg resident" >&2
       exit 2 ;; esac
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/cnnjax-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/cnnjax-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

part() {  # part SECONDS NAME COMMAND...: run, log, and report its exit status and duration
  local limit=$1 name=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local status=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $status after $((SECONDS - start))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "
import jax, flax, optax, orbax.checkpoint as ocp, torch, torchvision, timm, grain, tensorflow_datasets
print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__,
      '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__)
import cnnjax; print('cnnjax xla_cpu:', cnnjax.xla_cpu.state())" || exit 1

for name in $parts; do
  case $name in
    bf16) part 300 accelerator_bf16 python3 -m benchmarks.accelerator --dtypes bfloat16 \
            --rounds 3 --pipeline_workers '' --output accelerator_bf16 ;;
    smoke) part 240 smoke python3 -m experiments.run \
             --config experiments/configs/efficientnet_scaling.py:smoke --workdir /tmp/cnnjax-smoke
           cp /tmp/cnnjax-smoke/report.md "$out/smoke_report.md" 2>/dev/null ;;
    fp32) part 300 accelerator_fp32 python3 -m benchmarks.accelerator --dtypes float32 \
            --rounds 3 --pipeline_workers '' --output accelerator_fp32 ;;
    pipeline) part 120 pipeline python3 -m benchmarks.accelerator --models '' \
                --dtypes bfloat16 --pipeline_workers 0,4,8,12 --pipeline_batches 24 \
                --output accelerator_pipeline ;;
    jpeg) part 240 jpeg_training python3 -m benchmarks.jpeg_training --steps 80 ;;
    resident) part 240 device_resident python3 -m benchmarks.device_resident --steps 300 ;;
  esac
done
cp benchmarks/results/accelerator_*.json benchmarks/results/jpeg_training.json \
   benchmarks/results/device_resident.json "$out/" 2>/dev/null
ls -la "$out"
